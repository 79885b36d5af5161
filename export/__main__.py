"""CLI: checkpoint -> verified ONNX artifact bundle.

    python -m export --model checkpoints/tiny --out artifacts/tiny --force --verify
    python -m export --model llava-next-7b --out artifacts/llava-next-7b-random --random-weights

The route is chosen here: a model that fits in RAM is loaded and exported as it is (fp32 unless --dtype);
a --random-weights model too large for this machine is built on the meta device and its seeded weights are
streamed to disk (fp16 unless --dtype; --verify then runs structural checks). The first line says which.

Bad input (unknown model, folder that is not LLaVA-NeXT, missing tokenizer, --out in the way or not
writable, --out holding the checkpoint or files that are not a bundle) prints one line to stderr and exits
with 2, writing nothing; a failed --verify exits with 1; Ctrl-C or SIGTERM exits with 130 and says what is
on disk. Progress goes to stderr, one line per stage with sizes and times.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from export.defaults import (
    BUNDLE_DTYPES,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_MEMORY_LIMIT_GIB,
    DEFAULT_OPSET,
    DEFAULT_SEED,
    MIN_ONNXRUNTIME,
    OPSETS,
    ROUTE_DTYPES,
)
from export.errors import ExportError, ExportInterrupted, VerificationError

EPILOG = (
    f"onnxruntime needed to run the bundle: opset 23 (the default; ONNX Attention, RotaryEmbedding and "
    f"RMSNormalization ops, about 2.5x faster prefill on CPU) needs onnxruntime >= {MIN_ONNXRUNTIME[23]}; "
    f"opset 18 runs on onnxruntime >= {MIN_ONNXRUNTIME[18]}. Exit codes: 0 done, 1 verification failed, "
    "2 bad input (nothing written), 3 the streaming route passed --memory-limit-gib (nothing written), "
    "130 interrupted (the message says what is on disk)."
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a LLaVA-NeXT checkpoint to an ONNX artifact bundle for the hired-edge runtime "
        "(vision.onnx with HiRED attention scores, projector.onnx, decoder.onnx with KV cache, "
        "embed_tokens.npy, image_newline.npy, tokenizer.json, manifest.json).",
        epilog=EPILOG,
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="NAME|PATH",
        help="registry name (tiny, llava-next-7b, ...; resolved to checkpoints/NAME or the local HF cache, "
        "downloaded from the hub when neither holds a complete copy) or a Hugging Face LLaVA-NeXT checkpoint folder",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="bundle folder to write, e.g. artifacts/tiny")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="seeded random weights with the model's config instead of its checkpoint weights (no download); "
        "uses the checkpoint's tokenizer if on disk, else the offline Mistral stand-in (recorded in the manifest)",
    )
    p.add_argument(
        "--dtype",
        choices=BUNDLE_DTYPES,
        default=None,
        help=f"weight and activation dtype of the graphs (default {ROUTE_DTYPES['in-memory']}; "
        f"{ROUTE_DTYPES['streaming']} for a --random-weights model too large for this machine's RAM, which is "
        "built on the meta device and its weights streamed to disk); attention scores and logits stay float32",
    )
    p.add_argument(
        "--opset",
        type=int,
        choices=OPSETS,
        default=DEFAULT_OPSET,
        metavar="N",
        help=f"ONNX opset, {OPSETS[0]}..{OPSETS[-1]} (default {DEFAULT_OPSET}; see the note below on onnxruntime "
        "versions)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="run every graph in onnxruntime against PyTorch (1 and 5 crops, kept tokens, 20 greedy steps) "
        "and exit 1 past tolerance; a failing bundle is kept as DIR.unverified",
    )
    p.add_argument(
        "--quant",
        choices=("none", "int8", "int4"),
        default="none",
        help="weight-only quantization of the decoder's linear layers and lm_head (com.microsoft.MatMulNBits, "
        "onnxruntime >= 1.17 for int4, >= 1.22 for int8); vision and projector stay in --dtype (default none)",
    )
    p.add_argument(
        "--block-size", type=int, default=DEFAULT_BLOCK_SIZE, metavar="N",
        help=f"--quant values per scale, a power of 2 >= 16 (default {DEFAULT_BLOCK_SIZE}; 128 packs a 7B smaller at a fidelity cost)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing --out that is a bundle this tool wrote (atomically, old bundle last); "
        "a folder holding anything else, or the --model checkpoint, is never replaced",
    )
    p.add_argument(
        "--download-dir",
        metavar="DIR",
        help="when --model is a registry name with no complete copy here, download it into DIR (a plain folder, "
        "e.g. checkpoints/NAME) instead of the Hugging Face cache; HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE apply",
    )
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed of --random-weights (default {DEFAULT_SEED})")
    p.add_argument(
        "--memory-limit-gib",
        type=float,
        default=DEFAULT_MEMORY_LIMIT_GIB,
        metavar="GIB",
        help=f"the streaming route stops (exit 3, nothing written) when resident memory passes this "
        f"(default {DEFAULT_MEMORY_LIMIT_GIB:g})",
    )
    return p


def _stop_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM (kill, systemd, docker stop) cleans up like Ctrl-C: no staging folder left


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from export.pipeline import export_model  # after parsing: --help stays light

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        export_model(
            args.model,
            args.out,
            random_weights=args.random_weights,
            dtype=args.dtype,
            opset=args.opset,
            verify=args.verify,
            force=args.force,
            seed=args.seed,
            memory_limit_gib=args.memory_limit_gib,
            quant=args.quant,
            block_size=args.block_size,
            download_dir=args.download_dir,
        )
    except (ExportError, VerificationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except ExportInterrupted as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # before export_model could say more
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
