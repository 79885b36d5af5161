"""Fuzzing Pipeline.generate: every input either answers or raises a one-line HiredError, fast, leaving the pipeline well.

Over 2,000 generated cases go to one `Pipeline.generate` on the tiny bundle: valid images of every PIL mode
and format, corrupt and truncated files, crafted headers that claim huge sizes (decompression bombs), arrays
of every dtype and shape, NaN floats, empty / whitespace / huge / special-token prompts, and out-of-range
options. Each case must either return a GenerationResult or raise a `runtime.errors.HiredError` subclass whose
message is one line; any other exception, a crash or a hang fails the test. Every valid image (both sides
>= 1 pixel, at most the pixel limit) must succeed. After each group the same pipeline must still give the
reference request its exact tokens, and at the end resident memory and open file descriptors must be back
where they were after warm-up.

Most cases are invalid and fail in input validation (milliseconds); the valid ones run the whole pipeline with
max_new_tokens=1. Outcomes are counted by error type, printed (`pytest -s`) and written as JSON to
`<pytest basetemp>/fuzz-summary.json` (or $HIRED_FUZZ_SUMMARY). $HIRED_FUZZ_SCALE multiplies the case counts
(e.g. 10 for a long local run); $HIRED_FUZZ_RANDOM=1 draws new cases each run instead of the fixed ones.
The generated groups and the closing memory check are `slow` (`make test-fast` skips them); the fixed cases are not.
"""

from __future__ import annotations

import faulthandler
import io
import json
import math
import os
import resource
import struct
import sys
import time
import unicodedata
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from runtime.errors import BudgetError, GenerationError, HiredError, ImageError, PromptError
from runtime.image import DEFAULT_MAX_PIXELS
from runtime.pipeline import GenerationResult, Pipeline
from tests.helpers import fd_count, rss_mb, scene_array

SCALE = float(os.environ.get("HIRED_FUZZ_SCALE", "1"))
HANG_LIMIT_S = 60.0  # a single case slower than this is a hang (a full tiny run takes well under 2 s)
WATCHDOG_S = 300.0  # past this, faulthandler dumps every thread's stack and ends the process
MAX_RSS_GROWTH_MB = 64.0  # live memory (freed heap trimmed) after warm-up; a leak per case would far exceed it
MIN_CASES = 2000
EVERY_NTH_FULL = 10  # prompt and option cases: one in this many runs the whole pipeline, the rest stop early
FULL_RUNS: Counter = Counter()
PROMPT = "What is in this picture?"
SMALL = scene_array(width=12, height=9, seed=5)  # a valid image: 1 base + 2 crops, the cheapest full run
NOT_AN_IMAGE = np.zeros((0, 4, 3), np.uint8)  # refused by the image check, after the prompt check


def examples(n: int) -> settings:
    return settings(
        max_examples=max(1, int(n * SCALE)),
        deadline=None,
        derandomize=os.environ.get("HIRED_FUZZ_RANDOM") != "1",
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# ---- the tally and the per-case check -----------------------------------------------------------------------
class Tally:
    """Outcome counts per group ("ok" or the error class name) and time spent per outcome."""

    def __init__(self):
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.seconds: dict[str, float] = defaultdict(float)
        self.slowest = 0.0

    def add(self, group: str, outcome: str, seconds: float) -> None:
        self.counts[group][outcome] += 1
        self.seconds[outcome] += seconds
        self.slowest = max(self.slowest, seconds)

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    def by_outcome(self) -> Counter:
        out = Counter()
        for c in self.counts.values():
            out.update(c)
        return out

    def summary(self) -> dict:
        outcomes = self.by_outcome()
        return {
            "cases": self.total,
            "by_outcome": dict(outcomes.most_common()),
            "by_group": {g: dict(c.most_common()) for g, c in self.counts.items()},
            "mean_ms_by_outcome": {k: round(1000 * self.seconds[k] / n, 2) for k, n in outcomes.items()},
            "slowest_case_s": round(self.slowest, 3),
        }


TALLY = Tally()
RSS_AFTER: dict[str, float] = {}  # test name -> RSS (MB) after it, for the summary


def attempt(pipe: Pipeline, group: str, image, prompt=PROMPT, **options) -> str:
    """Run one case; return "ok" or the HiredError class name. Anything else propagates (and fails the test)."""
    options.setdefault("max_new_tokens", 1)
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    t0 = time.perf_counter()
    try:
        result = pipe.generate(image, prompt, **options)
    except HiredError as e:
        message = str(e)
        assert message and "\n" not in message, f"{type(e).__name__} message is not one line: {message!r}"
        outcome = type(e).__name__
    else:
        assert isinstance(result, GenerationResult)
        assert 1 <= len(result.token_ids) <= options["max_new_tokens"]
        outcome = "ok"
    finally:
        faulthandler.cancel_dump_traceback_later()
    seconds = time.perf_counter() - t0
    assert seconds < HANG_LIMIT_S, f"{group} case took {seconds:.1f} s"
    TALLY.add(group, outcome, seconds)
    return outcome


# ---- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _record_rss(request):
    yield
    RSS_AFTER[request.node.name] = round(rss_mb(trim=True), 1)


@pytest.fixture(scope="module")
def reference(pipe):
    """Warm up on every crop count, then record the reference answer, RSS and descriptors."""
    for size in ((640, 320), (990, 330), (700, 660)):  # 2, 3 and 4 crops, and the longest prompt
        pipe.generate(scene_array(width=size[0], height=size[1], seed=1), PROMPT, max_new_tokens=2, budget=1.0, newlines="rows")
    tokens = pipe.generate(scene_array(width=700, height=660, seed=2), PROMPT, max_new_tokens=2).token_ids
    return {"tokens": tokens, "rss_mb": rss_mb(trim=True), "fds": fd_count()}


def assert_still_answers(pipe: Pipeline, reference: dict) -> None:
    got = pipe.generate(scene_array(width=700, height=660, seed=2), PROMPT, max_new_tokens=2).token_ids
    assert got == reference["tokens"], "after the fuzz cases the same request gives different tokens"


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---- hand-made files ----------------------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, *, depth: int = 8, color_type: int = 2, rows: bytes | None = None) -> bytes:
    """A PNG written by hand (any bit depth); `rows` are the filtered scanlines, None for a header-only file."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    idat = _chunk(b"IDAT", zlib.compress(rows)) if rows is not None else _chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + idat + _chunk(b"IEND", b"")


def png16(width: int, height: int, channels: int, seed: int) -> bytes:
    """A valid 16-bit PNG: gray (1), gray+alpha (2), RGB (3) or RGBA (4) channels."""
    values = np.random.default_rng(seed).integers(0, 65536, (height, width * channels), dtype=np.uint16)
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in values)
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    return png_bytes(width, height, depth=16, color_type=color_type, rows=rows)


def bomb_header(fmt: str, width: int, height: int) -> bytes:
    """A file whose header claims width x height pixels (and holds almost no data)."""
    if fmt == "png":
        return png_bytes(width, height)
    if fmt == "gif":
        screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
        return b"GIF89a" + screen + b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x4c\x01\x00;"
    if fmt == "bmp":
        info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
        return b"BM" + struct.pack("<IHHI", 14 + 40 + 16, 0, 0, 54) + info + b"\0" * 16
    if fmt == "jpeg":
        sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
        app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0"
        return b"\xff\xd8" + app0 + sof + b"\xff\xd9"
    if fmt == "tiff":
        tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8), (277, 3, 1),
                (278, 4, height), (279, 4, (width * height) & 0xFFFFFFFF)]  # fmt: skip
        entries = b"".join(
            struct.pack("<HHII", tag, 4, 1, v) if kind == 4 else struct.pack("<HHIHH", tag, 3, 1, v, 0)
            for tag, kind, v in tags
        )
        return b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags)) + entries + b"\0\0\0\0"
    raise ValueError(fmt)


BOMB_LIMITS = {"png": 2**31 - 1, "gif": 65535, "bmp": 2**31 - 1, "jpeg": 65535, "tiff": 2**32 - 1}

# (mode, format) pairs Pillow writes and reads back; EPS/PDF are not image formats the runtime reads.
ENCODINGS = [
    ("1", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("I;16", "PNG"),
    ("L", "JPEG"), ("RGB", "JPEG"), ("CMYK", "JPEG"),
    ("1", "BMP"), ("L", "BMP"), ("P", "BMP"), ("RGB", "BMP"), ("RGBA", "BMP"),
    ("L", "GIF"), ("P", "GIF"), ("RGB", "GIF"),
    ("1", "TIFF"), ("L", "TIFF"), ("LA", "TIFF"), ("P", "TIFF"), ("RGB", "TIFF"), ("RGBA", "TIFF"),
    ("CMYK", "TIFF"), ("I", "TIFF"), ("I;16", "TIFF"), ("F", "TIFF"), ("YCbCr", "TIFF"),
    ("RGB", "WEBP"), ("RGBA", "WEBP"), ("L", "PPM"), ("RGB", "PPM"), ("RGB", "TGA"), ("RGBA", "TGA"),
    ("RGBA", "ICO"), ("RGB", "QOI"), ("RGB", "JPEG2000"), ("L", "JPEG2000"), ("RGB", "PCX"), ("RGB", "SGI"),
]  # fmt: skip


def pil_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    """A PIL image of `mode` with seeded content."""
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "F":
        return Image.fromarray(rng.normal(100, 50, (height, width)).astype(np.float32))
    if mode == "I":
        return Image.fromarray(rng.integers(-70000, 70000, (height, width), dtype=np.int32))
    rgba = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    return rgba.convert(mode)


@st.composite
def encoded_images(draw) -> tuple[bytes, str]:
    """(bytes, description) of a valid encoded image: any mode/format pair, transparency, EXIF turns, frames."""
    width, height = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**16))
    if draw(st.integers(0, 7)) == 0:
        channels = draw(st.sampled_from([1, 2, 3, 4]))
        return png16(width, height, channels, seed), f"16-bit PNG {channels}ch {width}x{height}"
    mode, fmt = draw(st.sampled_from(ENCODINGS))
    image = pil_image(mode, width, height, seed)
    kw: dict = {}
    extra = draw(st.sampled_from(["", "", "transparency", "exif", "frames"]))
    if extra == "transparency" and mode in ("P", "L") and fmt in ("PNG", "GIF"):
        kw["transparency"] = 0
    elif extra == "exif" and fmt in ("JPEG", "PNG", "TIFF", "WEBP"):
        exif = Image.Exif()
        exif[0x0112] = draw(st.integers(1, 8))  # orientation; 5-8 swap the sides
        kw["exif"] = exif
    elif extra == "frames" and fmt in ("GIF", "PNG", "WEBP", "TIFF"):
        kw.update(save_all=True, append_images=[pil_image(mode, width, height, seed + 1)])
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue(), f"{fmt} {mode} {width}x{height} {extra}".strip()


@st.composite
def corrupt_images(draw) -> tuple[bytes, str]:
    """A valid encoded image, then broken: truncated, bytes overwritten or inserted, or its body replaced."""
    data, what = draw(encoded_images())
    how = draw(st.sampled_from(["truncate", "truncate", "overwrite", "insert", "body", "garbage"]))
    if how == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "overwrite":
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
        data = bytes(buf)
    elif how == "insert":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=32)) + data[at:]
    elif how == "body":  # the format's magic bytes, then anything
        data = data[: draw(st.integers(1, 16))] + draw(st.binary(max_size=64))
    else:
        data = draw(st.binary(max_size=256))
    return data, f"{how} {what}"


# ---- 1. encoded images --------------------------------------------------------------------------------------
@pytest.mark.slow
@examples(40)
@given(case=encoded_images(), budget=st.sampled_from([0.1, 0.2, 0.5, 1.0]))
def test_valid_images_of_every_mode_and_format_succeed(pipe, reference, case, budget):
    data, what = case
    assert attempt(pipe, "valid encoded", data, budget=budget) == "ok", what


@pytest.mark.slow
@examples(500)
@given(case=corrupt_images())
def test_truncated_and_corrupt_files_answer_or_raise_image_error(pipe, case):
    data, what = case
    assert attempt(pipe, "corrupt encoded", data) in ("ok", "ImageError"), what


def test_encoded_cases_leave_the_pipeline_answering_as_before(pipe, reference):
    assert_still_answers(pipe, reference)


# ---- 2. decompression bombs ---------------------------------------------------------------------------------
@st.composite
def bombs(draw) -> tuple[bytes, str, int, int]:
    fmt = draw(st.sampled_from(sorted(BOMB_LIMITS)))
    top = BOMB_LIMITS[fmt]
    width = draw(st.integers(1, top))
    low = DEFAULT_MAX_PIXELS // width + 1  # width * height over the default pixel limit
    if low > top:
        width, low = top, DEFAULT_MAX_PIXELS // top + 1
    height = draw(st.integers(low, top))
    if draw(st.booleans()):
        width, height = height, width
    return bomb_header(fmt, width, height), fmt, width, height


@pytest.fixture(scope="module")
def peak_before_bombs(reference) -> float:
    return _maxrss_mb()


@pytest.mark.slow
@examples(300)
@given(case=bombs())
def test_headers_claiming_huge_sizes_are_refused_before_decoding(pipe, peak_before_bombs, case):
    data, fmt, width, height = case
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match="over the .* limit") as info:
        pipe.generate(data, PROMPT, max_new_tokens=1)
    seconds = time.perf_counter() - t0
    TALLY.add("decompression bomb", "ImageError", seconds)
    assert f"{width}x{height}" in str(info.value), f"{fmt} header size not read: {info.value}"
    assert seconds < 2.0, f"{fmt} {width}x{height} took {seconds:.2f} s to refuse: it was decoded"


def test_bombs_never_allocated_their_pixels(pipe, reference, peak_before_bombs):
    # A single decoded 8001x8000 bomb is 192 MB of RGB; the peak RSS over all bomb cases must stay far below.
    assert _maxrss_mb() - peak_before_bombs < 64, "refusing size-bomb headers raised the peak memory"
    assert_still_answers(pipe, reference)


# ---- 3. arrays ----------------------------------------------------------------------------------------------
DTYPES = ["uint8", "uint16", "int8", "int32", "int64", "float16", "float32", "float64", "bool", "complex64",
          "object", "<U1", "datetime64[s]", "V3"]  # fmt: skip
LAYOUTS = ["c", "fortran", "reversed", "strided", "readonly", "matrix", "masked"]


@st.composite
def arrays(draw) -> tuple[np.ndarray, bool, str]:
    """(array, valid, description): any dtype, 0-4 dims, sides 0-40, NaN/inf floats, odd memory layouts."""
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.sampled_from([1, 3, 4, 0, 2, 5, 17, 40])) for _ in range(ndim))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if dtype.kind in "fc":
        arr = rng.normal(0.5, 0.5, shape).astype(dtype)
        if arr.size and draw(st.booleans()):
            arr.flat[draw(st.integers(0, arr.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    elif dtype.kind in "iub":
        arr = rng.integers(0, 256, shape).astype(dtype)
    else:
        arr = np.zeros(shape, dtype=dtype)
    valid = (
        dtype == np.uint8 and ndim in (2, 3) and shape[0] >= 1 and shape[1] >= 1 and (ndim == 2 or shape[2] in (1, 3, 4))
    )
    layout = draw(st.sampled_from(LAYOUTS)) if valid else "c"
    if layout == "fortran":
        arr = np.asfortranarray(arr)
    elif layout == "reversed":
        arr = arr[::-1, ::-1]
    elif layout == "strided":
        arr = np.repeat(np.repeat(arr, 2, axis=0), 2, axis=1)[::2, ::2]
    elif layout == "readonly":
        arr.setflags(write=False)
    elif layout == "matrix" and ndim == 2:
        arr = np.asmatrix(arr)
    elif layout == "masked":
        arr = np.ma.masked_array(arr, mask=np.zeros(arr.shape, bool))
    return arr, valid, f"{dtype} {shape} {layout}"


@pytest.mark.slow
@examples(700)
@given(case=arrays(), color=st.sampled_from(["rgb", "bgr"]))
def test_arrays_of_any_dtype_and_shape_answer_exactly_when_valid(pipe, case, color):
    arr, valid, what = case
    outcome = attempt(pipe, "arrays", arr, color=color)
    assert outcome == ("ok" if valid else "ImageError"), what


@pytest.mark.parametrize(
    "shape", [(1, 1, 3), (1, 4000, 3), (4000, 1, 3), (1, 4000), (4000, 1, 4), (2, 3, 1), (336, 336, 3), (1, 2, 3)]
)
def test_every_size_from_one_pixel_to_extreme_strips_succeeds(pipe, shape):
    arr = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    assert attempt(pipe, "sizes", arr) == "ok"


@pytest.mark.parametrize("mode, size", [("L", (1, 4000)), ("RGB", (4000, 1)), ("RGBA", (1, 1))])
def test_extreme_sizes_succeed_as_files_too(pipe, mode, size):
    encoded = io.BytesIO()
    pil_image(mode, *size, seed=1).save(encoded, format="PNG")
    assert attempt(pipe, "sizes", encoded.getvalue()) == "ok"


def test_memory_layouts_and_array_subclasses_give_the_same_answer(pipe):
    rgb = scene_array(width=40, height=30, seed=9)
    want = pipe.generate(rgb, PROMPT, max_new_tokens=1).token_ids
    readonly = rgb.copy()
    readonly.setflags(write=False)
    variants = {
        "fortran": (np.asfortranarray(rgb), "rgb"),
        "negative strides": (np.ascontiguousarray(rgb[::-1, ::-1])[::-1, ::-1], "rgb"),
        "every other pixel": (np.repeat(np.repeat(rgb, 2, axis=0), 2, axis=1)[::2, ::2], "rgb"),
        "column slice": (np.pad(rgb, ((0, 0), (0, 7), (0, 0)))[:, :40], "rgb"),
        "read-only": (readonly, "rgb"),
        "masked": (np.ma.masked_array(rgb, mask=np.zeros(rgb.shape, bool)), "rgb"),
        "bgr view": (rgb[:, :, ::-1], "bgr"),
        "opaque rgba": (np.concatenate([rgb, np.full((30, 40, 1), 255, np.uint8)], axis=2), "rgb"),
    }
    for name, (arr, color) in variants.items():
        t0 = time.perf_counter()
        got = pipe.generate(arr, PROMPT, max_new_tokens=1, color=color).token_ids
        TALLY.add("array layouts", "ok", time.perf_counter() - t0)
        assert got == want, name
    gray = np.ascontiguousarray(rgb[:, :, 1])
    assert pipe.generate(np.asmatrix(gray), PROMPT, max_new_tokens=1).token_ids == (
        pipe.generate(gray, PROMPT, max_new_tokens=1).token_ids
    )
    assert readonly.flags.writeable is False and np.array_equal(readonly, rgb)  # the caller's frame is untouched


def test_the_pixel_limit_is_inclusive(tiny_bundle):
    with Pipeline.load(tiny_bundle, max_pixels=40_000) as small:
        for shape in ((200, 200, 3), (1, 40_000, 3), (40_000, 1)):
            assert attempt(small, "pixel limit", np.zeros(shape, np.uint8)) == "ok"
        for shape in ((201, 200, 3), (1, 40_001, 3)):
            assert attempt(small, "pixel limit", np.zeros(shape, np.uint8)) == "ImageError"
        assert attempt(small, "pixel limit", png_bytes(40_001, 1)) == "ImageError"


# ---- 4. other image arguments -------------------------------------------------------------------------------
def test_anything_else_as_an_image_is_an_image_error(pipe, tmp_path):
    fifo = tmp_path / "camera.fifo"
    os.mkfifo(fifo)  # open() on a FIFO blocks until a writer comes: must be refused, not hang
    closed = Image.fromarray(SMALL)
    closed.close()
    cases = [
        0, 3.5, [[1, 2], [3, 4]], {"pixels": 1}, object(), b"", bytearray(b"\x89PNG\r\n\x1a\n"),
        memoryview(b"GIF89a"), b"\0" * 1000, str(tmp_path / "missing.png"), tmp_path, str(tmp_path),
        "https://example.com/cat.png", "data:image/png;base64,AAAA", "a\0b.png", "x" * 5000, fifo, "/dev/null",
        Image.new("RGB", (0, 7)), closed, np.uint8(3), np.array(5, np.uint8),
    ]  # fmt: skip
    for image in cases:
        assert attempt(pipe, "other arguments", image) == "ImageError", repr(image)[:80]
    assert attempt(pipe, "other arguments", None) == "ok"  # None is a text-only request (no visual tokens)


def test_eps_is_refused_without_running_ghostscript(pipe, tmp_path, monkeypatch):
    # Pillow decodes EPS by running Ghostscript on the file: an image must never make the runtime run a program.
    from PIL import EpsImagePlugin

    marker = tmp_path / "ghostscript-ran"
    fake_gs = tmp_path / "gs"
    fake_gs.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    fake_gs.chmod(0o755)
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", str(fake_gs), raising=False)
    monkeypatch.setattr(EpsImagePlugin, "gs_windows_binary", None, raising=False)
    eps = io.BytesIO()
    Image.fromarray(SMALL).save(eps, format="EPS")
    assert attempt(pipe, "other arguments", eps.getvalue()) == "ImageError"
    path = tmp_path / "scene.eps"
    path.write_bytes(eps.getvalue())
    assert attempt(pipe, "other arguments", str(path)) == "ImageError"
    assert not marker.exists(), "decoding an EPS image ran Ghostscript"


# ---- 5. prompts ---------------------------------------------------------------------------------------------
LONG = 40_000  # characters: "a " * 20_000 is 20k tokens, over any tiny context
PIECES = ["<image>", "</s>", "<s>", "<unk>", "[INST]", "[/INST]", "<image", "image>", "{prompt}", "\x00", "\ud800",
          "\udfff", "\n", "\t", " ", "é", "🙂", "\u200b", "\ufeff", "＜image＞", "<|im_start|>", "a", "b c", "%s"]  # fmt: skip
prompts = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(PIECES), max_size=8).map("".join),
    st.text(alphabet=" \t\n\r\x0b\x0c\u3000\u00a0\u2028", max_size=12),
    st.integers(LONG // 2, 200_000).map(lambda n: "a " * n),  # 20k+ tokens: over the context, or the char cap
    st.sampled_from([None, 1, 3.5, b"What is it?", ["What"], {"q": 1}]),
)


def blank(text: str) -> bool:
    """Shows nothing: whitespace, control, format (zero-width, BOM) and separator characters only."""
    return all(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Zs", "Zl", "Zp") for ch in text)


def prompt_verdict(prompt) -> set[str]:
    """The outcomes a prompt allows when the image is valid."""
    if not isinstance(prompt, str) or blank(prompt) or prompt.count("<image>") > 1 or len(prompt) >= LONG:
        return {"PromptError"}  # one image: no <image> marker, or one marking where it goes
    if any("\ud800" <= ch <= "\udfff" for ch in prompt):
        return {"PromptError"}  # lone surrogates cannot be encoded as UTF-8
    if "＜image＞" in prompt:
        return {"ok", "PromptError"}  # only if the tokenizer normalised it into the image token
    return {"ok"}


@pytest.fixture(scope="module")
def prompt_checked_first(pipe) -> bool:
    """Whether a bad prompt is reported before a bad image (then cheap invalid images test the prompt check)."""
    try:
        pipe.generate(NOT_AN_IMAGE, "", max_new_tokens=1)
    except PromptError:
        return True
    except ImageError:
        return False
    raise AssertionError("an empty prompt with an empty image did not fail")


@pytest.mark.slow
@examples(450)
@given(prompt=prompts)
def test_prompts_answer_or_raise_prompt_error(pipe, prompt_checked_first, prompt):
    allowed = prompt_verdict(prompt)
    FULL_RUNS["prompts"] += 1
    if FULL_RUNS["prompts"] % EVERY_NTH_FULL == 0 or not prompt_checked_first:
        outcome = attempt(pipe, "prompts", SMALL, prompt)  # the whole pipeline
    else:
        outcome = attempt(pipe, "prompts", NOT_AN_IMAGE, prompt)  # stops at the image, after the prompt check
        allowed = {"ImageError" if a == "ok" else a for a in allowed}
        if isinstance(prompt, str) and LONG <= len(prompt) <= 16 * 8192:
            allowed.add("ImageError")  # too many tokens is only known with the image's token count
    assert outcome in allowed, f"{prompt!r:.120}"


def test_prompt_cases_leave_the_pipeline_answering_as_before(pipe, reference):
    assert_still_answers(pipe, reference)


# ---- 6. options ---------------------------------------------------------------------------------------------
nan = float("nan")
VALID = {
    "budget": st.one_of(st.none(), st.floats(0, 1, exclude_min=True), st.sampled_from([1, np.float32(0.3), np.int64(1)])),
    "alpha": st.one_of(st.none(), st.floats(0, 1), st.sampled_from([0, 1, np.float64(0.25)])),
    "distribution": st.sampled_from([None, "spatial", "official"]),
    "newlines": st.sampled_from([None, "none", "rows"]),
    "max_new_tokens": st.sampled_from([1, 2, np.int32(1), np.int64(2), np.uint8(2), np.uint64(1)]),
    "min_new_tokens": st.sampled_from([0, 1, np.int8(1), np.uint64(0)]),
    "temperature": st.one_of(st.floats(0, 1e6), st.sampled_from([0, 5e-324, 1e308, np.float32(0.7)])),
    "top_p": st.one_of(st.floats(0, 1, exclude_min=True), st.sampled_from([1, np.float32(0.9), 5e-324])),
    "seed": st.one_of(st.none(), st.integers(0, 2**64), st.sampled_from([np.int64(5), np.uint32(7)])),
    "color": st.sampled_from(["rgb", "bgr"]),
}
INVALID = {
    "budget": st.one_of(st.floats(max_value=0), st.floats(min_value=1, exclude_min=True),
                        st.sampled_from([nan, math.inf, "0.2", True, False, [0.2], 0.2j, np.float64(nan)])),
    "alpha": st.one_of(st.floats(max_value=-5e-324), st.floats(min_value=1, exclude_min=True),
                       st.sampled_from([nan, "a", True, [0.5]])),
    "distribution": st.sampled_from(["", "SPATIAL", "uniform", 3, b"spatial", ("spatial",)]),
    "newlines": st.sampled_from(["", "row", "ROWS", 0, True]),
    "max_new_tokens": st.sampled_from([0, -1, 1.5, "1", True, None, 2**70, 10**30, np.uint64(2**64 - 1),
                                       np.int64(2**63 - 1), np.int32(2**31 - 1), np.uint16(2**16 - 1)]),
    "min_new_tokens": st.sampled_from([-1, 1.5, "0", True, None, 3, 10**30, np.uint64(2**64 - 1), np.int64(-1)]),
    "temperature": st.one_of(st.floats(max_value=-5e-324),
                             st.sampled_from([nan, math.inf, "0", True, None])),
    "top_p": st.one_of(st.floats(max_value=0), st.floats(min_value=1, exclude_min=True),
                       st.sampled_from([nan, "1", True, None])),
    "seed": st.sampled_from([-1, -(2**63), 1.5, "7", True, [1], np.int64(-3)]),
    "color": st.sampled_from(["RGB", "", "bgra", None, 0]),
}  # fmt: skip
ERROR_OF = {"budget": BudgetError, "alpha": BudgetError, "distribution": BudgetError, "newlines": BudgetError,
            "max_new_tokens": GenerationError, "min_new_tokens": GenerationError, "temperature": GenerationError, "top_p": GenerationError,
            "seed": GenerationError, "color": ImageError}  # fmt: skip


@st.composite
def options(draw) -> tuple[dict, dict]:
    """(valid keyword options, one or two of them replaced by invalid values)."""
    valid = {name: draw(VALID[name]) for name in VALID}
    bad = draw(st.sets(st.sampled_from(sorted(VALID)), min_size=1, max_size=2))
    return valid, {name: draw(INVALID[name]) for name in sorted(bad)}


@pytest.mark.slow
@examples(400)
@given(case=options())
def test_options_answer_exactly_when_valid_else_name_the_option(pipe, case):
    valid, invalid = case
    FULL_RUNS["options"] += 1
    if FULL_RUNS["options"] % EVERY_NTH_FULL == 0:
        invalid = {}  # one case in EVERY_NTH_FULL runs the whole pipeline with valid options
    opts, bad = {**valid, **invalid}, set(invalid)
    outcome = attempt(pipe, "options", SMALL, **opts)
    if not bad:
        assert outcome == "ok", opts
        return
    allowed = {ERROR_OF[name].__name__ for name in bad}
    m = opts["max_new_tokens"]
    if isinstance(m, int | np.integer) and not isinstance(m, bool) and m > 2:  # an integer no context holds
        allowed.add("PromptError")
    assert outcome in allowed, f"invalid {sorted(bad)} gave {outcome}: {opts}"


# ---- 7. after everything ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_after_all_cases_memory_and_handles_are_back_and_the_answer_is_unchanged(pipe, reference, tmp_path_factory):
    assert_still_answers(pipe, reference)
    summary = TALLY.summary()
    summary["rss_growth_mb"] = round(rss_mb(trim=True) - reference["rss_mb"], 1)
    summary["fds"] = [reference["fds"], fd_count()]
    summary["rss_mb_after_warmup"] = round(reference["rss_mb"], 1)
    summary["rss_mb_after_each_test"] = RSS_AFTER
    out = Path(os.environ.get("HIRED_FUZZ_SUMMARY") or tmp_path_factory.getbasetemp() / "fuzz-summary.json")
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nfuzz summary ({out}):\n{json.dumps(summary, indent=2)}", file=sys.stderr)

    assert summary["rss_growth_mb"] < MAX_RSS_GROWTH_MB, f"RSS grew {summary['rss_growth_mb']} MB over the fuzz cases"
    assert fd_count() == reference["fds"], "file descriptors leaked over the fuzz cases"
    groups = {"valid encoded", "corrupt encoded", "arrays", "prompts", "options", "decompression bomb"}
    if not groups <= set(TALLY.counts):
        pytest.skip(f"only part of the fuzz ran ({sorted(TALLY.counts)}); the case count is checked on a full run")
    if SCALE >= 1:
        assert TALLY.total >= MIN_CASES, f"only {TALLY.total} cases were fuzzed"
