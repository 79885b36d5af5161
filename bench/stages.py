"""The stage table: per budget and image, kept visual tokens and the median time of every pipeline stage.

    from bench.stages import run_stage_table, stage_rows
    results = run_stage_table("artifacts/bench", budgets=(1.0, 0.2), sizes=((1000, 1000),), runs=3)
    rows = stage_rows(results)     # medians: preprocess_ms ... prefill_ms, ttft_ms, decode_tok_s, peak_rss_mb

Every (budget, image) case runs in its OWN process (`python -m bench.stages --bundle DIR --size WxH --budget R`),
because a process's peak RSS never goes down: the child loads the bundle, runs `warmup` untimed and `runs` timed
requests, and prints one JSON line with its raw runs and its peak RSS (peak_rss_mb: VmHWM).

One timed request: `Pipeline.generate(image, prompt, budget=R, max_new_tokens=n, min_new_tokens=n, trace=...)`,
the real runtime code, gives preprocess, vision, select, projector, prefill and decode times and the kept visual
tokens. `min_new_tokens` keeps EOS from ending the answer early (random weights may emit it at any point), so
the decode covers exactly `new_tokens` tokens. decode_tok_s = (new_tokens - 1) / decode time: the first token
comes from the prefill's logits, each later one from a decoder step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from bench.images import format_size, parse_size, synthetic_image
from bench.metrics import TTFT_STAGES, summarize_runs, ttft_ms

DEFAULT_BUDGETS: tuple[float, ...] = (1.0, 0.4, 0.2, 0.1)
DEFAULT_PROMPT = "Describe this picture in detail: the objects, their colours and where they are."
REPO_ROOT = Path(__file__).resolve().parent.parent


def rss_mb(field: str = "VmHWM") -> float | None:
    """This process's resident memory from /proc/self/status in MiB: its peak (VmHWM) or now (VmRSS); None off
    Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB: VmHWM on Linux, not ru_maxrss, which Linux keeps
    across execve (a child started by a parent that once held 1 GiB would report the parent's peak)."""
    peak = rss_mb("VmHWM")
    if peak is not None:
        return peak
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024.0 if sys.platform != "darwin" else kib / 2**20


def measure_request(pipe, image: np.ndarray, prompt: str, budget: float, new_tokens: int) -> dict:
    """One timed request (see the module docstring): stage ms, ttft_ms, decode_tok_s and token counts."""
    from runtime.pipeline import Trace

    trace = Trace()
    r = pipe.generate(
        image, prompt, budget=budget, max_new_tokens=new_tokens, min_new_tokens=new_tokens, trace=trace
    )
    prefill_tokens = int(trace.inputs_embeds.shape[0])
    del trace  # the arrays of one request are not kept across runs
    if len(r.token_ids) != new_tokens:
        raise RuntimeError(f"generate made {len(r.token_ids)} tokens with min_new_tokens={new_tokens}")
    decode_s = r.timings_ms["decode"] / 1000.0
    kept = int(r.visual_tokens["kept"])
    run = {f"{k}_ms": float(r.timings_ms[k]) for k in TTFT_STAGES}
    run["ttft_ms"] = ttft_ms(r.timings_ms)
    run["decode_ms"] = decode_s * 1000.0
    run["decode_tok_s"] = (new_tokens - 1) / decode_s if decode_s > 0 else float("inf")
    run["kept"] = kept
    run["before"] = int(r.visual_tokens["before"])
    run["per_image"] = [int(x) for x in r.visual_tokens["per_image"]]
    run["prefill_tokens"] = prefill_tokens
    run["text_tokens"] = prefill_tokens - kept
    return run


def measure_case(
    bundle: str | os.PathLike,
    size: tuple[int, int],
    budget: float,
    *,
    runs: int,
    warmup: int,
    new_tokens: int,
    prompt: str = DEFAULT_PROMPT,
    threads: int | None = None,
) -> dict:
    """Load `bundle`, then `warmup` untimed and `runs` timed requests of one image size at one budget.

    Meant to run alone in a process (the peak RSS it reports is the process's). Returns the raw record:
    image, budget, runs (list of `measure_request` dicts), warmup, new_tokens, load_ms, peak_rss_mb, provider.
    """
    from runtime.pipeline import Pipeline

    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    image = synthetic_image(width=size[0], height=size[1])
    t0 = time.perf_counter()
    pipe = Pipeline.load(bundle, threads=threads)
    load_ms = (time.perf_counter() - t0) * 1000.0
    try:
        for _ in range(warmup):
            measure_request(pipe, image, prompt, budget, new_tokens)
        timed = [measure_request(pipe, image, prompt, budget, new_tokens) for _ in range(runs)]
        provider = pipe.provider
    finally:
        pipe.close()
    return {
        "image": format_size(size),
        "budget": float(budget),
        "runs": timed,
        "warmup": int(warmup),
        "new_tokens": int(new_tokens),
        "load_ms": load_ms,
        "peak_rss_mb": peak_rss_mb(),
        "provider": provider,
    }


def child_command(
    bundle: str | os.PathLike,
    size: tuple[int, int],
    budget: float,
    *,
    runs: int,
    warmup: int,
    new_tokens: int,
    prompt: str,
    threads: int | None,
) -> list[str]:
    """The argv that measures one case in a fresh interpreter (`python -m bench.stages ...`)."""
    cmd = [
        sys.executable, "-m", "bench.stages", "--bundle", str(Path(bundle).resolve()), "--size", format_size(size),
        "--budget", repr(float(budget)), "--runs", str(runs), "--warmup", str(warmup),
        "--new-tokens", str(new_tokens), "--prompt", prompt,
    ]  # fmt: skip
    if threads is not None:
        cmd += ["--threads", str(threads)]
    return cmd


def run_child(cmd: Sequence[str], cwd: str | os.PathLike = REPO_ROOT) -> dict:
    """Run one child measurement in `cwd` (the packages stay importable through PYTHONPATH); its stderr passes
    through, its last stdout line is the JSON record."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run(list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"benchmark child failed (exit {proc.returncode}); its error is printed above. "
            f"Reproduce with: {shlex.join(cmd)}"
        )
    return json.loads(lines[-1])


def run_stage_table(
    bundle: str | os.PathLike,
    *,
    budgets: Iterable[float] = DEFAULT_BUDGETS,
    sizes: Iterable[tuple[int, int]] = ((1000, 1000), (1280, 640)),
    runs: int = 3,
    warmup: int = 1,
    new_tokens: int = 32,
    prompt: str = DEFAULT_PROMPT,
    threads: int | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Measure every (image size, budget) case, each in its own child process; returns the raw records
    (see `measure_case`) in image-major, budget order."""
    say = log or (lambda _m: None)
    out = []
    for size in sizes:
        for budget in budgets:
            t0 = time.perf_counter()
            say(f"image {format_size(size)}, budget {budget}: {warmup} warm-up + {runs} timed runs ...")
            cmd = child_command(
                bundle,
                size,
                budget,
                runs=runs,
                warmup=warmup,
                new_tokens=new_tokens,
                prompt=prompt,
                threads=threads,
            )
            record = run_child(cmd)
            say(
                f"  done in {time.perf_counter() - t0:.1f} s (kept {record['runs'][0]['kept']} visual tokens)"
            )
            out.append(record)
    return out


def stage_row(record: Mapping) -> dict:
    """One table row from a raw record: medians of every timed number, the token counts, the peak RSS."""
    med = summarize_runs(record["runs"])
    first = record["runs"][0]
    row = {"image": record["image"], "budget": float(record["budget"])}
    for key in ("kept", "before", "prefill_tokens", "text_tokens"):
        row[key] = int(first[key])
    row["per_image"] = list(first["per_image"])
    for key in (*(f"{k}_ms" for k in TTFT_STAGES), "ttft_ms", "decode_ms", "decode_tok_s"):
        row[key] = med[key]
    row["peak_rss_mb"] = float(record["peak_rss_mb"])
    row["runs"] = len(record["runs"])
    row["new_tokens"] = int(record["new_tokens"])
    return row


def stage_rows(records: Iterable[Mapping]) -> list[dict]:
    """`stage_row` of each record, in order."""
    return [stage_row(r) for r in records]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.stages",
        description="Measure one (image size, budget) case in this process and print its raw runs as one JSON line "
        "(the child that `python -m bench` starts for each case).",
    )
    p.add_argument("--bundle", required=True, help="ONNX bundle folder (with manifest.json)")
    p.add_argument(
        "--size", type=parse_size, required=True, help="synthetic image size WIDTHxHEIGHT, e.g. 1000x1000"
    )
    p.add_argument("--budget", type=float, required=True, help="HiRED budget rate (1.0 = stock model)")
    p.add_argument("--runs", type=int, default=3, help="timed requests (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests first (default 1)")
    p.add_argument(
        "--new-tokens", type=int, default=32, help="tokens decoded per request, EOS ignored (default 32)"
    )
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="user prompt (the bundle's template wraps it)")
    p.add_argument(
        "--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own)"
    )
    args = p.parse_args(argv)
    record = measure_case(
        args.bundle, args.size, args.budget, runs=args.runs, warmup=args.warmup, new_tokens=args.new_tokens,
        prompt=args.prompt, threads=args.threads,
    )  # fmt: skip
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
