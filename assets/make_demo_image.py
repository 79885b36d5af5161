"""Draws assets/demo.png, the bundled demo scene (a house, a tree, a sun and a sign), with pillow only.

    python assets/make_demo_image.py
"""

from pathlib import Path

from PIL import Image, ImageDraw


def draw_scene(width: int = 800, height: int = 600) -> Image.Image:
    img = Image.new("RGB", (width, height))
    d = ImageDraw.Draw(img)
    for y in range(height):  # sky to grass
        t = y / height
        d.line([(0, y), (width, y)], fill=(int(110 + 90 * t), int(170 + 40 * t), 235) if t < 0.62 else (70, 150, 60))
    d.ellipse([620, 50, 720, 150], fill=(255, 215, 60))
    d.rectangle([180, 250, 420, 420], fill=(190, 80, 60))
    d.polygon([(160, 250), (300, 150), (440, 250)], fill=(110, 50, 40))
    d.rectangle([270, 330, 330, 420], fill=(90, 60, 30))
    d.rectangle([200, 280, 250, 320], fill=(200, 230, 255))
    d.rectangle([350, 280, 400, 320], fill=(200, 230, 255))
    d.rectangle([560, 300, 590, 440], fill=(100, 70, 40))
    d.ellipse([500, 200, 650, 330], fill=(40, 120, 40))
    d.rectangle([60, 440, 200, 500], fill=(240, 240, 240), outline=(0, 0, 0), width=3)
    d.text((75, 460), "HiRED demo", fill=(0, 0, 0))
    return img


if __name__ == "__main__":
    out = Path(__file__).with_name("demo.png")
    draw_scene().save(out, optimize=True)
    print(out)
