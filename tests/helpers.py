"""What several test files share: seeded pictures, memory and descriptor counts, a pool of varied requests.

    from tests.helpers import scene, rss_mb, fd_count, request_pool
    img = scene(800, 600, seed=1)                        # PIL image with structure (attention is not uniform)
    pool = request_pool(8, sizes=((640, 320), ...), workdir=tmp)   # [Request(name, image, prompt, options)]

Tests import these, never bench/ (bench/ is a tool with its own tests in tests/test_bench.py and test_soak.py).
"""

from __future__ import annotations

import ctypes
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

KINDS = ("rgb", "bgr", "rgba", "gray", "pil", "png", "jpeg", "path")  # how a request passes its image
BUDGETS = (0.1, 0.2, 0.5, 1.0)
PROMPTS = ("What is in this picture?", "Describe the scene.", "Is there a red block?")


def scene_array(width: int, height: int, seed: int = 0) -> np.ndarray:
    """uint8 [height, width, 3]: gradients plus six seeded blocks, so attention is not uniform."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)), (x + y) % 256], -1)
    for _ in range(6):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        img[y0 : y0 + max(height // 5, 1), x0 : x0 + max(width // 5, 1)] = rng.integers(0, 256, 3)
    return img.astype(np.uint8)


def scene(width: int, height: int, seed: int = 0) -> Image.Image:
    """scene_array as a PIL image."""
    return Image.fromarray(scene_array(width, height, seed))


def rss_mb(*, trim: bool = False) -> float:
    """Resident memory of this process in MB; trim=True first returns glibc's free heap pages (live memory only)."""
    if trim:
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: nothing to trim
            pass
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def fd_count() -> int:
    """Open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


@dataclass(frozen=True)
class Request:
    """One reproducible request: an image argument of some kind, a prompt and generate() options."""

    name: str
    image: Any = field(repr=False)
    prompt: str
    options: dict = field(hash=False)

    def run(self, pipe):
        return pipe.generate(self.image, self.prompt, **self.options)


def request_pool(n: int, *, sizes, workdir: str | os.PathLike, seed: int = 0, max_new_tokens: int = 2) -> list[Request]:
    """`n` requests: sizes cycle first (so n >= len(sizes) covers each), image kinds, budgets and options vary.

    Array images are read-only: the pipeline must never write into a caller's frame."""
    rng = np.random.default_rng(seed)
    pool = []
    for i in range(n):
        kind = KINDS[(i * 3 + i // len(sizes)) % len(KINDS)]
        width, height = sizes[i % len(sizes)]
        options = {
            "budget": BUDGETS[(i // 2) % len(BUDGETS)],
            "distribution": "official" if i % 5 == 4 else "spatial",
            "newlines": "rows" if i % 3 == 2 else "none",
            "max_new_tokens": max_new_tokens,
            "color": "bgr" if kind == "bgr" else "rgb",
        }
        image = _image_argument(kind, scene_array(width, height, int(rng.integers(1 << 30))), Path(workdir) / f"{i}.png")
        pool.append(Request(f"request{i:03d} {kind} {width}x{height}", image, PROMPTS[i % len(PROMPTS)], options))
    return pool


def _image_argument(kind: str, rgb: np.ndarray, path: Path) -> Any:
    if kind in ("rgb", "bgr", "rgba", "gray"):
        arr = {
            "rgb": rgb,
            "bgr": rgb[:, :, ::-1],
            "rgba": np.concatenate([rgb, rgb[:, :, :1] // 2 + 100], axis=2),
            "gray": rgb[:, :, 1],
        }[kind]
        arr = np.ascontiguousarray(arr)
        arr.setflags(write=False)
        return arr
    image = Image.fromarray(rgb)
    if kind == "pil":
        return image
    buf = io.BytesIO()
    image.save(buf, format="JPEG" if kind == "jpeg" else "PNG", **({"quality": 90} if kind == "jpeg" else {}))
    if kind in ("png", "jpeg"):
        return buf.getvalue()
    path.write_bytes(buf.getvalue())
    return str(path)
