"""Command line: an image (or several) + prompt through a bundle, text streamed as it is decoded.

    python -m runtime.infer --artifacts artifacts/tiny --image assets/demo.png --prompt "What is this?" --budget 0.2
    python -m runtime.infer --artifacts artifacts/tiny --image a.png --image b.png --prompt "<image> <image> What changed?"

The request flags map one to one onto runtime.options.RequestOptions (defaults included). Output paths
(--dump, --show-kept) are checked before any model runs.
Exit codes: 0 done, 2 bad input, bundle or output path (one line on stderr saying what to fix), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from hired.selectors import SELECTORS
from runtime.errors import HiredError, OutputError
from runtime.image import DEFAULT_MAX_PIXELS, format_pixels
from runtime.options import RequestOptions

PICTURE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
                   ".tiff": "TIFF", ".gif": "GIF"}  # fmt: skip
DUMP_ARRAYS = ("pixel_values", "early_scores", "late_scores", "inputs_embeds", "prefill_logits")  # + kept_indices.json
IMAGE_ARRAYS = ("pixel_values", "early_scores", "late_scores")  # per image: suffixed _0, _1, ... with several
_D = RequestOptions()  # the defaults the help text shows


def build_parser() -> argparse.ArgumentParser:
    from runtime.session import PROVIDERS

    p = argparse.ArgumentParser(
        prog="python -m runtime.infer",
        description="Run a LLaVA-NeXT bundle on one image with HiRED visual-token dropping (onnxruntime only).",
        epilog="Options left out take the bundle manifest's defaults (budget 0.2, alpha 0.5, spatial, no newlines).",
    )
    p.add_argument("--artifacts", required=True, metavar="DIR", help="bundle folder written by `python -m export`")
    p.add_argument("--image", required=True, action="append", metavar="IMG",
                   help="image file (PNG, JPEG, ...); give it again for several images, in prompt order")
    p.add_argument("--prompt", required=True, metavar="TEXT",
                   help="the question; the image slot is added for you, or put one <image> where each image goes")
    p.add_argument("--budget", type=budget, metavar="R|auto",
                   help="share of the visual tokens to keep, in (0, 1]; 1.0 = the stock model; auto = the largest "
                        "share predicted to meet --target-ttft-ms")
    p.add_argument("--target-ttft-ms", type=float, metavar="MS",
                   help="with --budget auto: the time to first token to meet, in milliseconds")
    p.add_argument("--selector", metavar="NAME",
                   help=f"which tokens the budget keeps: {', '.join(SELECTORS)} (default {_D.selector})")
    p.add_argument("--alpha", type=float, metavar="A", help="share of the budget for the base image, in [0, 1]")
    p.add_argument("--distribution", choices=["spatial", "official"],
                   help="how crops share the budget: spatial (paper Eq. 1, exact) or official (published code)")
    p.add_argument("--newlines", choices=["none", "rows"],
                   help="newline embeddings in the pruned span: none (HiRED) or one per kept canvas row")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help=f"stop after N new tokens (default {_D.max_new_tokens})")
    p.add_argument("--min-new-tokens", type=int, metavar="N",
                   help=f"EOS cannot end the answer before N tokens (default {_D.min_new_tokens})")
    p.add_argument("--temperature", type=float, help=f"0 = greedy (default {_D.temperature}); > 0 samples")
    p.add_argument("--top-p", type=float, help=f"nucleus sampling mass, in (0, 1] (default {_D.top_p})")
    p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--provider", choices=PROVIDERS, default="cpu",
                   help="execution provider; cuda/tensorrt fall back to CPU with a warning if unavailable")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="onnxruntime intra-op threads of each graph (default: onnxruntime's own, one per physical "
                   "core)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse larger images (default {format_pixels(DEFAULT_MAX_PIXELS)})")
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON line, last on stdout (streamed text goes to stderr)")
    p.add_argument("--dump", metavar="DIR", help="write pixel_values, scores, kept indices, inputs_embeds, logits "
                   "(per-image files get an index suffix, pixel_values_0.npy, ..., when there are several images)")
    p.add_argument("--show-kept", metavar="OUT.png",
                   help=f"write the image with kept patches lit, dropped dimmed ({', '.join(PICTURE_FORMATS)})")
    return p  # fmt: skip


def positive_int(text: str) -> int:
    """--threads: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def budget(text: str) -> float | str:
    """--budget: a number, or "auto"."""
    return text if text == "auto" else float(text)


def request_options(args: argparse.Namespace) -> dict:
    """The RequestOptions keywords the command line set (the rest keep their defaults)."""
    return {name: getattr(args, name) for name in RequestOptions.names() if getattr(args, name, None) is not None}


def check_outputs(dump: str | None, show_kept: str | None) -> None:
    """Refuse, before any model runs, output paths that cannot be written (OutputError, one line)."""
    if dump is not None:
        folder = Path(dump)
        if folder.exists() and not folder.is_dir():
            raise OutputError(f"--dump {dump}: a file of that name exists; give a folder (it is created if missing)")
        parent = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"--dump {dump}: {parent} is not a writable folder; choose another place")
    if show_kept is not None:
        out = Path(show_kept)
        if out.suffix.lower() not in PICTURE_FORMATS:
            raise OutputError(
                f"--show-kept {show_kept}: unknown picture type {out.suffix or '(no extension)'!r}; end the name "
                f"with one of {', '.join(PICTURE_FORMATS)}"
            )
        if out.is_dir():
            raise OutputError(f"--show-kept {show_kept} is a folder; give a file name such as kept.png")
        parent = out.parent
        if not parent.is_dir():
            raise OutputError(f"--show-kept {show_kept}: the folder {parent} does not exist; create it first")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"--show-kept {show_kept}: the folder {parent} is not writable")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s", stream=sys.stderr)
    out = sys.stderr if args.json else sys.stdout
    try:
        check_outputs(args.dump, args.show_kept)
        options = RequestOptions.from_kwargs(**request_options(args))  # bad option values: before loading
        result = run(args, options, out)
    except HiredError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # writing the outputs (disk full, permissions changed meanwhile)
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: still one line, and it says so
        print(f"error: internal error {type(e).__name__}: {' '.join(str(e).split())[:500]}; please report it",
              file=sys.stderr)  # fmt: skip
        return 1
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        v, t = result.visual_tokens, result.timings_ms
        print(
            f"[visual tokens {v['kept']}/{v['before']} (per image {list(v['per_image'])}), budget "
            f"{result.budget['rate']} -> total {result.budget['total']}; vision {t['vision']:.0f} ms, "
            f"prefill {t['prefill']:.0f} ms, decode {t['decode']:.0f} ms, total {t['total']:.0f} ms on {result.provider}, "
            f"weights {result.quant}]",
            file=sys.stderr,
        )
    return 0


def run(args: argparse.Namespace, options: RequestOptions, out):
    """Load, stream the answer to `out`, write the dump and the picture; returns the GenerationResult."""
    from runtime.pipeline import Pipeline, Trace  # after parsing, so --help is instant

    load = {"provider": args.provider, "max_pixels": args.max_pixels, "threads": args.threads}
    with Pipeline.load(args.artifacts, **load) as pipe:
        trace = Trace() if (args.dump or args.show_kept) else None
        images = args.image if len(args.image) > 1 else args.image[0]
        stream = pipe.stream(images, args.prompt, trace=trace, **options.to_dict())
        for piece in stream:
            out.write(piece)
            out.flush()
        out.write("\n")
        result = stream.result
        if args.dump:
            write_dump(Path(args.dump), trace)
        if args.show_kept:
            from runtime.visualize import render_kept

            out_path = Path(args.show_kept)
            for i, (one, path) in enumerate(per_image(trace, out_path.parent / out_path.stem, out_path.suffix)):
                picture = render_kept(one, pipe.manifest.image_processor, result, image=i)
                picture.save(path, format=PICTURE_FORMATS[out_path.suffix.lower()])
    return result


def per_image(trace, stem: Path, suffix: str) -> list:
    """[(the Trace of image i, stem + suffix)] for one image; stem_0 + suffix, stem_1 + suffix, ... for several."""
    if len(trace.images) <= 1:
        return [(trace, stem.with_name(stem.name + suffix))]
    return [(one, stem.with_name(f"{stem.name}_{i}{suffix}")) for i, one in enumerate(trace.images)]


def write_dump(folder: Path, trace) -> None:
    """The intermediate arrays of one request (a runtime.pipeline.Trace), for comparing a device's run with a
    reference: pixel_values.npy, early_scores.npy, late_scores.npy, inputs_embeds.npy, prefill_logits.npy and
    kept_indices.json ({"per_image": [[token, ...], ...], "order": [...]}). With several images the per-image
    files get an index suffix (pixel_values_0.npy, ..., kept_indices_0.json, ...); inputs_embeds.npy and
    prefill_logits.npy stay one array each."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("inputs_embeds", "prefill_logits"):
        np.save(folder / f"{name}.npy", np.asarray(getattr(trace, name)))
    for name in IMAGE_ARRAYS:
        for one, path in per_image(trace, folder / name, ".npy"):
            np.save(path, np.asarray(getattr(one, name)))
    for one, path in per_image(trace, folder / "kept_indices", ".json"):
        kept = {"per_image": [k.tolist() for k in one.kept_indices], "order": one.order.tolist()}
        path.write_text(json.dumps(kept))


if __name__ == "__main__":
    sys.exit(main())
