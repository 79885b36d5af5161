"""What a user would run instead, timed on the same model and images: transformers and the PyTorch HiRED reference.

    python -m bench.torch_side --bundle artifacts/bench --sizes 1000x1000,1280x640 --runs 3 --new-tokens 32

Runs in its own process (it imports torch; the runtime's processes never do) and prints one JSON line:
- "transformers": stock `LlavaNextForConditionalGeneration` on CPU at budget 1.0. TTFT = the processor +
  `generate` until its first new token (a streamer timestamps each token); decode tok/s = (new_tokens - 1) /
  time from the first to the last token, with `min_new_tokens = max_new_tokens = new_tokens` (no early EOS).
- "reference": `export.reference.HiredReference.run` at `--reference-budget` (0.2), same token counts and
  the same definitions (its TTFT = preprocess + vision + select + projector + prefill).

The model is the one the bundle was exported from: its checkpoint folder, or for a random-weight export the
same seeded weights rebuilt with `models.load.load_model(name, random_weights=True, seed=...)`. Whether both
sides really hold the same weights is checked (the bundle's embed_tokens.npy and image_newline.npy against the
torch model's) and reported as `same_weights`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.images import format_size, parse_size, synthetic_image
from bench.stages import DEFAULT_PROMPT, REPO_ROOT, peak_rss_mb


class _Clock:
    """A generate() streamer that only timestamps: the first put is the prompt, each later put one new token."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def seed_of(manifest) -> int:
    """The random-weight seed an export used: export_info["seed"], else "seed N" in the model source, else 0."""
    info = manifest.export_info or {}
    for key in ("seed", "random_seed"):
        if isinstance(info.get(key), int):
            return int(info[key])
    found = re.search(r"seed\D{0,3}(\d+)", manifest.model.source or "")
    return int(found.group(1)) if found else 0


def checkpoint_folder(source: str | None) -> Path | None:
    """The checkpoint folder named by a manifest's model source ("checkpoints/tiny (built by ...)"), if it
    exists here (as given, or relative to the repository root); else None."""
    if not source:
        return None
    for text in (source, source.split(" (", 1)[0]):
        for path in (Path(text), REPO_ROOT / text):
            if (path / "config.json").is_file():
                return path
    return None


def load_bundle_model(manifest):
    """(model, tokenizer, processor, how) for the checkpoint a bundle was exported from, float32 on CPU.

    how: one line saying where the weights came from.
    """
    import torch

    from models import registry
    from models.arch import processor_class
    from models.build import build_processor
    from models.load import load_model

    source = checkpoint_folder(manifest.model.source)
    if source is not None:
        model, tokenizer, info = load_model(str(source), dtype=torch.float32)
        processor = processor_class(model.config.model_type).from_pretrained(str(source))  # LlavaNext or Llava
        return model, processor.tokenizer, processor, f"checkpoint folder {source} ({info.source})"
    if not manifest.model.random_weights:
        raise FileNotFoundError(
            f"the bundle was exported from {manifest.model.source!r}, which is not a folder here; "
            "put the checkpoint there (or re-export) to compare against transformers, or pass --skip-torch"
        )
    seed = seed_of(manifest)
    model, tokenizer, info = load_model(
        manifest.model.name, random_weights=True, dtype=torch.float32, seed=seed
    )
    processor = build_processor(registry.get(manifest.model.name), tokenizer)
    return model, tokenizer, processor, info.source


def same_weights(manifest, model) -> bool:
    """True when the bundle's embed_tokens.npy and image_newline.npy equal the torch model's tensors exactly."""
    embed = np.load(manifest.path("embed_tokens"))
    newline = np.load(manifest.path("image_newline"))
    ours_embed = model.get_input_embeddings().weight.detach().float().numpy()
    from export.bundle import newline_vector

    ours_newline = newline_vector(model, np.float32)  # zeros for LLaVA-1.5, which has no newline embedding
    return bool(
        embed.shape == ours_embed.shape
        and np.array_equal(embed.astype(np.float32), ours_embed)
        and np.array_equal(newline.astype(np.float32), ours_newline)
    )


def time_transformers(model, processor, image: np.ndarray, text: str, new_tokens: int) -> dict:
    """One stock request: processor + generate(min_new_tokens = max_new_tokens = new_tokens), greedy."""
    import torch
    from PIL import Image

    pil = Image.fromarray(image)
    clock = _Clock()
    t0 = time.perf_counter()
    inputs = processor(images=pil, text=text, return_tensors="pt")
    t_proc = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=clock,
            pad_token_id=processor.tokenizer.pad_token_id or 0,
        )  # fmt: skip
    t_end = time.perf_counter()
    n = int(out.shape[-1] - inputs["input_ids"].shape[-1])
    if n != new_tokens or len(clock.times) != new_tokens:
        raise RuntimeError(f"generate made {n} tokens ({len(clock.times)} timestamps), expected {new_tokens}")
    first = clock.times[0]
    decode_s = t_end - first
    return {
        "processor_ms": (t_proc - t0) * 1000.0,
        "ttft_ms": (first - t0) * 1000.0,
        "decode_ms": decode_s * 1000.0,
        "decode_tok_s": (new_tokens - 1) / decode_s,
        "prefill_tokens": int(inputs["input_ids"].shape[-1]),
    }


def time_reference(ref, image: np.ndarray, prompt: str, rate: float, new_tokens: int) -> dict:
    """One HiredReference.run at `rate`, forced to exactly `new_tokens` tokens (min_new_tokens)."""
    from bench.metrics import ttft_ms

    out = ref.run(image, prompt, rate=rate, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    if len(out.token_ids) != new_tokens:
        raise RuntimeError(f"the reference generated {len(out.token_ids)} tokens, expected {new_tokens}")
    tm = out.timings
    text_tokens = len(out.prompt_ids[0]) + len(out.prompt_ids[1])
    return {
        **{f"{k}_ms": float(tm[k]) for k in ("preprocess", "vision", "select", "projector", "prefill")},
        "ttft_ms": ttft_ms(tm),
        "decode_ms": float(tm["decode"]),
        "decode_tok_s": (new_tokens - 1) / (tm["decode"] / 1000.0),
        "kept": out.visual_tokens,
        "prefill_tokens": out.visual_tokens + text_tokens,
    }


def measure(
    bundle: str,
    sizes: Sequence[tuple[int, int]],
    *,
    runs: int,
    warmup: int,
    new_tokens: int,
    reference_budget: float | None,
    prompt: str = DEFAULT_PROMPT,
    threads: int | None = None,
) -> dict:
    """Both baselines on every image size; raw runs per (baseline, image), plus the load facts.

    threads: torch intra-op threads (default: torch's own choice, the physical cores)."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)

    from bench.metrics import summarize_runs
    from export.reference import HiredReference
    from runtime.manifest import Manifest

    manifest = Manifest.from_file(bundle)
    t0 = time.perf_counter()
    model, tokenizer, processor, how = load_bundle_model(manifest)
    load_ms = (time.perf_counter() - t0) * 1000.0
    text = manifest.prompt.template.replace("{prompt}", prompt)
    ref = HiredReference(
        model, tokenizer=tokenizer, image_processor=processor.image_processor,
        prompt_template=manifest.prompt.template, add_bos=manifest.prompt.add_bos,
    )  # fmt: skip
    cases = []
    for size in sizes:
        image = synthetic_image(width=size[0], height=size[1])
        jobs = [
            ("transformers", 1.0, lambda im=image: time_transformers(model, processor, im, text, new_tokens))
        ]
        if reference_budget is not None:
            jobs.append(
                (
                    "reference",
                    reference_budget,
                    lambda im=image: time_reference(ref, im, prompt, reference_budget, new_tokens),
                )
            )
        for name, budget, job in jobs:
            for _ in range(warmup):
                job()
            timed = [job() for _ in range(runs)]
            cases.append(
                {
                    "baseline": name,
                    "image": format_size(size),
                    "budget": budget,
                    "runs": timed,
                    **summarize_runs(timed),
                }
            )
    return {
        "weights": how,
        "same_weights": same_weights(manifest, model),
        "torch": torch.__version__,
        "transformers": _transformers_version(),
        "torch_threads": torch.get_num_threads(),
        "load_ms": load_ms,
        "cases": cases,
        "peak_rss_mb": peak_rss_mb(),
    }


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.torch_side",
        description="Time transformers' LlavaNext (budget 1.0) and export/reference.py (HiRED in PyTorch) on the "
        "model a bundle was exported from; prints one JSON line.",
    )
    p.add_argument("--bundle", required=True, help="ONNX bundle folder whose source model is timed")
    p.add_argument("--sizes", default="1000x1000,1280x640", help="comma-separated WIDTHxHEIGHT image sizes")
    p.add_argument("--runs", type=int, default=3, help="timed requests per case (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests per case first (default 1)")
    p.add_argument(
        "--new-tokens", type=int, default=32, help="tokens generated per request, no early EOS (default 32)"
    )
    p.add_argument(
        "--reference-budget", type=float, default=0.2, help="budget of the HiRED reference run (default 0.2)"
    )
    p.add_argument("--skip-reference", action="store_true", help="time transformers only")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="user prompt (the bundle's template wraps it)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (one decode step at least)")
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    result = measure(
        args.bundle, sizes, runs=args.runs, warmup=args.warmup, new_tokens=args.new_tokens,
        reference_budget=None if args.skip_reference else args.reference_budget, prompt=args.prompt,
        threads=args.threads,
    )  # fmt: skip
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
