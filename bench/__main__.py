"""`make bench`: what HiRED buys, stage by stage, against the stock model and against transformers.

    python -m bench                          # the `bench` shape (random weights), exported to artifacts/bench once
    python -m bench --model llava-next-7b    # any registry entry (a 7B needs ~30 GB of RAM to export and run)
    python -m bench --bundle artifacts/tiny --quick --skip-torch      # seconds, for tests
    python -m bench --help                   # every flag

Prints, for budgets 1.0 / 0.4 / 0.2 / 0.1 on two image shapes (1000x1000 -> 2x2 grid, 1280x640 -> 1x2 grid):
1. the stage table: kept visual tokens, median preprocess / vision / select / projector / prefill ms, TTFT,
   decode tok/s over 32 forced tokens, peak RSS (each case in its own process);
2. the model's vision/LLM FLOP split next to llava-next-7b's;
3. TTFT speed-up over budget 1.0, measured vs ideal from token counts alone;
4. the runtime against transformers' LlavaNext (budget 1.0) and export/reference.py (0.2) on the same model;
5. HiRED's selection overhead alone (plan + select + pack, 5-crop layout, median of 1,000 calls);
6. the LLM engine against onnxruntime-genai: the decoder none/int8/int4 vs genai fp32/int4 at the prefill
   lengths of budgets 1.0 and 0.2, interleaved rounds (bench.llm_peer; --skip-peer);
7. every token selector's overhead (hired.selectors: hired, cls, uniform, random, visionzip; same case as 5.);
8. the governor: budget="auto" against a TTFT target on 20 images of varied size (bench.governor).
Writes the raw runs as JSON and a stacked-bar PNG under bench-results/ and prints their paths.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from bench import report
from bench.images import DEFAULT_SIZES, format_size, parse_size
from bench.metrics import speedups
from bench.overhead import overhead_lines, selection_overhead_us, selector_overheads_us
from bench.stages import DEFAULT_BUDGETS, DEFAULT_PROMPT, REPO_ROOT, run_child, run_stage_table, stage_rows

QUICK = {"runs": 1, "warmup": 0, "new_tokens": 2, "overhead_calls": 100, "governor_images": 2}
FULL = {"runs": 3, "warmup": 1, "new_tokens": 32, "overhead_calls": 1000, "governor_images": 20}
REFERENCE_BUDGET = 0.2


def _say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the bundle


def bundle_for(model: str, artifacts: Path) -> tuple[Path, Path | None]:
    """(bundle folder, checkpoint folder or None) for a registry name, a bundle folder or a checkpoint folder.

    A registry name wins over a folder of the same name (`bench` is also this package's folder)."""
    from models import registry

    if model in registry.names():
        return artifacts / model, None
    path = Path(model)
    if (path / "manifest.json").is_file():
        return path, None
    if (path / "config.json").is_file():
        return artifacts / path.name, path
    raise SystemExit(
        f"[bench] --model {model!r} is neither a registry name ({', '.join(registry.names())}), a bundle folder "
        "(manifest.json) nor a checkpoint folder (config.json)"
    )


def export_command(model: str, out: Path, checkpoint: Path | None, force: bool) -> list[str]:
    """`python -m export ...` for a bundle that is missing: from the checkpoint folder when there is one,
    else from checkpoints/<name>/ when built or downloaded, else with seeded random weights."""
    cmd = [sys.executable, "-m", "export", "--out", str(out.resolve())]
    if checkpoint is not None:
        cmd += ["--model", str(checkpoint.resolve())]
    elif (REPO_ROOT / "checkpoints" / model / "config.json").is_file():
        cmd += ["--model", str(REPO_ROOT / "checkpoints" / model)]
    else:
        cmd += ["--model", model, "--random-weights"]
    if force:
        cmd.append("--force")
    return cmd


def ensure_bundle(model: str, artifacts: Path, *, force_export: bool) -> Path:
    """The bundle of `model`, exported (with progress on stderr) when it is missing or --force-export."""
    bundle, checkpoint = bundle_for(model, artifacts)
    if (bundle / "manifest.json").is_file() and not force_export:
        return bundle
    cmd = export_command(model, bundle, checkpoint, force=force_export or bundle.exists())
    _say(
        f"no bundle at {bundle}: exporting it once (about 2 minutes for `bench`): python {' '.join(cmd[1:])}"
    )
    t0 = time.perf_counter()
    # Run from the artifacts folder: `python -m export --model bench` run from the repository root would take
    # this package's folder `bench/` for a checkpoint folder. PYTHONPATH keeps the packages importable.
    bundle.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, cwd=bundle.parent, env=env)
    if proc.returncode != 0 or not (bundle / "manifest.json").is_file():
        raise SystemExit(
            f"[bench] export failed (exit {proc.returncode}); its error is above. Re-run: {' '.join(cmd)}"
        )
    _say(f"exported {bundle} in {time.perf_counter() - t0:.1f} s")
    return bundle


# ----------------------------------------------------------------------------- FLOPs


def flop_split_lines(manifest) -> tuple[list[str], dict]:
    """Printed lines and JSON facts: the model's vision/LLM FLOP split next to llava-next-7b's."""
    from models import registry

    facts: dict = {}
    name = manifest.model.name
    config = None
    if name in registry.names():
        config = registry.get(name).config
    else:
        src = Path(manifest.model.source or "") / "config.json"
        if src.is_file():
            import json

            config = json.loads(src.read_text(encoding="utf-8"))
    ref = registry.get("llava-next-7b").config
    rows = [("llava-next-7b", ref)] + (
        [(name, config)] if config is not None and name != "llava-next-7b" else []
    )
    lines = ["vision/LLM FLOP split (5 crops through the tower vs a 2,958-token full-budget prefill):"]
    for label, cfg in rows:
        v, t = registry.vision_flops(cfg), registry.llm_prefill_flops(cfg)
        facts[label] = {"vision_gflops": v / 1e9, "llm_prefill_gflops": t / 1e9, "split": v / t}
        lines.append(
            f"  {label:<16} vision {v / 1e9:9,.0f} GFLOP   LLM prefill {t / 1e9:9,.0f} GFLOP   split {v / t:6.2%}"
        )
    if config is None:
        lines.append(f"  ({name}: no registry entry or config.json beside its source, so no split)")
    return lines, facts


# ----------------------------------------------------------------------------- comparisons


def torch_side(bundle: Path, sizes, settings: dict, prompt: str, threads: int | None = None) -> dict:
    """Run bench.torch_side in its own process (it imports torch) and return its JSON record."""
    cmd = [
        sys.executable, "-m", "bench.torch_side", "--bundle", str(bundle.resolve()),
        "--sizes", ",".join(format_size(s) for s in sizes), "--runs", str(settings["runs"]),
        "--warmup", str(settings["warmup"]), "--new-tokens", str(settings["new_tokens"]),
        "--reference-budget", str(REFERENCE_BUDGET), "--prompt", prompt,
    ]  # fmt: skip
    if threads is not None:
        cmd += ["--threads", str(threads)]
    # Not from the repository root, where models.load would take the package folder `bench/` for the
    # checkpoint folder of the registry model `bench`.
    return run_child(cmd, cwd=bundle.resolve().parent)


def comparisons(rows: Sequence[dict], torch_record: dict) -> list[dict]:
    """Runtime vs transformers at 1.0 and vs the reference at 0.2, per image (where both sides ran)."""
    out = []
    for case in torch_record["cases"]:
        mine = next(
            (r for r in rows if r["image"] == case["image"] and abs(r["budget"] - case["budget"]) < 1e-9),
            None,
        )
        if mine is None:
            continue
        out.append(
            {
                "image": case["image"],
                "budget": case["budget"],
                "baseline": "transformers" if case["baseline"] == "transformers" else "export/reference.py",
                "runtime_ttft_ms": mine["ttft_ms"],
                "baseline_ttft_ms": case["ttft_ms"],
                "runtime_tok_s": mine["decode_tok_s"],
                "baseline_tok_s": case["decode_tok_s"],
                "runtime_prefill_tokens": mine["prefill_tokens"],
                "baseline_prefill_tokens": int(case["prefill_tokens"]),
            }
        )
    return out


def overhead_share(us: float, rows: Sequence[dict], budget: float = REFERENCE_BUDGET) -> dict | None:
    """The selection overhead as a share of the runtime's TTFT on a 5-image (2x2 grid) case at `budget`."""
    cands = [r for r in rows if len(r["per_image"]) == 5]
    if not cands:
        return None
    row = min(cands, key=lambda r: abs(r["budget"] - budget))
    return {
        "image": row["image"],
        "budget": row["budget"],
        "ttft_ms": row["ttft_ms"],
        "share": us / 1000.0 / row["ttft_ms"],
        "pipeline_select_ms": row["select_ms"],
    }


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The `python -m bench` command line (every flag has a help text)."""
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark HiRED in the onnxruntime runtime stage by stage, against the stock model (budget 1.0), "
        "transformers and the PyTorch reference. Prints markdown tables; writes raw runs (JSON) and a stacked-bar "
        "PNG under --out.",
        epilog="Definitions: TTFT = preprocess + vision + select + projector + prefill (until the first token's "
        "logits); decode tok/s = (N-1) / time from the first to the last of N tokens; peak RSS = the peak resident memory (VmHWM) of the "
        "process that ran one (image, budget) case alone. Bare `python -m bench` exports artifacts/bench on first use "
        "(about 1.5 minutes); a full run then took 7.3 minutes on a quiet 2-core box.",
    )
    p.add_argument("--model", default="bench",
                   help="registry name (bench, tiny, llava-next-7b, ...) or checkpoint folder; its bundle is "
                   "ARTIFACTS/<name>, exported on first use (random weights unless checkpoints/<name>/ exists); default bench")  # fmt: skip
    p.add_argument(
        "--bundle", default=None, help="use this existing bundle folder instead of --model (no export)"
    )
    p.add_argument(
        "--artifacts",
        default=str(REPO_ROOT / "artifacts"),
        help="where --model bundles live (default: artifacts/ of the repository)",
    )
    p.add_argument(
        "--force-export", action="store_true", help="re-export the --model bundle even if it exists"
    )
    p.add_argument("--budgets", default=",".join(str(b) for b in DEFAULT_BUDGETS),
                   help="comma-separated HiRED rates; 1.0 (the stock model) is the reference of the speed-ups (default 1.0,0.4,0.2,0.1)")  # fmt: skip
    p.add_argument("--images", default=",".join(format_size(s) for s in DEFAULT_SIZES),
                   help="comma-separated WIDTHxHEIGHT synthetic image sizes (default 1000x1000,1280x640: 2x2 and 1x2 grids)")  # fmt: skip
    p.add_argument(
        "--runs",
        type=int,
        default=None,
        help=f"timed runs per case, median reported [{FULL['runs']}; quick {QUICK['runs']}]",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help=f"untimed runs per case first [{FULL['warmup']}; quick {QUICK['warmup']}]",
    )
    p.add_argument("--new-tokens", type=int, default=None,
                   help=f"tokens decoded per run (min_new_tokens: EOS cannot end it early); decode tok/s = (N-1) / decode time [{FULL['new_tokens']}; quick {QUICK['new_tokens']}]")  # fmt: skip
    p.add_argument("--overhead-calls", type=int, default=None,
                   help=f"calls of plan+select+pack timed for the selection overhead [{FULL['overhead_calls']}; quick {QUICK['overhead_calls']}]")  # fmt: skip
    p.add_argument("--governor-images", type=int, default=None,
                   help=f"images for the budget='auto' section, 0 skips it [{FULL['governor_images']}; quick {QUICK['governor_images']}]")  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help="smoke-test settings: 1 run, no warm-up, 2 new tokens, 100 overhead calls (flags given explicitly win)")  # fmt: skip
    p.add_argument("--skip-peer", action="store_true",
                   help="skip the LLM engine vs onnxruntime-genai section (bench.llm_peer; minutes; also skipped "
                   "with --bundle or --quick)")
    p.add_argument("--skip-torch", action="store_true",
                   help="skip the transformers / export/reference.py comparison (needs torch + the source model)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads of onnxruntime and of torch (default: each library's own choice, the cores)")  # fmt: skip
    p.add_argument("--quant", choices=("none", "int8", "int4"), default="none",
                   help="instead of the tables: the row of ARTIFACTS/<model>-<quant> (size, load RSS, TTFT of one request at "
                   "budget 0.2; exported on first use: ~20 min for a 7B); bench.quant_row")  # fmt: skip
    p.add_argument("--block-size", type=int, default=None, metavar="N",
                   help="with --quant: MatMulNBits values per scale, a power of 2 >= 16 (default: the exporter's); "
                   "other than the default, the bundle is ARTIFACTS/<model>-<quant>-b<N>")  # fmt: skip
    p.add_argument("--prompt", default=DEFAULT_PROMPT,
                   help="the user prompt, wrapped in the bundle's template (default: a describe-the-picture request)")  # fmt: skip
    p.add_argument("--out", default=str(REPO_ROOT / "bench-results"),
                   help="folder for the JSON and PNG files (default: bench-results/ of the repository)")  # fmt: skip
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parsed flags with the --quick or full defaults filled in, plus `budget_list` and `sizes`."""
    p = build_parser()
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.budget_list = tuple(float(b) for b in args.budgets.split(",") if b.strip())
        args.sizes = tuple(parse_size(s) for s in args.images.split(",") if s.strip())
    except ValueError as e:
        p.error(str(e))
    if args.block_size is not None:
        if args.quant == "none":
            p.error("--block-size is for --quant int4|int8 (the quantized row); add --quant or drop --block-size")
        from export.quantize import check_block_size

        try:
            check_block_size(args.block_size)
        except ValueError as e:
            p.error(str(e))
    if not args.budget_list or not all(0 < b <= 1 for b in args.budget_list):
        p.error(f"--budgets must be comma-separated rates in (0, 1], got {args.budgets!r}")
    if args.runs < 1 or args.warmup < 0 or args.new_tokens < 2 or args.overhead_calls < 1 or args.governor_images < 0:
        p.error("need --runs >= 1, --warmup >= 0, --new-tokens >= 2, --overhead-calls >= 1 and --governor-images >= 0")
    return args


def run(args: argparse.Namespace) -> dict:
    """Everything `main` does except printing the final file paths; returns the results dict (also written)."""
    from runtime.manifest import Manifest

    t_start = time.perf_counter()
    settings = {k: getattr(args, k) for k in FULL}
    bundle = (
        Path(args.bundle)
        if args.bundle
        else ensure_bundle(args.model, Path(args.artifacts), force_export=args.force_export)
    )
    manifest = Manifest.from_file(bundle)
    name = manifest.model.name
    print(f"# hired-edge benchmark: {name} ({bundle})\n")
    print(
        f"model {name}: {manifest.model.dtype}, "
        + (
            "RANDOM weights (timings only; the text is meaningless)"
            if manifest.model.random_weights
            else "real weights"
        )
        + f"; {os.cpu_count()} CPU cores; runs {settings['runs']} after {settings['warmup']} warm-up, "
        f"{settings['new_tokens']} new tokens (EOS ignored)"
    )
    busy = _busy_warning()
    if busy:
        print(busy)
    lines, flops = flop_split_lines(manifest)
    print("\n".join(lines) + "\n")

    records = run_stage_table(
        bundle, budgets=args.budget_list, sizes=args.sizes, runs=settings["runs"], warmup=settings["warmup"],
        new_tokens=settings["new_tokens"], prompt=args.prompt, threads=args.threads, log=_say,
    )  # fmt: skip
    rows = stage_rows(records)
    print("## Stage table (median ms; TTFT = preprocess + vision + select + projector + prefill)\n")
    print(report.stage_table_md(rows) + "\n")

    ups = speedups(rows)
    print("## TTFT speed-up over budget 1.0: measured vs ideal from token counts\n")
    print(
        "ideal = (vision + prefill_full) / (vision + prefill_full * kept_tokens_total / full_tokens_total)\n"
    )
    print(report.speedup_table_md(ups) + "\n")

    comp, torch_record = [], None
    if not args.skip_torch:
        _say("timing transformers (budget 1.0) and export/reference.py (budget 0.2) on the same model ...")
        t0 = time.perf_counter()
        torch_record = torch_side(bundle, args.sizes, settings, args.prompt, args.threads)
        _say(f"  done in {time.perf_counter() - t0:.1f} s")
        comp = comparisons(rows, torch_record)
        print("## Runtime vs what a user would run instead (PyTorch on CPU, same model and images)\n")
        print(
            f"transformers {torch_record['transformers']}, torch {torch_record['torch']} "
            f"({torch_record['torch_threads']} threads); weights: {torch_record['weights']}; "
            + (
                "identical to the bundle's (embeddings checked)"
                if torch_record["same_weights"]
                else "NOT the bundle's weights: a speed comparison on the same shapes only"
            )  # fmt: skip
            + f"; peak RSS of the PyTorch process {torch_record['peak_rss_mb']:,.0f} MB\n"
        )
        print(report.comparison_table_md(comp) + "\n")
        print(
            "ratios: TTFT runtime/baseline < 1 and decode runtime/baseline > 1 mean the runtime is faster\n"
        )

    _say(f"timing plan_budget + select_tokens + pack_tokens alone ({settings['overhead_calls']} calls) ...")
    us = selection_overhead_us(
        settings["overhead_calls"], grid_pinpoints=manifest.image_processor.grid_pinpoints
    )
    share = overhead_share(us, rows)
    print(
        "## Selection overhead (plan_budget + select_tokens + pack_tokens, 1000x1000 -> 5 images of 576 tokens)\n"
    )
    line = f"median {us:,.0f} us per request over {settings['overhead_calls']:,} calls"
    if share is not None:
        line += (
            f" = {share['share']:.2%} of the runtime's TTFT at budget {share['budget']:g} on {share['image']} "
            f"({share['ttft_ms']:,.0f} ms; the pipeline's own select stage: {share['pipeline_select_ms']:.2f} ms)"
        )
    print(line + "\n")
    overhead = {"median_us": us, "calls": settings["overhead_calls"], "share_of_ttft": share}
    _say("timing every token selector alone (hired.selectors) ...")
    per = selector_overheads_us(settings["overhead_calls"], grid_pinpoints=manifest.image_processor.grid_pinpoints,
                                feature_dtype=manifest.model.dtype)  # the bundle's features: fp32 or fp16
    print("## Selection overhead per selector (plan + select + pack)\n")
    print("\n".join(overhead_lines(per, settings["overhead_calls"], manifest.model.dtype)) + "\n")
    overhead["per_selector_us"] = per
    governor = None
    if settings["governor_images"]:
        from bench.governor import governor_section, section_lines

        governor = governor_section(bundle, images=settings["governor_images"], threads=args.threads, log=_say)
        print("## Governor: budget='auto' against a TTFT target (bench.governor)\n")
        print("\n".join(section_lines(governor, name)) + "\n")
    peer = None
    if not (args.skip_peer or args.bundle or args.quick):
        from bench.llm_peer import bench_section

        _say("the LLM engine against onnxruntime-genai (bench.llm_peer) ...")
        peer = bench_section(args.model, bundle_for(args.model, Path(args.artifacts))[1], threads=args.threads or 2)
    print("## Summary\n")
    print("\n".join(report.summary_lines(ups, comp, overhead)) + "\n")

    elapsed = time.perf_counter() - t_start
    results = {
        "meta": {
            "date": datetime.now().isoformat(timespec="seconds"),
            "model": name,
            "bundle": str(bundle),
            "random_weights": manifest.model.random_weights,
            "dtype": manifest.model.dtype,
            "settings": {
                **settings,
                "budgets": list(args.budget_list),
                "images": [format_size(s) for s in args.sizes],
                "threads": args.threads,
                "prompt": args.prompt,
            },  # fmt: skip
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            },  # fmt: skip
            "versions": _versions(),
            "elapsed_s": elapsed,
        },
        "flops": flops,
        "rows": rows,
        "speedups": ups,
        "comparisons": comp,
        "torch_side": torch_record,
        "selection_overhead": overhead,
        "governor": governor,
        "llm_peer": peer,
        "stage_runs": records,
    }
    out = Path(args.out)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = report.write_json(results, out / f"{name}-{stamp}.json")
    png_path = report.plot_stages(
        rows, out / f"{name}-{stamp}.png", title=f"hired-edge runtime, {name}: median time per stage"
    )
    results["paths"] = {"json": str(json_path), "png": str(png_path)}
    print(f"raw runs: {json_path}\nstage plot: {png_path}\nbenchmark took {elapsed:.0f} s")
    return results


def _busy_warning() -> str | None:
    """A warning line when other processes keep the CPUs busy (1-minute load average above the core count)."""
    if not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load <= cores:
        return None
    return (
        f"WARNING: load average {load:.1f} on {cores} cores: other processes compete for the CPUs, so times are "
        "inflated and noisy (multi-threaded torch suffers most); rerun on an idle machine for clean numbers"
    )


def _versions() -> dict:
    import numpy
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__}


def main(argv: list[str] | None = None) -> int:
    from runtime.errors import HiredError

    args = parse_args(argv)
    try:
        if args.quant != "none":
            from bench.quant_row import quant_row

            quant_row(args.model, args.quant, Path(args.artifacts), budget=REFERENCE_BUDGET, threads=args.threads,
                      force_export=args.force_export, block_size=args.block_size, log=_say)  # fmt: skip
            return 0
        run(args)
    except (RuntimeError, FileNotFoundError, HiredError) as e:
        print(f"[bench] error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
