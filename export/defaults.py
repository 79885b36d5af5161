"""The export's defaults, in one place, torch-free (the CLI's --help and error paths import only this).

    from export.defaults import DEFAULT_OPSET, BUNDLE_DTYPES, default_dtype
    default_dtype("in-memory")   # "fp32": the loaded model is exported as it is
    default_dtype("streaming")   # "fp16": 7B-class random-weight bundles, weights streamed from the meta device

Tokenizer kinds live in `models.registry` (TOKENIZER_CHECKPOINT, TOKENIZER_OFFLINE_MISTRAL); the HiRED
defaults written into every manifest are `export.bundle.HIRED_DEFAULTS`.
"""

from __future__ import annotations

BUNDLE_DTYPES = ("fp32", "fp16")  # weight and activation dtype of a bundle's graphs (scores and logits stay fp32)
ROUTES = ("in-memory", "streaming")
ROUTE_DTYPES = {"in-memory": "fp32", "streaming": "fp16"}  # default dtype of each route

OPSETS = (18, 19, 20, 21, 22, 23)  # the dynamo exporter starts at 18
DEFAULT_OPSET = 23  # ONNX Attention, RotaryEmbedding and RMSNormalization ops: ~2.5x faster CPU prefill
# Oldest onnxruntime able to run each opset's graphs: the Attention-23 CPU kernel arrived in onnxruntime 1.23
# (RotaryEmbedding-23 and RMSNormalization-23 in 1.22); opset 18 graphs run on 1.14. Opsets 19-22 are allowed
# but untested here.
MIN_ONNXRUNTIME = {18: "1.14", 23: "1.23"}
MIN_ONNXRUNTIME_UNTESTED = "untested here (only opsets 18 and 23 are tested)"
EXPORTER = "torch.onnx.export(dynamo=True)"

DEFAULT_SEED = 0  # seed of --random-weights
DEFAULT_MEMORY_LIMIT_GIB = 20.0  # the streaming route aborts past this resident memory
DEFAULT_BLOCK_SIZE = 32  # --quant values per MatMulNBits scale (128: a smaller packed 7B at a fidelity cost)


def default_dtype(route: str) -> str:
    """The dtype a route uses when none is asked for: "fp32" in memory, "fp16" streaming."""
    if route not in ROUTE_DTYPES:
        raise ValueError(f"route must be one of {', '.join(ROUTES)}, got {route!r}")
    return ROUTE_DTYPES[route]


def min_onnxruntime(opset: int) -> str:
    """The oldest onnxruntime known to run graphs of `opset` (a sentence for the untested opsets)."""
    return MIN_ONNXRUNTIME.get(opset, MIN_ONNXRUNTIME_UNTESTED)
