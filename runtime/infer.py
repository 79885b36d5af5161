"""Command line: one image + prompt through a bundle, text streamed as it is decoded.

    python -m runtime.infer --artifacts artifacts/tiny --image assets/demo.png --prompt "What is this?" --budget 0.2

Exit codes: 0 done, 2 bad input or bundle (one line on stderr saying what to fix).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from runtime.errors import HiredError
from runtime.session import PROVIDERS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runtime.infer",
        description="Run a LLaVA-NeXT bundle on one image with HiRED visual-token dropping (onnxruntime only).",
        epilog="Options left out take the bundle manifest's defaults (budget 0.2, alpha 0.5, spatial, no newlines).",
    )
    p.add_argument("--artifacts", required=True, metavar="DIR", help="bundle folder written by `python -m export`")
    p.add_argument("--image", required=True, metavar="IMG", help="image file (PNG, JPEG, ...)")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the question; the image slot is added for you")
    p.add_argument("--budget", type=float, metavar="R",
                   help="share of the visual tokens to keep, in (0, 1]; 1.0 = the stock model")
    p.add_argument("--alpha", type=float, metavar="A", help="share of the budget for the base image, in [0, 1]")
    p.add_argument("--distribution", choices=["spatial", "official"],
                   help="how crops share the budget: spatial (paper Eq. 1, exact) or official (published code)")
    p.add_argument("--newlines", choices=["none", "rows"],
                   help="newline embeddings in the pruned span: none (HiRED) or one per kept canvas row")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="stop after N new tokens (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (default 1.0)")
    p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--provider", choices=PROVIDERS, default="cpu",
                   help="execution provider; cuda/tensorrt fall back to CPU with a warning if unavailable")
    p.add_argument("--max-pixels", type=int, default=64_000_000, help="refuse larger images (default 64 Mpx)")
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON line, last on stdout (streamed text goes to stderr)")
    p.add_argument("--dump", metavar="DIR", help="write pixel_values, scores, kept indices, inputs_embeds, logits")
    p.add_argument("--show-kept", metavar="OUT.png", help="write the image with kept patches lit, dropped dimmed")
    return p  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s", stream=sys.stderr)
    from runtime.pipeline import Pipeline  # after parsing, so --help is instant

    out = sys.stderr if args.json else sys.stdout
    try:
        pipe = Pipeline.load(args.artifacts, provider=args.provider, max_pixels=args.max_pixels)
        trace: dict | None = {} if (args.dump or args.show_kept) else None
        stream = pipe.stream(
            args.image, args.prompt, budget=args.budget, alpha=args.alpha, distribution=args.distribution,
            newlines=args.newlines, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_p=args.top_p, seed=args.seed, trace=trace,
        )  # fmt: skip
        for piece in stream:
            out.write(piece)
            out.flush()
        out.write("\n")
        result = stream.result
        if args.dump:
            write_dump(Path(args.dump), trace)
        if args.show_kept:
            from runtime.visualize import render_kept

            render_kept(trace, pipe.manifest.image_processor, result).save(args.show_kept)
        pipe.close()
    except HiredError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        v, t = result.visual_tokens, result.timings_ms
        print(
            f"[visual tokens {v['kept']}/{v['before']} (per image {list(v['per_image'])}), budget "
            f"{result.budget['rate']} -> total {result.budget['total']}; vision {t['vision']:.0f} ms, "
            f"prefill {t['prefill']:.0f} ms, decode {t['decode']:.0f} ms, total {t['total']:.0f} ms on {result.provider}]",
            file=sys.stderr,
        )
    return 0


def write_dump(folder: Path, trace: dict) -> None:
    """The intermediate arrays of one request, for comparing a device's run with a reference."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("pixel_values", "early_scores", "late_scores", "inputs_embeds", "prefill_logits"):
        np.save(folder / f"{name}.npy", np.asarray(trace[name]))
    kept = {"per_image": [k.tolist() for k in trace["kept_indices"]], "order": trace["order"].tolist()}
    (folder / "kept_indices.json").write_text(json.dumps(kept))


if __name__ == "__main__":
    sys.exit(main())
