"""GPU check: a 7B-shaped random-weight LLaVA-NeXT in transformers, HiRED via export/reference.py, on CUDA in fp16.

    bench/gpu_check.sh                                  # llava-next-7b shape, cuda, fp16, budgets 1.0 0.4 0.2
    bench/gpu_check.sh --model tiny --device cpu --runs 1 --warmup 0   # the same code on CPU, in seconds

Paper-comparable (HiRED Table 4): batch 1, one 1000x1000 image (-> 2x2 grid, 5 images through the tower),
greedy, exactly 32 new tokens (min_new_tokens; random weights may emit EOS). Per budget: kept visual tokens,
TTFT (preprocess + vision + select + projector + prefill, torch.cuda.synchronize around every stage),
decode tokens/s = 31 / time from the first to the last token, and torch.cuda.max_memory_allocated, reset
before each budget (on CPU: the process's peak RSS instead). Writes gpu_check.md and gpu_check.json under
$OUT (when set) or --out.

The model is built directly on the device in its dtype from the registry config (seeded random weights;
nothing is read from disk), so a 7B model needs ~14 GB of GPU memory and no host copy. The tokenizer is a
small word-level stand-in built in code (the accelerator machine has no sentencepiece / mistral-common): the
prompt's token count differs a little from the real Vicuna tokenizer's; the visual span does not.

Imports only torch, transformers, numpy, PIL, hired, models.registry and export.reference, so it runs with
the accelerator machine's own packages (Python 3.12, torch 2.11, transformers 5.17) as well as this project's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np

from hired import AnyresLayout, HiredConfig, plan_budget
from models import registry

RESAMPLE_BICUBIC = 3
DEFAULT_PROMPT = "Describe this picture in detail: the objects, their colours and where they are."
SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2}


def stand_in_tokenizer(texts: list[str], image_token: str = "<image>", image_id: int = 32000):
    """A word-level `PreTrainedTokenizerFast` over the words of `texts`: <unk> 0, <s> 1 (BOS), </s> 2,
    `image_token` = image_id, words from 3 on. Needs only the `tokenizers` package transformers depends on."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words: dict[str, int] = dict(SPECIALS)
    for text in texts:
        for w in re.findall(r"\w+|[^\w\s]", text.replace(image_token, " ")):
            words.setdefault(w, len(words))
    if len(words) >= image_id:
        raise ValueError(f"{len(words)} distinct words do not fit below the image token id {image_id}")
    words[image_token] = image_id
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([image_token])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )


def image_processor_for(config: dict):
    """transformers' PIL LlavaNext image processor with the config's pinpoints and CLIP-336 numbers."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    side = int(config["vision_config"]["image_size"])
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side},
        image_grid_pinpoints=[list(p) for p in config["image_grid_pinpoints"]], image_mean=list(registry.CLIP_MEAN),
        image_std=list(registry.CLIP_STD), resample=RESAMPLE_BICUBIC, do_resize=True, do_center_crop=True, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True, do_pad=True,
    )  # fmt: skip


def build_on_device(entry: registry.ModelEntry, device: str, dtype, seed: int):
    """`LlavaNextForConditionalGeneration` of `entry` created directly on `device` in `dtype`, torch seeded."""
    import torch
    from transformers import LlavaNextForConditionalGeneration

    config = entry.llava_config()
    for c in (config, config.text_config, config.vision_config):
        c.dtype = dtype
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaNextForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def test_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A deterministic uint8 [height, width, 3] picture (gradients and noise)."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    img = 255 * (0.5 + 0.25 * np.sin(6 * x + 3 * y + np.arange(3, dtype=np.float32)))
    img = img + rng.normal(0, 8, size=(height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def one_request(ref, image, prompt: str, rate: float, new_tokens: int) -> dict:
    """One HiredReference.run with exactly `new_tokens` greedy tokens; TTFT, decode tok/s, token counts."""
    out = ref.run(image, prompt, rate=rate, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    tm = out.timings
    ttft = sum(tm[k] for k in ("preprocess", "vision", "select", "projector", "prefill"))
    steps = len(out.token_ids) - 1
    return {
        **{
            f"{k}_ms": float(tm[k])
            for k in ("preprocess", "vision", "select", "projector", "prefill", "decode")
        },
        "ttft_ms": float(ttft),
        "decode_tok_s": steps / (tm["decode"] / 1000.0) if steps > 0 and tm["decode"] > 0 else float("nan"),
        "new_tokens": len(out.token_ids),
        "kept": out.visual_tokens,
        "prefill_tokens": out.visual_tokens + len(out.prompt_ids[0]) + len(out.prompt_ids[1]),
    }


def run_check(
    *,
    model: str = "llava-next-7b",
    device: str = "cuda",
    dtype: str = "auto",
    budgets: tuple[float, ...] = (1.0, 0.4, 0.2),
    size: tuple[int, int] = (1000, 1000),
    runs: int = 3,
    warmup: int = 1,
    new_tokens: int = 32,
    seed: int = 0,
    time_limit_s: float = 270.0,
    prompt: str = DEFAULT_PROMPT,
    threads: int | None = None,
    log=None,
) -> dict:
    """Measure every budget (see the module docstring); returns the JSON-able result with `rows`.

    Stops starting new runs after `time_limit_s` seconds (the result then says `partial: true`).
    """
    import torch
    import transformers

    from export.reference import HiredReference

    say = log or (lambda _m: None)
    t_start = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(threads)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            "--device cuda but torch sees no CUDA device; run with --device cpu to test on CPU"
        )
    torch_dtype = {"auto": torch.float16 if device.startswith("cuda") else torch.float32,
                   "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]  # fmt: skip
    entry = registry.get(model)
    cfg = entry.config_dict()
    say(f"building {model} on {device} in {str(torch_dtype).removeprefix('torch.')} (seed {seed}) ...")
    t = time.perf_counter()
    net = build_on_device(entry, device, torch_dtype, seed)
    build_s = time.perf_counter() - t
    params = sum(p.numel() for p in net.parameters())
    say(f"  {params / 1e9:.2f} B parameters in {build_s:.1f} s")
    tokenizer = stand_in_tokenizer([entry.prompt_template, prompt])
    ref = HiredReference(
        net, tokenizer=tokenizer, image_processor=image_processor_for(cfg),
        prompt_template=entry.prompt_template, add_bos=entry.add_bos,
    )  # fmt: skip
    image = test_image(*size)
    layout = AnyresLayout.for_image(width=size[0], height=size[1], grid_pinpoints=cfg["image_grid_pinpoints"])
    cuda = device.startswith("cuda")
    rows, partial = [], False
    for rate in budgets:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        timed = []
        for i in range(warmup + runs):
            if timed and time.perf_counter() - t_start > time_limit_s:
                partial = True
                break
            r = one_request(ref, image, prompt, rate, new_tokens)
            if i >= warmup:
                timed.append(r)
        med = {k: float(np.median([x[k] for x in timed])) for k in timed[0]}
        med["budget"] = rate
        med["planned_total"] = plan_budget(
            layout, np.ones(layout.tokens_per_image, np.float32), HiredConfig(rate=rate)
        ).total
        med["runs"] = len(timed)
        med["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else peak_rss_gb()
        rows.append(med)
        say(f"  budget {rate}: kept {int(med['kept'])}, TTFT {med['ttft_ms']:.1f} ms, "
            f"decode {med['decode_tok_s']:.1f} tok/s, peak {med['peak_mem_gb']:.2f} GB")  # fmt: skip
        if partial:
            break
    full = next((r for r in rows if r["budget"] >= 1.0), None)
    for r in rows:
        r["ttft_speedup"] = full["ttft_ms"] / r["ttft_ms"] if full else float("nan")
    return {
        "model": model,
        "shape": f"{params / 1e9:.2f} B parameters, random weights (seed {seed})",
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "image": f"{size[0]}x{size[1]}",
        "grid": list(layout.grid),
        "new_tokens": new_tokens,
        "memory": "torch.cuda.max_memory_allocated, reset per budget" if cuda else "peak RSS of the process",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cuda": torch.version.cuda,
        },  # fmt: skip
        "build_s": build_s,
        "elapsed_s": time.perf_counter() - t_start,
        "partial": partial,
        "rows": rows,
    }


def table_md(result: dict) -> str:
    """The check's markdown table, with a header line saying what was measured."""
    mem = "peak GPU mem GB" if "cuda" in result["memory"] else "peak RSS GB"
    lines = [
        f"GPU check: {result['model']} ({result['shape']}), {result['dtype']} on {result['device']}, "
        f"batch 1, image {result['image']} (grid {result['grid'][0]}x{result['grid'][1]}), "
        f"{result['new_tokens']} new tokens; transformers {result['versions']['transformers']}, "
        f"torch {result['versions']['torch']}" + (" (PARTIAL: time limit)" if result["partial"] else ""),
        "",
        f"| budget | visual tokens | prefill tokens | TTFT ms | TTFT speed-up | decode tok/s | {mem} |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['budget']:g} | {int(r['kept']):,} | {int(r['prefill_tokens']):,} | {r['ttft_ms']:,.1f} | "
            f"{r['ttft_speedup']:.2f}x | {r['decode_tok_s']:,.1f} | {r['peak_mem_gb']:.2f} |"
        )
    return "\n".join(lines)


def write_outputs(result: dict, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """gpu_check.md and gpu_check.json in `out_dir` (created); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "gpu_check.md", out / "gpu_check.json"
    md.write_text(table_md(result) + "\n", encoding="utf-8")
    clean = json.loads(json.dumps(result, default=str).replace("NaN", "null"))
    js.write_text(json.dumps(clean, indent=1) + "\n", encoding="utf-8")
    return md, js


def _budgets(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"budgets must be comma-separated numbers, e.g. 1.0,0.4,0.2; got {text!r}"
        ) from None
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"every budget must be in (0, 1], got {text!r}")
    return values


def _size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", text.lower())
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise argparse.ArgumentTypeError(f"size must look like WIDTHxHEIGHT, e.g. 1000x1000; got {text!r}")
    return int(m.group(1)), int(m.group(2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bench/gpu_check.sh",
        description="HiRED on a random-weight LLaVA-NeXT in transformers (export/reference.py), built directly on "
        "the device: TTFT, decode tok/s and peak memory per budget. Writes gpu_check.md/.json under $OUT or --out.",
    )
    p.add_argument(
        "--model",
        default="llava-next-7b",
        choices=registry.names(),
        help="registry shape (default llava-next-7b)",
    )
    p.add_argument("--device", default="cuda", help="torch device: cuda (default), cuda:1, cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"),
                   help="weights and activations (default auto: float16 on CUDA, float32 on CPU)")  # fmt: skip
    p.add_argument(
        "--budgets",
        type=_budgets,
        default=(1.0, 0.4, 0.2),
        help="comma-separated rates (default 1.0,0.4,0.2)",
    )
    p.add_argument(
        "--size",
        type=_size,
        default=(1000, 1000),
        help="test image WIDTHxHEIGHT (default 1000x1000: 2x2 grid)",
    )
    p.add_argument(
        "--runs", type=int, default=3, help="timed requests per budget; the median is reported (default 3)"
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed requests per budget first (default 1)")
    p.add_argument(
        "--new-tokens", type=int, default=32, help="tokens generated per request, no early EOS (default 32)"
    )
    p.add_argument("--seed", type=int, default=0, help="torch seed of the random weights (default 0)")
    p.add_argument("--time-limit", type=float, default=270.0,
                   help="start no new request after this many seconds; results are then marked partial (default 270)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--out", default=None, help="output folder (default: $OUT when set, else bench-results/gpu)"
    )
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.new_tokens < 2:
        p.error("need --runs >= 1, --warmup >= 0 and --new-tokens >= 2")
    out_dir = args.out or os.environ.get("OUT") or "bench-results/gpu"
    result = run_check(
        model=args.model, device=args.device, dtype=args.dtype, budgets=args.budgets, size=args.size, runs=args.runs,
        warmup=args.warmup, new_tokens=args.new_tokens, seed=args.seed, time_limit_s=args.time_limit,
        threads=args.threads, log=lambda m: print(m, file=sys.stderr, flush=True),
    )  # fmt: skip
    md, js = write_outputs(result, out_dir)
    print(table_md(result))
    print(f"\nwrote {md} and {js} in {result['elapsed_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
