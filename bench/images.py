"""The benchmark's images: deterministic synthetic pictures of given sizes, and the `WxH` size syntax.

    from bench.images import parse_size, synthetic_image
    w, h = parse_size("1280x640")            # (1280, 640): width first, as people write sizes
    rgb = synthetic_image(width=w, height=h)  # uint8 [640, 1280, 3], the same bytes on every call

The default pair covers two anyres grids of LLaVA-NeXT's five pinpoints: 1000x1000 -> 672x672 canvas,
2x2 crops (5 images through the tower, the paper's benchmark shape); 1280x640 -> 336x672 canvas, 1x2
crops (3 images).
"""

from __future__ import annotations

import numpy as np

DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((1000, 1000), (1280, 640))  # (width, height)


def parse_size(text: str) -> tuple[int, int]:
    """`"1280x640"` -> (1280, 640) = (width, height); raises ValueError saying the expected form."""
    parts = str(text).lower().replace(" ", "").split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"image size must look like WIDTHxHEIGHT, e.g. 1280x640; got {text!r}")
    width, height = int(parts[0]), int(parts[1])
    if width < 1 or height < 1:
        raise ValueError(f"image size must be at least 1x1 pixels, got {text!r}")
    return width, height


def format_size(size: tuple[int, int]) -> str:
    """(1280, 640) -> "1280x640"."""
    return f"{size[0]}x{size[1]}"


def synthetic_image(*, width: int, height: int, seed: int = 0) -> np.ndarray:
    """A deterministic uint8 [height, width, 3] RGB picture: smooth colour gradients, a few bright
    rectangles and mild noise, so the crops differ from each other (as photos do) and from the padding.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be at least 1x1 pixels, got {width}x{height}")
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    img = np.empty((height, width, 3), dtype=np.float32)
    img[..., 0] = 200 * x + 30 * np.sin(12 * y)
    img[..., 1] = 180 * y + 40 * np.cos(9 * x)
    img[..., 2] = 120 + 100 * np.sin(5 * (x + y))
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = (
            int(rng.integers(width // 10 + 1, width // 3 + 2)),
            int(rng.integers(height // 10 + 1, height // 3 + 2)),
        )
        img[y0 : y0 + h, x0 : x0 + w] = rng.integers(0, 256, size=3)
    img += rng.normal(0.0, 6.0, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)
