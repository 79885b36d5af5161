"""The LLM half against onnxruntime-genai: the project's decoder (none / int8 / int4) and genai's (fp32 / int4).

    python -m bench.llm_peer --checkpoint checkpoints/bench [--rounds 5] [--new-tokens 32] [--threads 2]
    python -m bench.llm_peer --checkpoint DIR --lengths 600,2950 --engines project-none,genai-fp32

Builds once, under --work (default bench-results/llm-peer/<checkpoint name>/; the project builds again when export/ or
models/ changed since, by the digest recorded in project.export.json):
- project-none: `python -m export --model CHECKPOINT` (fp32); project-int8 / project-int4: its decoder quantized
  (export.quantize.requantize: MatMulNBits, block 32, accuracy_level 4);
- llm/: the checkpoint's language model alone (text config + language_model / lm_head weights as a
  MistralForCausalLM / LlamaForCausalLM folder), and from it genai-fp32 / genai-int4 with
  `python -m onnxruntime_genai.models.builder -p fp32|int4 -e cpu --extra_options prune_lm_head=true`.
  genai's session gets `intra_op_num_threads` = --threads through og.Config.overlay (its own default on a 2-core
  box is 1 thread), and its KV buffer is sized to the request (max_length = prompt + new tokens).

Every engine gets the same prompt token ids (seeded, drawn from the vocabulary) at the prefill lengths of budgets
1.0 and 0.2 on a 1000x1000 image (the visual span plus the prompt template's tokens, from the bundle's manifest), and
decodes --new-tokens greedy tokens with EOS never ending it. genai is driven by token ids (its builder's
`exclude_embeds=true` model takes inputs_embeds, but genai's decoder-only generator then has no input_ids to run),
the project by the embedding rows of the same ids (runtime.decoder.Decoder, as Pipeline drives it): the embedding
gather is the only work one does and the other does not. Each (engine, length, round) runs in its own process:
load, one short warm-up request, the measured request; that process's peak RSS is the row's. Rounds are
interleaved (the engine order rotates each round); ratios are medians of same-round ratios.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.stages import peak_rss_mb, rss_mb

REPO_ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("project-none", "project-int8", "project-int4", "genai-fp32", "genai-int4")
IMAGE_SIDE = 1000
BUDGETS = (1.0, 0.2)
PROMPT = "Describe this image in detail."
_PREFIXES = (  # LLaVA-NeXT checkpoint key prefix -> causal-LM key prefix (old llava-hf layout, then transformers 5)
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
    ("lm_head.", "lm_head."),
)


def _say(msg: str) -> None:
    print(f"[bench.llm_peer] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- builds
def extract_llm(checkpoint: Path, out: Path) -> Path:
    """The language model of a LLaVA-NeXT checkpoint folder as a causal-LM folder (config, safetensors, tokenizer)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    config = json.loads((checkpoint / "config.json").read_text())
    text = dict(config["text_config"])
    text.setdefault("architectures", ["LlamaForCausalLM" if text.get("model_type") == "llama" else "MistralForCausalLM"])
    tensors = {}
    for f in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            for key in st.keys():
                for old, new in _PREFIXES:
                    if key.startswith(old):
                        tensors[new + key[len(old):]] = st.get_tensor(key)
                        break
    if "lm_head.weight" not in tensors or "model.embed_tokens.weight" not in tensors:
        raise SystemExit(f"[bench.llm_peer] {checkpoint} has no language_model / lm_head weights in safetensors")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(text, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "generation_config.json"):
        if (checkpoint / name).is_file():
            shutil.copy(checkpoint / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _run(cmd: list[str], what: str) -> None:
    t0 = time.perf_counter()
    _say(f"building {what}: {' '.join(cmd[2:])}")
    done = subprocess.run(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode:
        tail = "\n".join(done.stdout.strip().splitlines()[-15:])
        raise SystemExit(f"[bench.llm_peer] building {what} failed (exit {done.returncode}):\n{tail}")
    _say(f"built {what} in {time.perf_counter() - t0:.0f} s")


def ensure_builds(checkpoint: Path, work: Path, engines: list[str]) -> dict[str, Path]:
    """{engine: folder}, building what is missing under `work`. The project's builds are rebuilt when the exporter's
    sources (export/, models/) differ from those that wrote them (digest in `work`/project.export.json)."""
    from bench.quant_row import exporter_digest

    work.mkdir(parents=True, exist_ok=True)
    paths = {e: work / e for e in ENGINES}
    float_bundle = paths["project-none"]
    record, digest = work / "project.export.json", exporter_digest()
    try:
        recorded = json.loads(record.read_text()).get("exporter_sha256")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded != digest:
        stale = [e for e in ENGINES if e.startswith("project-") and paths[e].exists()]
        if stale:
            _say(f"{', '.join(stale)}: written by other exporter sources than today's; rebuilding")
        for engine in stale:
            shutil.rmtree(paths[engine])
        record.unlink(missing_ok=True)
    if not (float_bundle / "manifest.json").is_file():
        _run([sys.executable, "-m", "export", "--model", str(checkpoint), "--out", str(float_bundle), "--force"],
             "project-none")
    for method in ("int8", "int4"):
        engine = f"project-{method}"
        if engine in engines and not (paths[engine] / "manifest.json").is_file():
            from export.quantize import requantize

            t0 = time.perf_counter()
            requantize(float_bundle, paths[engine], method, force=True)
            _say(f"built {engine} in {time.perf_counter() - t0:.0f} s")
    if (float_bundle / "manifest.json").is_file():
        record.write_text(json.dumps({"exporter_sha256": digest}) + "\n")
    genai = [e for e in engines if e.startswith("genai-") and not (paths[e] / "genai_config.json").is_file()]
    if genai:
        llm = work / "llm"
        if not (llm / "model.safetensors").is_file():
            extract_llm(checkpoint, llm)
        for engine in genai:
            precision = engine.split("-", 1)[1]
            shutil.rmtree(paths[engine], ignore_errors=True)
            _run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(llm), "-o", str(paths[engine]),
                  "-p", precision, "-e", "cpu", "-c", str(work / "hf-cache"), "--extra_options", "prune_lm_head=true"],
                 engine)
    return {e: paths[e] for e in engines}


def llm_bytes(engine: str, folder: Path) -> int:
    """Bytes of the LLM's files: decoder graph (+ data) and embedding table; genai's model.onnx (+ data)."""
    if engine.startswith("genai-"):
        names = [p for p in folder.iterdir() if p.name.startswith("model.onnx")]
    else:
        manifest = json.loads((folder / "manifest.json").read_text())
        names = [folder / manifest["files"][k] for k in ("decoder", "decoder_data", "embed_tokens") if k in manifest["files"]]
    return sum(p.stat().st_size for p in names)


def prefill_lengths(bundle: Path, side: int = IMAGE_SIDE, budgets=BUDGETS, prompt: str = PROMPT) -> dict[float, int]:
    """{budget: prompt length} of a side x side image: the visual span (stock at 1.0, HiRED's exact kept count below)
    plus the template and prompt tokens, from the bundle's manifest and tokenizer."""
    from tokenizers import Tokenizer

    from hired.layout import AnyresLayout

    m = json.loads((bundle / "manifest.json").read_text())
    proc = m["image_processor"]
    layout = AnyresLayout.for_image(width=side, height=side, grid_pinpoints=proc["grid_pinpoints"],
                                    crop_size=proc["crop_size"], patch_size=m["vision"]["patch_size"])
    tok = Tokenizer.from_file(str(bundle / m["files"]["tokenizer"]))
    text = m["prompt"]["template"].replace(m["prompt"]["image_placeholder"], "").format(prompt=prompt)
    text_tokens = len(tok.encode(text, add_special_tokens=False).ids) + int(m["prompt"]["add_bos"])
    per_image = layout.tokens_per_image
    out = {}
    for b in budgets:
        if b >= 1.0:
            visual = per_image + layout.unpadded_rows * (layout.unpadded_cols + 1)
        else:
            total = int(layout.n_images * per_image * b)
            visual = min(total, per_image + int(layout.capacities.sum()))
        out[b] = visual + text_tokens
    return out


# ----------------------------------------------------------------------------------------------- one run
def _prompt_ids(length: int, vocab: int, seed: int = 0):
    import numpy as np

    return np.random.default_rng(seed).integers(3, min(vocab, 32000), length).astype(np.int64)


def _project(folder: Path, threads: int):
    """(generate(ids, new_tokens) -> (prefill_s, decode_s, tokens)) on runtime.decoder.Decoder, as Pipeline does."""
    import numpy as np

    from runtime.decoder import Decoder
    from runtime.manifest import Manifest
    from runtime.session import OrtSession

    m = Manifest.from_file(folder)
    embed = np.load(m.path("embed_tokens"), mmap_mode="r")
    dec = Decoder(OrtSession.from_manifest(m, "decoder", threads=threads), embed, m.text)
    sized = "max_new_tokens" in inspect.signature(dec.prefill).parameters  # the shared-buffer Decoder sizes its cache

    def generate(ids, new_tokens: int):
        embeds = np.ascontiguousarray(embed[ids])
        t0 = time.perf_counter()
        logits, state = dec.prefill(embeds, max_new_tokens=new_tokens) if sized else dec.prefill(embeds)
        t1 = time.perf_counter()
        tokens = [int(np.argmax(logits))]
        for i in range(new_tokens - 1):
            logits, state = dec.step(tokens[-1], len(ids) + i, state)
            tokens.append(int(np.argmax(logits)))
        return t1 - t0, time.perf_counter() - t1, tokens

    return generate, int(m.text.vocab_size)


def _genai(folder: Path, threads: int):
    import numpy as np
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    vocab = int(json.loads((folder / "genai_config.json").read_text())["model"]["vocab_size"])

    def generate(ids, new_tokens: int):
        params = og.GeneratorParams(model)
        total = len(ids) + new_tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray(ids, dtype=np.int32)[None])
        t1 = time.perf_counter()
        for _ in range(new_tokens):  # each call picks a token from the current logits and runs it (the last too)
            gen.generate_next_token()
        seq = list(gen.get_sequence(0))
        return t1 - t0, time.perf_counter() - t1, [int(t) for t in seq[len(ids):]]

    return generate, vocab


def child(engine: str, folder: Path, length: int, new_tokens: int, threads: int) -> dict:
    """Load `engine`, warm up on a short prompt, then one measured request; the numbers as a dict."""
    t0 = time.perf_counter()
    generate, vocab = (_genai if engine.startswith("genai-") else _project)(folder, threads)
    load_s = time.perf_counter() - t0
    rss_load = rss_mb("VmRSS") or 0.0
    generate(_prompt_ids(32, vocab, seed=1), 4)
    prefill_s, decode_s, tokens = generate(_prompt_ids(length, vocab), new_tokens)
    return {
        "engine": engine, "length": length, "load_s": round(load_s, 2), "prefill_ms": round(prefill_s * 1000, 1),
        # both run new_tokens - 1 forward passes after the prefill: the first token comes from the prefill's logits
        # (genai's first generate_next_token only picks it; each later call runs the previous token, then picks)
        "decode_tok_s": round((new_tokens - 1) / decode_s, 1),
        "rss_after_load_mib": round(rss_load), "peak_rss_mib": round(peak_rss_mb()),
        "tokens": tokens,
    }


def fidelity(paths: dict[str, Path], length: int, threads: int, new_tokens: int = 16) -> dict:
    """Quantized project decoders against the float one on the same prompt ids: cosine of the prefill's
    last-position logits and greedy agreement (share of the first `new_tokens` positions with the same token)."""
    import numpy as np

    from runtime.decoder import Decoder
    from runtime.manifest import Manifest
    from runtime.session import OrtSession

    def run(folder: Path):
        m = Manifest.from_file(folder)
        embed = np.load(m.path("embed_tokens"), mmap_mode="r")
        dec = Decoder(OrtSession.from_manifest(m, "decoder", threads=threads), embed, m.text)
        ids = _prompt_ids(length, int(m.text.vocab_size))
        sized = "max_new_tokens" in inspect.signature(dec.prefill).parameters
        embeds = np.ascontiguousarray(embed[ids])
        logits, state = dec.prefill(embeds, max_new_tokens=new_tokens) if sized else dec.prefill(embeds)
        first = np.asarray(logits, dtype=np.float64).copy()
        tokens = [int(np.argmax(logits))]
        for i in range(new_tokens - 1):
            logits, state = dec.step(tokens[-1], length + i, state)
            tokens.append(int(np.argmax(logits)))
        return first, tokens

    base_logits, base_tokens = run(paths["project-none"])
    out = {}
    for engine in ("project-int8", "project-int4"):
        if engine in paths:
            logits, tokens = run(paths[engine])
            cos = float(logits @ base_logits / (np.linalg.norm(logits) * np.linalg.norm(base_logits)))
            agree = sum(a == b for a, b in zip(tokens, base_tokens)) / new_tokens
            first_diff = next((i for i, (a, b) in enumerate(zip(tokens, base_tokens)) if a != b), None)
            out[engine] = {"cosine": round(cos, 5), "greedy_agreement": agree, "first_difference": first_diff}
    return out


# ----------------------------------------------------------------------------------------------- rounds
def measure(paths: dict[str, Path], lengths: dict[float, int], rounds: int, new_tokens: int, threads: int) -> list[dict]:
    """Interleaved rounds: every (engine, length) once per round, the engine order rotating; one process each."""
    engines = list(paths)
    runs = []
    for r in range(rounds):
        order = engines[r % len(engines):] + engines[: r % len(engines)]
        for budget, length in lengths.items():
            for engine in order:
                cmd = [sys.executable, "-m", "bench.llm_peer", "--child", engine, "--folder", str(paths[engine]),
                       "--length", str(length), "--new-tokens", str(new_tokens), "--threads", str(threads)]
                done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"[bench.llm_peer] {engine} at {length} tokens failed:\n{done.stderr[-2000:]}")
                rec = json.loads(done.stdout.strip().splitlines()[-1])
                rec.update(round=r, budget=budget)
                runs.append(rec)
                _say(f"round {r + 1}/{rounds} {engine:13s} L={length}: prefill {rec['prefill_ms']:.0f} ms, "
                     f"decode {rec['decode_tok_s']:.1f} tok/s, peak RSS {rec['peak_rss_mib']} MiB")
    return runs


def summarize(runs: list[dict], paths: dict[str, Path], base: str = "genai-fp32") -> tuple[list[dict], list[dict]]:
    """(rows: medians per engine and length, ratios: medians of same-round ratios against `base` and genai-int4)."""
    rows, ratios = [], []
    keys = sorted({(r["engine"], r["length"]) for r in runs}, key=lambda k: (k[1], list(paths).index(k[0])))
    for engine, length in keys:
        sel = [r for r in runs if r["engine"] == engine and r["length"] == length]
        rows.append({
            "engine": engine, "length": length, "budget": sel[0]["budget"], "rounds": len(sel),
            "prefill_ms": statistics.median(r["prefill_ms"] for r in sel),
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in sel),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in sel),
            "rss_after_load_mib": statistics.median(r["rss_after_load_mib"] for r in sel),
            "llm_mib": round(llm_bytes(engine, paths[engine]) / 2**20, 1),
        })
    by = {(r["engine"], r["length"], r["round"]): r for r in runs}
    for engine, length in keys:
        for ref in (base, "genai-int4"):
            if engine == ref or not engine.startswith("project-"):
                continue
            pairs = [(by[(engine, length, k)], by[(ref, length, k)]) for (e, ll, k) in by
                     if e == engine and ll == length and (ref, length, k) in by]
            if not pairs:
                continue
            ratios.append({
                "engine": engine, "vs": ref, "length": length,
                "prefill_time": round(statistics.median(a["prefill_ms"] / b["prefill_ms"] for a, b in pairs), 2),
                "decode_speed": round(statistics.median(a["decode_tok_s"] / b["decode_tok_s"] for a, b in pairs), 2),
            })
    return rows, ratios


def table_lines(rows: list[dict], ratios: list[dict]) -> list[str]:
    lines = ["| engine | prompt tokens (budget) | prefill ms | decode tok/s | peak RSS MiB | LLM files MiB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['length']:,} ({r['budget']}) | {r['prefill_ms']:,.0f} | "
                     f"{r['decode_tok_s']:.1f} | {r['peak_rss_mib']:,} | {r['llm_mib']:,.1f} |")
    lines += ["", "same-round ratios (median): prefill time project/peer (lower is better), decode tok/s project/peer "
              "(higher is better)"]
    for q in ratios:
        lines.append(f"  {q['engine']:13s} vs {q['vs']:10s} @ {q['length']:,}: prefill time {q['prefill_time']:.2f}x, "
                     f"decode speed {q['decode_speed']:.2f}x")
    return lines


def greedy_agreement(runs: list[dict], a: str, b: str) -> float | None:
    """Share of positions where engines a and b picked the same token (first round, longest prompt)."""
    pick = {r["engine"]: r["tokens"] for r in runs if r["round"] == 0 and r["length"] == max(x["length"] for x in runs)}
    if a not in pick or b not in pick:
        return None
    n = min(len(pick[a]), len(pick[b]))
    return sum(x == y for x, y in zip(pick[a][:n], pick[b][:n])) / max(n, 1)


def run(checkpoint: Path, work: Path, engines: list[str], rounds: int, new_tokens: int, threads: int,
        lengths: list[int] | None = None) -> dict:
    paths = ensure_builds(checkpoint, work, engines)
    if lengths:
        by_budget = dict(zip([f"L{n}" for n in lengths], lengths))
    else:
        by_budget = prefill_lengths(paths.get("project-none", work / "project-none"))
    _say(f"prompt lengths {by_budget}, {rounds} rounds, {new_tokens} new tokens, {threads} threads")
    runs = measure(paths, by_budget, rounds, new_tokens, threads)
    rows, ratios = summarize(runs, paths)
    quality = {}
    if "project-none" in paths and any(e in paths for e in ("project-int8", "project-int4")):
        for length in by_budget.values():
            cmd = [sys.executable, "-m", "bench.llm_peer", "--child", "fidelity", "--folder", str(work),
                   "--length", str(length), "--threads", str(threads), "--engines", ",".join(paths)]
            done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"[bench.llm_peer] fidelity at {length} tokens failed:\n{done.stderr[-2000:]}")
            quality[str(length)] = json.loads(done.stdout.strip().splitlines()[-1])
            _say(f"fidelity at {length} tokens: {quality[str(length)]}")
    return {
        "checkpoint": str(checkpoint), "rounds": rounds, "new_tokens": new_tokens, "threads": threads,
        "lengths": {str(k): v for k, v in by_budget.items()}, "rows": rows, "ratios": ratios, "fidelity": quality,
        "greedy_agreement_vs_genai_fp32": {e: greedy_agreement(runs, e, "genai-fp32") for e in engines
                                           if e != "genai-fp32"},
        "runs": runs,
    }


def bench_section(model: str, checkpoint: Path | None, *, rounds: int = 5, new_tokens: int = 32, threads: int = 2,
                  work_root: Path | None = None, log=_say) -> dict | None:
    """`make bench`'s LLM-engine section for registry model (or checkpoint folder) `model`: prints the table and
    returns the record (None when skipped, with one line saying why)."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        print("## LLM engine vs onnxruntime-genai: skipped (onnxruntime-genai is not installed: "
              "pip install onnxruntime-genai, or the bench extra)\n")
        return None
    work = (work_root or REPO_ROOT / "bench-results" / "llm-peer") / (checkpoint.name if checkpoint else model)
    if checkpoint is None:
        local = REPO_ROOT / "checkpoints" / model
        checkpoint = local if (local / "config.json").is_file() else work / "checkpoint"
        if not (checkpoint / "config.json").is_file():
            from models import registry
            from models.build import count_params

            if model not in registry.names() or count_params(registry.get(model)) > 1e9:
                print(f"## LLM engine vs onnxruntime-genai: skipped ({model} has no checkpoint folder on disk and "
                      "is too large to build one with random weights here)\n")
                return None
            _run([sys.executable, "-m", "models.build", model, "--out", str(checkpoint), "--force"], f"{model} checkpoint")
    engines = list(ENGINES)
    record = run(checkpoint.resolve(), work.resolve(), engines, rounds, new_tokens, threads)
    print("## LLM engine vs onnxruntime-genai (same LLM weights and prompt ids, interleaved rounds)\n")
    print(f"prompt lengths {record['lengths']} (budgets 1.0 / 0.2 on a {IMAGE_SIDE}x{IMAGE_SIDE} image); "
          f"{new_tokens} greedy tokens; {threads} intra-op threads each; medians of {rounds} rounds; peak RSS of "
          "each engine's own process\n")
    print("\n".join(table_lines(record["rows"], record["ratios"])) + "\n")
    for length, q in record["fidelity"].items():
        for engine, f in q.items():
            print(f"fidelity @ {int(length):,}: {engine} vs project-none: prefill logits cosine {f['cosine']:.4f}, "
                  f"greedy agreement {f['greedy_agreement']:.0%} of 16 tokens")
    print()
    return record


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.llm_peer", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="LLaVA-NeXT checkpoint folder (e.g. checkpoints/bench)")
    p.add_argument("--work", type=Path, default=None, help="build cache (default bench-results/llm-peer/<checkpoint>)")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {', '.join(ENGINES)}")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens decoded per request (default 32)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of every engine (default 2)")
    p.add_argument("--lengths", default=None, help="prompt lengths instead of budgets 1.0 / 0.2 on a 1000x1000 image")
    p.add_argument("--json", type=Path, default=None, help="write the record here too")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child == "fidelity":  # --folder is the work folder; --engines the built engines
        paths = {e: args.folder / e for e in args.engines.split(",")}
        print(json.dumps(fidelity(paths, args.length, args.threads)))
        return 0
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.length, args.new_tokens, args.threads)))
        return 0
    if args.checkpoint is None:
        build_parser().error("--checkpoint is required")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        build_parser().error(f"--engines: unknown {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    work = args.work or REPO_ROOT / "bench-results" / "llm-peer" / args.checkpoint.resolve().name
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else None
    record = run(args.checkpoint.resolve(), work.resolve(), engines, args.rounds, args.new_tokens, args.threads, lengths)
    print("\n".join(table_lines(record["rows"], record["ratios"])))
    for length, q in record["fidelity"].items():
        for engine, f in q.items():
            print(f"fidelity @ {int(length):,}: {engine} vs project-none: prefill logits cosine {f['cosine']:.4f}, "
                  f"greedy agreement {f['greedy_agreement']:.0%} of 16 tokens (first difference at {f['first_difference']})")
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
