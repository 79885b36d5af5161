"""`python -m bench --model NAME --quant int4|int8`: one quantized bundle's row: size, load RSS, one request's TTFT.

    python -m bench --model llava-next-7b --quant int4          # the 7B-shaped int4 row (not in the default run)
    python -m bench --model llava-next-7b --quant int4 --block-size 128     # ARTIFACTS/llava-next-7b-int4-b128
    python -m bench.quant_row --bundle artifacts/llava-next-7b-int4 --budget 0.2    # the measuring child

The bundle is ARTIFACTS/<NAME>-<quant> at the exporter's default block size (export.defaults.DEFAULT_BLOCK_SIZE),
ARTIFACTS/<NAME>-<quant>-b<N> at `--block-size N`, written by `python -m export --model NAME --random-weights --dtype
fp16 --quant Q --block-size N` (checkpoints/NAME/ instead of random weights when it exists): a 7B takes the streaming
route, fp16 float parts, tensor-by-tensor quantization, 8-30 minutes on 2 cores. It is exported when missing, with
--force-export, and when stale (`stale_reason`): its manifest declares another quantization, block size or float
dtype, or the exporter's sources (export/, models/) are not those that wrote it. Their digest is recorded beside
the bundle, in <bundle>.export.json, when this row exports it; a bundle exported by hand (no record, or one older
than its manifest) is stale when one of those files is newer than its manifest. A larger block packs smaller: the
CPU kernel's int8-compute layout holds an fp32 scale and block sum per block (~0.75 byte/weight at block 32).

The child loads the bundle in a fresh process with the runtime's own session options (load RSS = peak RSS once
`Pipeline.load` returns), runs one request at `budget` (TTFT = preprocess + vision + select + projector + prefill;
ROW_NEW_TOKENS new tokens, so s/token is the mean of ROW_NEW_TOKENS - 1 decoder steps) and prints one JSON line;
the row adds the bundle's size on disk. Its title names the manifest's block size and quant.accuracy_level: 4 (int8 activations,
MLAS CompInt8) or 1 (fp32), the setting that trades the decoder's packed-weight memory against decode speed.
"""

from __future__ import annotations

import argparse
import hashlib
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
ROW_NEW_TOKENS = 4  # the first from the prefill's logits, three decoder steps
ROW_DTYPE = "fp16"  # the float parts (vision, projector, embeddings) of the row's bundle
EXPORTER_SOURCES = ("export", "models")  # what writes a --random-weights bundle (graphs, weights, configs)


def default_block_size() -> int:
    """The exporter's default --block-size (export.defaults, read at call time)."""
    from export import defaults

    return defaults.DEFAULT_BLOCK_SIZE


def quant_bundle(model: str, quant: str, artifacts: Path, block_size: int | None = None) -> Path:
    """Where the `quant` bundle of registry model `model` lives: ARTIFACTS/<model>-<quant> at the exporter's default
    block size (None), ARTIFACTS/<model>-<quant>-b<block_size> at any other."""
    if block_size is None or block_size == default_block_size():
        return artifacts / f"{model}-{quant}"
    return artifacts / f"{model}-{quant}-b{block_size}"


def export_record(bundle: Path) -> Path:
    """The file beside `bundle` that says which exporter sources wrote it (not in the bundle: not in its size)."""
    return bundle.with_name(bundle.name + ".export.json")


def exporter_files(root: Path = REPO_ROOT) -> list[Path]:
    """The exporter's source files: every .py and .json under export/ and models/, sorted."""
    return sorted(f for d in EXPORTER_SOURCES for f in (root / d).rglob("*") if f.suffix in (".py", ".json"))


def exporter_digest(root: Path = REPO_ROOT) -> str:
    """sha256 over the exporter's source files (relative path and content of each)."""
    h = hashlib.sha256()
    for f in exporter_files(root):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def stale_reason(bundle: Path, quant: str, root: Path = REPO_ROOT, block_size: int | None = None) -> str | None:
    """Why `bundle` must be (re-)exported before its row is measured, or None when it can be measured as it is.

    `block_size`: the one the row asks for (None: the exporter's default), against the manifest's quant.block_size."""
    manifest_path = bundle / "manifest.json"
    if not manifest_path.is_file():
        return f"no bundle at {bundle}"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        return f"{manifest_path} cannot be read ({e})"
    method = (manifest.get("quant") or {}).get("method", "none")
    blocks = (manifest.get("quant") or {}).get("block_size")
    block_size = default_block_size() if block_size is None else block_size
    dtype = (manifest.get("model") or {}).get("dtype")
    if method != quant:
        return f"{bundle} is quantized {method!r}, the row needs {quant!r}"
    if blocks != block_size:
        return f"{bundle} has quant block size {blocks}, the row needs {block_size}"
    if dtype != ROW_DTYPE:
        return f"{bundle} has {dtype} float parts, the row needs {ROW_DTYPE}"
    record = export_record(bundle)
    written = manifest_path.stat().st_mtime
    if record.is_file() and record.stat().st_mtime >= written:  # a later hand export leaves an older record
        try:
            recorded = json.loads(record.read_text()).get("exporter_sha256")
        except (OSError, ValueError):
            recorded = None
        if recorded != exporter_digest(root):
            return f"{bundle} was written by other exporter sources than today's ({record} says so)"
        return None
    newer = [f.relative_to(root).as_posix() for f in exporter_files(root) if f.stat().st_mtime > written]
    if newer:
        return f"{bundle} is older than {', '.join(newer[:3])}{' ...' if len(newer) > 3 else ''} (exported by hand)"
    return None


def export_command(model: str, quant: str, out: Path, *, force: bool, block_size: int | None = None) -> list[str]:
    """`python -m export ...` for the quantized bundle: checkpoints/<model>/ when there, else random weights;
    --block-size `block_size` (None: the exporter's default, said explicitly)."""
    checkpoint = REPO_ROOT / "checkpoints" / model
    block_size = default_block_size() if block_size is None else block_size
    cmd = [sys.executable, "-m", "export", "--out", str(out.resolve()), "--dtype", ROW_DTYPE, "--quant", quant,
           "--block-size", str(block_size)]  # fmt: skip
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
        quant = pipe.manifest.quant
    return {"budget": budget, "load_ms": load_ms, "load_rss_mb": load_rss, "ttft_ms": run["ttft_ms"],
            "prefill_tokens": run["prefill_tokens"], "s_per_token": 1.0 / run["decode_tok_s"],
            "peak_rss_mb": peak_rss_mb(), "quant": quant.method, "block_size": quant.block_size,
            "accuracy_level": quant.accuracy_level}  # fmt: skip


def quant_row(
    model: str,
    quant: str,
    artifacts: Path,
    *,
    budget: float,
    threads: int | None = None,
    force_export: bool = False,
    block_size: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Export the `quant` bundle of `model` at `block_size` (None: the exporter's default) when missing or stale,
    measure it in a child, print its row."""
    bundle = quant_bundle(model, quant, artifacts, block_size)
    reason = "--force-export" if force_export else stale_reason(bundle, quant, block_size=block_size)
    if reason is not None:
        cmd = export_command(model, quant, bundle, force=bundle.exists(), block_size=block_size)
        digest = exporter_digest()
        log(f"{reason}: exporting it (20-30 minutes for a 7B): python {' '.join(cmd[1:])}")
        bundle.parent.mkdir(parents=True, exist_ok=True)
        export_record(bundle).unlink(missing_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
        done = subprocess.run(cmd, cwd=bundle.parent, env=env)  # not from the root: `bench/` is a folder there
        if done.returncode != 0 or not (bundle / "manifest.json").is_file():
            raise RuntimeError(f"export failed (exit {done.returncode}); its error is above. Re-run: {' '.join(cmd)}")
        export_record(bundle).write_text(json.dumps({"exporter_sha256": digest, "command": cmd[1:]}, indent=1) + "\n")
    row = run_child(child_command(bundle, budget, threads), cwd=bundle.resolve().parent)
    row.update(model=model, bundle=str(bundle), bundle_bytes=bundle_bytes(bundle))
    print(f"## {model} {quant} bundle (random weights, MatMulNBits block {row['block_size']}, "
          f"accuracy_level {row['accuracy_level']}; one request, "
          f"{ROW_IMAGE[0]}x{ROW_IMAGE[1]}, budget {budget:g})\n")  # fmt: skip
    print("| bundle | size GiB | load ms | load RSS MiB | TTFT ms | prefill tokens | s/token | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {bundle.name} | {row['bundle_bytes'] / 2**30:.2f} | {row['load_ms']:,.0f} | {row['load_rss_mb']:,.0f} "
          f"| {row['ttft_ms']:,.0f} | {row['prefill_tokens']} | {row['s_per_token']:.2f} | {row['peak_rss_mb']:,.0f} |\n")  # fmt: skip
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
