"""`python -m bench --model NAME --quant int4|int8`: one quantized bundle's row: size, load RSS, one request's TTFT.

    python -m bench --model llava-next-7b --quant int4          # the 7B-shaped int4 row (not in the default run)
    python -m bench.quant_row --bundle artifacts/llava-next-7b-int4 --budget 0.2    # the measuring child

The bundle is ARTIFACTS/<NAME>-<quant>, exported once when missing (or with --force-export) by
`python -m export --model NAME --random-weights --quant Q` (unless checkpoints/NAME/ exists): a 7B takes the
streaming route, fp16 float parts, tensor-by-tensor quantization, about 20 minutes on 2 cores. The child loads
it in a fresh process (load RSS = peak RSS once `Pipeline.load` returns), runs one request at `budget` (TTFT =
preprocess + vision + select + projector + prefill; 2 new tokens), and prints one JSON line; the row adds the
bundle's size on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.images import synthetic_image
from bench.stages import DEFAULT_PROMPT, REPO_ROOT, measure_request, peak_rss_mb, run_child

QUANTS = ("int8", "int4")
ROW_IMAGE = (1000, 1000)  # 2x2 grid + base: 5 crops
ROW_NEW_TOKENS = 2


def quant_bundle(model: str, quant: str, artifacts: Path) -> Path:
    """Where the `quant` bundle of registry model `model` lives: ARTIFACTS/<model>-<quant>."""
    return artifacts / f"{model}-{quant}"


def export_command(model: str, quant: str, out: Path, *, force: bool) -> list[str]:
    """`python -m export ...` for the quantized bundle: checkpoints/<model>/ when there, else random weights."""
    checkpoint = REPO_ROOT / "checkpoints" / model
    cmd = [sys.executable, "-m", "export", "--out", str(out.resolve()), "--quant", quant]
    if (checkpoint / "config.json").is_file():
        cmd += ["--model", str(checkpoint)]
    else:
        cmd += ["--model", model, "--random-weights"]
    return cmd + (["--force"] if force else [])


def child_command(bundle: Path, budget: float, threads: int | None) -> list[str]:
    """The argv of the measuring child (a fresh interpreter, so its peak RSS is this bundle's alone)."""
    cmd = [sys.executable, "-m", "bench.quant_row", "--bundle", str(bundle.resolve()), "--budget", repr(budget)]
    return cmd + (["--threads", str(threads)] if threads is not None else [])


def bundle_bytes(bundle: Path) -> int:
    """The bundle's size on disk: every file in its folder."""
    return sum(f.stat().st_size for f in bundle.iterdir() if f.is_file())


def measure(bundle: Path, budget: float, threads: int | None = None, prompt: str = DEFAULT_PROMPT) -> dict:
    """Load `bundle`, then one request at `budget` on a 1000x1000 image (run alone in a process)."""
    from runtime.pipeline import Pipeline

    image = synthetic_image(width=ROW_IMAGE[0], height=ROW_IMAGE[1])
    t0 = time.perf_counter()
    with Pipeline.load(bundle, threads=threads) as pipe:
        load_ms = (time.perf_counter() - t0) * 1000.0
        load_rss = peak_rss_mb()
        run = measure_request(pipe, image, prompt, budget, ROW_NEW_TOKENS)
        quant = pipe.manifest.quant.method
    return {"budget": budget, "load_ms": load_ms, "load_rss_mb": load_rss, "ttft_ms": run["ttft_ms"],
            "prefill_tokens": run["prefill_tokens"], "peak_rss_mb": peak_rss_mb(), "quant": quant}  # fmt: skip


def quant_row(
    model: str,
    quant: str,
    artifacts: Path,
    *,
    budget: float,
    threads: int | None = None,
    force_export: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Export the `quant` bundle of `model` when missing, measure it in a child, print its row; returns the row."""
    bundle = quant_bundle(model, quant, artifacts)
    if force_export or not (bundle / "manifest.json").is_file():
        cmd = export_command(model, quant, bundle, force=force_export or bundle.exists())
        log(f"no bundle at {bundle}: exporting it once (about 20 minutes for a 7B): python {' '.join(cmd[1:])}")
        bundle.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
        done = subprocess.run(cmd, cwd=bundle.parent, env=env)  # not from the root: `bench/` is a folder there
        if done.returncode != 0 or not (bundle / "manifest.json").is_file():
            raise RuntimeError(f"export failed (exit {done.returncode}); its error is above. Re-run: {' '.join(cmd)}")
    row = run_child(child_command(bundle, budget, threads), cwd=bundle.resolve().parent)
    row.update(model=model, bundle=str(bundle), bundle_bytes=bundle_bytes(bundle))
    print(f"## {model} {quant} bundle (random weights; one request, {ROW_IMAGE[0]}x{ROW_IMAGE[1]}, budget {budget:g})\n")
    print("| bundle | size GiB | load ms | load RSS MiB | TTFT ms | prefill tokens | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| {bundle.name} | {row['bundle_bytes'] / 2**30:.2f} | {row['load_ms']:,.0f} | {row['load_rss_mb']:,.0f} "
          f"| {row['ttft_ms']:,.0f} | {row['prefill_tokens']} | {row['peak_rss_mb']:,.0f} |\n")  # fmt: skip
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quant_row", description="Measure one bundle: load RSS, TTFT.")
    p.add_argument("--bundle", required=True, help="the bundle folder")
    p.add_argument("--budget", type=float, default=0.2, help="HiRED rate of the one request (default 0.2)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: the cores)")
    args = p.parse_args(argv)
    print(json.dumps(measure(Path(args.bundle), args.budget, args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
