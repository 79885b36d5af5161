"""A CI-sized soak (bench.soak): a few hundred varied requests to one Pipeline, memory flat, no handle leaks.

The long form is `make soak` (10 minutes). Here: warm up on every crop count (onnxruntime's arenas grow
with each new input shape, then stay), then 200 requests drawn from 8 cases covering 2, 3 and 4 crops,
every input kind and budgets 0.1-0.5 (`make soak` adds 1.0). The slope limit is
bench.soak.DEFAULT_MAX_SLOPE_MB, 50 MB per 1000 requests of live memory: keeping even one
vocabulary-logits vector (125 kB) per request would show as 125 MB per 1000, while allocator noise over a
couple of hundred requests stays within a few MB. The harness itself is checked against fakes that leak
memory, leak a file descriptor, or change an answer.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bench.soak import DEFAULT_MAX_SLOPE_MB, SIZES, make_cases, run_soak, slope_per_1000
from runtime.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = 200


@pytest.mark.slow
def test_soak_keeps_memory_flat_handles_closed_and_answers_unchanged(tiny_bundle, tmp_path):
    with Pipeline.load(tiny_bundle) as pipe:
        report = run_soak(
            pipe,
            make_cases(8, seed=1, budgets=(0.1, 0.2, 0.5), max_new_tokens=1),
            requests=REQUESTS,
            sample_every=5,
            workdir=tmp_path,
        )
    print(f"\n{report.table()}", file=sys.stderr)
    assert report.crop_counts == [2, 3, 4], "the warm-up must cover every crop count"
    assert report.requests == REQUESTS
    assert report.errors == []
    assert report.mismatches == []
    assert report.fds_end == report.fds_start
    assert report.slope_mb_per_1000 < DEFAULT_MAX_SLOPE_MB
    assert report.failures() == []


def test_the_case_pool_covers_every_size_and_input_kind():
    cases = make_cases(16)
    assert {c.size for c in cases} == set(SIZES)
    assert {c.kind for c in cases} == {"rgb", "bgr", "rgba", "gray", "pil", "png", "jpeg", "path"}
    assert {c.budget for c in cases} == {0.1, 0.2, 0.5, 1.0}
    assert make_cases(16) == cases  # reproducible


def test_slope_is_the_least_squares_line_in_mb_per_1000_requests():
    samples = [(i, 100.0 + 0.05 * i) for i in range(0, 500, 10)]  # 50 kB per request
    assert slope_per_1000(samples) == pytest.approx(50.0)
    assert slope_per_1000([(0, 5.0), (10, 5.0)]) == pytest.approx(0.0, abs=1e-9)
    assert slope_per_1000([(0, 5.0)]) == 0.0


class FakePipe:
    """Stands in for Pipeline.generate; can leak memory, leak a descriptor, or change its answer after a while."""

    def __init__(self, *, leak_bytes=0, leak_fd=False, drift_after=None):
        self.calls, self.kept, self.files = 0, [], []
        self.leak_bytes, self.leak_fd, self.drift_after = leak_bytes, leak_fd, drift_after

    def generate(self, image, prompt, **options):
        self.calls += 1
        if self.leak_bytes:
            self.kept.append(np.ones(self.leak_bytes, np.uint8))  # touched pages: counted in RSS
        if self.leak_fd:
            self.files.append(open(__file__, "rb"))  # the leak is the point
        drift = self.drift_after is not None and self.calls > self.drift_after
        return SimpleNamespace(token_ids=(7, 8 if drift else 9), visual_tokens={"per_image": (1, 1, 1)})

    def close_files(self):
        for f in self.files:
            f.close()


@pytest.mark.parametrize(
    "fake, failure",
    [
        (dict(leak_bytes=200_000), "memory leak"),
        (dict(leak_fd=True), "handle leak"),
        (dict(drift_after=10), "differ from the same request alone"),
    ],
)
def test_the_soak_catches_leaks_and_changed_answers(tmp_path, fake, failure):
    pipe = FakePipe(**fake)
    cases = make_cases(3, sizes=((8, 6),))
    try:
        report = run_soak(pipe, cases, requests=300, sample_every=10, workdir=tmp_path)
    finally:
        pipe.close_files()
    assert any(failure in f for f in report.failures()), report.failures()
    assert len(report.failures()) == 1, report.failures()


def test_cli_runs_and_prints_the_report(tiny_bundle, tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--artifacts", str(tiny_bundle), "--minutes", "5", "--requests", "6",
         "--cases", "3", "--warmup-passes", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "RSS slope" in proc.stdout and proc.stdout.strip().endswith("PASS")
    data = json.loads(out.read_text())
    assert data["requests"] == 6 and data["failures"] == [] and data["fds_start"] == data["fds_end"]
