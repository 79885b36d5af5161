"""Draws bench.eval's sample set: small synthetic pictures and questions with every kind of answer key.

    python bench/eval/sample/make_sample.py            # rewrites bench/eval/sample/{images/*.png, questions.jsonl}

32 pictures (PIL only, seeded): 12 single shapes (circle, square, triangle x red, green, blue, yellow), 10 counts
(1..5 dots in two colours), 10 words written with PIL's default font. 40 questions in LLaVA's question format:
- exact (`answer`): the colour of the shape, the number of dots;
- vqa (`answers`, ten human answers each, some of them differing): the written word, the number of dots;
- choice (`answer` = a letter; the options listed in the question): the shape, the colour;
- yesno (`label`, POPE-style "Is there a ... in the image?", half yes, half no).
The keys are true to the pictures, so a real checkpoint scores high; the random-weight `tiny` scores noise.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
WORDS = ("STOP", "CAT", "OPEN", "EXIT", "MILK", "BUS", "SALE", "PARK", "TAXI", "HOTEL")
SIZES = ((160, 120), (120, 160), (200, 100), (128, 128))  # (width, height): several anyres grids


def _canvas(rng: random.Random) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", rng.choice(SIZES), (250, 250, 245))
    return img, ImageDraw.Draw(img)


def _shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable default font
    except (TypeError, OSError):
        return ImageFont.load_default()


def _save(img: Image.Image, name: str) -> str:
    # a palette of few colours keeps each file near 1 kB
    img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(HERE / "images" / name, optimize=True)
    return name


def _options(choices: list[str]) -> str:
    return "\n".join(f"{'ABCD'[i]}. {c}" for i, c in enumerate(choices))


def draw_sample(seed: int = 0) -> list[dict]:
    """Draw the images into images/ and return the question records (in order)."""
    rng = random.Random(seed)
    (HERE / "images").mkdir(exist_ok=True)
    for old in (HERE / "images").glob("*.png"):
        old.unlink()
    questions: list[dict] = []

    def ask(image: str, text: str, category: str, **key) -> None:
        questions.append({"question_id": len(questions) + 1, "image": image, "text": text, "category": category} | key)

    # 12 shapes: every shape in every colour
    shapes = []
    for shape in SHAPES:
        for colour in COLOURS:
            img, draw = _canvas(rng)
            w, h = img.size
            side = min(w, h) // 2
            x0, y0 = rng.randint(4, w - side - 4), rng.randint(4, h - side - 4)
            _shape(draw, shape, (x0, y0, x0 + side, y0 + side), COLOURS[colour])
            shapes.append((_save(img, f"shape-{colour}-{shape}.png"), shape, colour))
    # 10 counts: 1..5 dots, in red and in blue
    counts = []
    for colour in ("red", "blue"):
        for n in range(1, 6):
            img, draw = _canvas(rng)
            w, h = img.size
            r, placed = 9, []
            while len(placed) < n:
                x, y = rng.randint(r + 2, w - r - 2), rng.randint(r + 2, h - r - 2)
                if all((x - a) ** 2 + (y - b) ** 2 > (2 * r + 4) ** 2 for a, b in placed):
                    placed.append((x, y))
                    draw.ellipse((x - r, y - r, x + r, y + r), fill=COLOURS[colour])
            counts.append((_save(img, f"count-{colour}-{n}.png"), n, colour))
    # 10 words
    words = []
    for word in WORDS:
        img, draw = _canvas(rng)
        w, h = img.size
        font = _font(28)
        left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
        draw.text(((w - (right - left)) // 2 - left, (h - (bottom - top)) // 2 - top), word, fill=(10, 10, 10), font=font)
        words.append((_save(img, f"word-{word.lower()}.png"), word))

    # exact: 4 colours, 4 counts
    for image, shape, colour in shapes[0:12:3]:
        ask(image, f"What colour is the {shape}?", "colour", answer=colour)
    for image, n, _colour in counts[1:9:2]:
        ask(image, "How many dots are there?", "count", answer=str(n))
    # vqa: 6 words, 4 counts, ten human answers each
    for image, word in words[:6]:
        answers = [word.lower()] * 7 + [f"{word.lower()} sign", word.capitalize(), "unanswerable"]
        ask(image, "What word is written in the image?", "text", answers=answers)
    for image, n, _colour in counts[0:10:3]:
        spelled = ["zero", "one", "two", "three", "four", "five", "six"][n]
        answers = [str(n)] * 5 + [spelled] * 2 + [f"{n} dots", str(n + 1), str(n)]
        ask(image, "How many dots are in the picture?", "count", answers=answers)
    # choice: 6 shapes, 4 colours (the options shuffled with the seed)
    for image, shape, _colour in shapes[1:12:2]:
        opts = [*SHAPES, "star"]
        rng.shuffle(opts)
        ask(image, f"Which shape is shown?\n{_options(opts)}", "shape", answer="ABCD"[opts.index(shape)])
    for image, shape, colour in shapes[2:12:3]:
        opts = list(COLOURS)
        rng.shuffle(opts)
        ask(image, f"What colour is the {shape}?\n{_options(opts)}", "colour", answer="ABCD"[opts.index(colour)])
    # yesno: 12 POPE-style probes, alternating a true and a false object
    for k, (image, shape, colour) in enumerate(shapes):
        if k % 2 == 0:
            ask(image, f"Is there a {colour} {shape} in the image?", "pope", label="yes")
        else:
            other = SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)]
            ask(image, f"Is there a {colour} {other} in the image?", "pope", label="no")
    return questions


def main() -> None:
    questions = draw_sample()
    with open(HERE / "questions.jsonl", "w", encoding="utf-8") as f:
        for q in questions:
            f.write(json.dumps(q) + "\n")
    size = sum(p.stat().st_size for p in (HERE / "images").glob("*.png"))
    print(f"{len(questions)} questions, {len(list((HERE / 'images').glob('*.png')))} images ({size:,} bytes) in {HERE}")


if __name__ == "__main__":
    main()
