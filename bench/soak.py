"""Soak: thousands of varied requests to one Pipeline; memory stays flat, no handle leaks, answers never change.

    python -m bench.soak --minutes 10 [--artifacts artifacts/tiny] [--seed 0] [--json soak.json]
    make soak                                  # the long form: 10 minutes on the tiny bundle

What it does:
1. Builds a pool of requests (`make_cases`) covering every crop count of the bundle's grid pinpoints
   (1 + 2, 3 and 4 crops for LLaVA-NeXT's five), every input kind (RGB/BGR/RGBA/gray arrays, PIL images,
   PNG/JPEG bytes, file paths) and several budgets, distributions and newline modes.
2. Runs each case once alone: its tokens are the expected answer, and this pass warms onnxruntime up on
   every input shape (its memory arenas grow with each new shape, then stay).
3. Sends requests drawn at random from the pool until the time (or request count) is up, checking every
   answer against the expected one and sampling resident memory every `sample_every` requests. Each sample
   first trims the heap (glibc malloc_trim), so it counts live memory: without that, a leak can hide in
   pages the allocator already holds (e.g. after a Pipeline was closed) and RSS would not move.
4. Reports the RSS slope in MB per 1000 requests (least-squares line through the samples), the file
   descriptors before and after, and every mismatch or error. Exit status 1 if any check fails.

The slope threshold (`DEFAULT_MAX_SLOPE_MB`, 50 MB per 1000 requests = 50 kB per request) is below the
smallest per-request array the pipeline makes: the tiny model's vocabulary logits alone are 125 kB, its
KV cache and embeddings MBs. Keeping any of them alive per request shows as >= 125 MB per 1000 requests;
allocator jitter over a few hundred requests stays within a few MB.

Linux only for the descriptor count (/proc/self/fd); RSS falls back to psutil elsewhere.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.images import synthetic_image

DEFAULT_MAX_SLOPE_MB = 50.0  # MB per 1000 requests; see the module docstring
KINDS = ("rgb", "bgr", "rgba", "gray", "pil", "png", "jpeg", "path")
# (width, height) per crop grid of LLaVA-NeXT's pinpoints (h, w): 336x672 -> 1x2, 672x336 -> 2x1,
# 1008x336 -> 3x1, 336x1008 -> 1x3, 672x672 -> 2x2; plus tiny and extreme images, which pick 1x2 or 3x1/1x3.
SIZES: tuple[tuple[int, int], ...] = (
    (640, 320),  # 1x2 grid: 2 crops
    (300, 620),  # 2x1: 2 crops
    (990, 330),  # 1x3: 3 crops
    (340, 1000),  # 3x1: 3 crops
    (700, 660),  # 2x2: 4 crops
    (23, 17),  # tiny
    (4000, 1),  # extreme strip
)
BUDGETS = (0.1, 0.2, 0.5, 1.0)
PROMPTS = ("What is in this picture?", "Describe the scene.", "Is there a red block?")


# ---- measurements -------------------------------------------------------------------------------------------
def rss_mb(*, trim: bool = False) -> float:
    """Resident memory of this process in MB (from /proc/self/statm, else psutil).

    trim=True first hands the heap's free pages back to the OS (glibc's malloc_trim), so the figure counts
    live memory only, not what the allocator keeps after a large object is freed.
    """
    if trim:
        _malloc_trim()
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import psutil

        return psutil.Process().memory_info().rss / 2**20


def _malloc_trim() -> None:
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def fd_count() -> int:
    """Open file descriptors of this process (entries of /proc/self/fd)."""
    return len(os.listdir("/proc/self/fd"))


def slope_per_1000(samples: Sequence[tuple[int, float]]) -> float:
    """Least-squares slope of (request index, MB) samples, in MB per 1000 requests; 0.0 for < 2 samples."""
    if len(samples) < 2:
        return 0.0
    x = np.array([s[0] for s in samples], dtype=np.float64)
    y = np.array([s[1] for s in samples], dtype=np.float64)
    if np.ptp(x) == 0:
        return 0.0
    return float(np.polyfit(x, y, 1)[0] * 1000.0)


# ---- the request pool ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One reproducible request: the same case always makes the same pixels and options."""

    name: str
    kind: str  # one of KINDS
    size: tuple[int, int]  # (width, height)
    seed: int
    prompt: str
    budget: float
    distribution: str = "spatial"
    newlines: str = "none"
    max_new_tokens: int = 2

    def options(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "distribution": self.distribution,
            "newlines": self.newlines,
            "max_new_tokens": self.max_new_tokens,
            "color": "bgr" if self.kind == "bgr" else "rgb",
        }


def make_cases(
    n: int,
    *,
    seed: int = 0,
    sizes: Sequence[tuple[int, int]] = SIZES,
    budgets: Sequence[float] = BUDGETS,
    max_new_tokens: int = 2,
) -> list[Case]:
    """`n` cases: sizes cycle first (so any n >= len(sizes) covers every crop count), kinds and options vary."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        cases.append(
            Case(
                name=f"case{i:03d}",
                kind=KINDS[(i * 3 + i // len(sizes)) % len(KINDS)],
                size=tuple(sizes[i % len(sizes)]),
                seed=int(rng.integers(1 << 30)),
                prompt=PROMPTS[i % len(PROMPTS)],
                budget=budgets[(i // 2) % len(budgets)],
                distribution="official" if i % 5 == 4 else "spatial",
                newlines="rows" if i % 3 == 2 else "none",
                max_new_tokens=max_new_tokens,
            )
        )
    return cases


def materialize(case: Case, workdir: str | os.PathLike) -> Any:
    """The image argument of `case`: a read-only array, a PIL image, encoded bytes or a file path."""
    rgb = synthetic_image(width=case.size[0], height=case.size[1], seed=case.seed)
    if case.kind in ("rgb", "bgr", "rgba", "gray"):
        arr = {
            "rgb": rgb,
            "bgr": rgb[:, :, ::-1],
            "rgba": np.concatenate([rgb, (rgb[:, :, :1] // 2 + 100)], axis=2),
            "gray": rgb[:, :, 1],
        }[case.kind]
        arr = np.ascontiguousarray(arr)
        arr.setflags(write=False)  # the pipeline must never write into the caller's frame
        return arr
    image = Image.fromarray(rgb)
    if case.kind == "pil":
        return image
    buf = io.BytesIO()
    image.save(buf, format="JPEG" if case.kind == "jpeg" else "PNG", **({"quality": 90} if case.kind == "jpeg" else {}))
    if case.kind in ("png", "jpeg"):
        return buf.getvalue()
    path = Path(workdir) / f"{case.name}.png"
    path.write_bytes(buf.getvalue())
    return str(path)


def run_case(pipe, case: Case, image: Any):
    """One request of `case` with its image argument; returns the GenerationResult."""
    return pipe.generate(image, case.prompt, **case.options())


# ---- the soak loop ------------------------------------------------------------------------------------------
@dataclass
class SoakReport:
    """What a soak run measured; `failures()` lists what broke the contract (empty = passed)."""

    requests: int = 0  # after warm-up
    seconds: float = 0.0
    warmup_requests: int = 0
    cases: int = 0
    crop_counts: list[int] = field(default_factory=list)  # crops per image seen in the pool
    rss_samples: list[tuple[int, float]] = field(default_factory=list)  # (request index, MB of live memory)
    raw_rss_start_mb: float = 0.0  # what the OS sees, freed heap included
    raw_rss_end_mb: float = 0.0
    slope_mb_per_1000: float = 0.0
    max_slope_mb_per_1000: float = DEFAULT_MAX_SLOPE_MB
    fds_start: int = 0
    fds_end: int = 0
    mismatches: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def rss_start_mb(self) -> float:
        return self.rss_samples[0][1] if self.rss_samples else 0.0

    @property
    def rss_end_mb(self) -> float:
        return self.rss_samples[-1][1] if self.rss_samples else 0.0

    def failures(self) -> list[str]:
        out = []
        if self.slope_mb_per_1000 > self.max_slope_mb_per_1000:
            out.append(
                f"RSS grows {self.slope_mb_per_1000:.1f} MB per 1000 requests "
                f"(limit {self.max_slope_mb_per_1000:.0f}): memory leak"
            )
        if self.fds_end != self.fds_start:
            out.append(f"open file descriptors went from {self.fds_start} to {self.fds_end}: handle leak")
        if self.mismatches:
            out.append(f"{len(self.mismatches)} answers differ from the same request alone, e.g. {self.mismatches[0]}")
        if self.errors:
            out.append(f"{len(self.errors)} requests failed, e.g. {self.errors[0]}")
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(rss_start_mb=self.rss_start_mb, rss_end_mb=self.rss_end_mb, failures=self.failures())
        d["requests_per_s"] = self.requests / self.seconds if self.seconds else 0.0
        return d

    def table(self) -> str:
        rows = [
            ("requests (after warm-up)", f"{self.requests}"),
            ("warm-up requests", f"{self.warmup_requests} ({self.cases} cases)"),
            ("crops per image seen", ", ".join(map(str, self.crop_counts))),
            ("wall time", f"{self.seconds:.1f} s ({self.requests / self.seconds if self.seconds else 0:.2f} req/s)"),
            ("RSS start -> end", f"{self.rss_start_mb:.1f} -> {self.rss_end_mb:.1f} MB live "
             f"({self.raw_rss_start_mb:.1f} -> {self.raw_rss_end_mb:.1f} MB with freed heap)"),
            ("RSS slope", f"{self.slope_mb_per_1000:+.2f} MB per 1000 requests (limit {self.max_slope_mb_per_1000:.0f})"),
            ("file descriptors", f"{self.fds_start} -> {self.fds_end}"),
            ("mismatches / errors", f"{len(self.mismatches)} / {len(self.errors)}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def expected_answers(pipe, cases: Sequence[Case], images: Sequence[Any]) -> tuple[list[tuple[int, ...]], list[int]]:
    """Token ids of each case run alone, and the crop counts they used (this is also the warm-up)."""
    tokens, crops = [], set()
    for case, image in zip(cases, images):
        r = run_case(pipe, case, image)
        tokens.append(tuple(r.token_ids))
        crops.add(len(r.visual_tokens["per_image"]) - 1)
    return tokens, sorted(crops)


def run_soak(
    pipe,
    cases: Sequence[Case],
    *,
    requests: int | None = None,
    seconds: float | None = None,
    seed: int = 0,
    sample_every: int = 10,
    warmup_passes: int = 1,
    max_slope_mb: float = DEFAULT_MAX_SLOPE_MB,
    workdir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> SoakReport:
    """Send requests drawn from `cases` to `pipe` until `requests` are done or `seconds` have passed.

    Every case first runs `warmup_passes` times alone (the first run's tokens are the expected answer;
    a later warm-up run that differs is a mismatch). Then RSS and descriptors are sampled every
    `sample_every` requests. Errors are recorded (not raised) so the report shows all of them.
    """
    if requests is None and seconds is None:
        raise ValueError("give requests=N or seconds=S (or both) to bound the soak")
    say = log or (lambda _m: None)
    owned = None
    if workdir is None:
        owned = tempfile.TemporaryDirectory(prefix="hired-soak-")
        workdir = owned.name
    try:
        images = [materialize(c, workdir) for c in cases]
        report = SoakReport(cases=len(cases), max_slope_mb_per_1000=max_slope_mb)
        say(f"warm-up: {len(cases)} cases x {warmup_passes}")
        expected, report.crop_counts = expected_answers(pipe, cases, images)
        for _ in range(warmup_passes - 1):
            for case, image, want in zip(cases, images, expected):
                got = tuple(run_case(pipe, case, image).token_ids)
                if got != want:
                    report.mismatches.append(f"{case.name} warm-up: {got} != {want}")
        report.warmup_requests = len(cases) * warmup_passes

        rng = np.random.default_rng(seed)
        gc.collect()
        report.fds_start = fd_count()
        report.raw_rss_start_mb = rss_mb()
        report.rss_samples.append((0, rss_mb(trim=True)))
        t0 = time.perf_counter()
        i = 0
        while True:
            elapsed = time.perf_counter() - t0
            if (requests is not None and i >= requests) or (seconds is not None and elapsed >= seconds):
                break
            k = int(rng.integers(len(cases)))
            try:
                got = tuple(run_case(pipe, cases[k], images[k]).token_ids)
                if got != expected[k]:
                    report.mismatches.append(f"request {i} ({cases[k].name}): {got} != {expected[k]}")
            except Exception as e:  # recorded, so one failure does not hide the rest of the picture
                report.errors.append(f"request {i} ({cases[k].name}): {type(e).__name__}: {e}")
            i += 1
            if i % sample_every == 0:
                report.rss_samples.append((i, rss_mb(trim=True)))
                if i % (sample_every * 50) == 0:
                    say(f"{i} requests, {elapsed:.0f} s, RSS {report.rss_samples[-1][1]:.1f} MB")
        report.seconds = time.perf_counter() - t0
        report.requests = i
        gc.collect()
        report.fds_end = fd_count()
        report.raw_rss_end_mb = rss_mb()
        report.slope_mb_per_1000 = slope_per_1000(report.rss_samples)
        return report
    finally:
        if owned is not None:
            owned.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", default="artifacts/tiny", help="bundle folder (default artifacts/tiny)")
    p.add_argument("--minutes", type=float, default=10.0, help="how long to send requests (default 10)")
    p.add_argument("--requests", type=int, default=None, help="stop after this many requests (default: time only)")
    p.add_argument("--cases", type=int, default=42, help="distinct requests in the pool (default 42)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-every", type=int, default=10, help="requests between RSS samples (default 10)")
    p.add_argument("--warmup-passes", type=int, default=2, help="runs of each case before measuring (default 2)")
    p.add_argument("--max-slope", type=float, default=DEFAULT_MAX_SLOPE_MB, help="MB per 1000 requests (default 50)")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.cases < 1:
        p.error("--minutes must be > 0 and --cases >= 1")

    from runtime.errors import HiredError
    from runtime.pipeline import Pipeline

    try:
        pipe = Pipeline.load(args.artifacts)
    except HiredError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with pipe:
        report = run_soak(
            pipe,
            make_cases(args.cases, seed=args.seed),
            requests=args.requests,
            seconds=args.minutes * 60,
            seed=args.seed,
            sample_every=args.sample_every,
            warmup_passes=args.warmup_passes,
            max_slope_mb=args.max_slope,
            log=lambda m: print(f"[soak] {m}", file=sys.stderr, flush=True),
        )
    print(report.table())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    failures = report.failures()
    for f in failures:
        print(f"FAIL: {f}")
    print("PASS" if not failures else "FAILED")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
