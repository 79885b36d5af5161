"""The runtime's feature-similarity graphs (runtime/graphs/nearest_<dtype>.onnx): which target each token joins.

    python -m export.nearest_graph            # (re)write runtime/graphs/ from this file
    python -m export.nearest_graph --check    # exit 1 when a committed graph differs from what this builds

VisionZip's contextual grouping (hired.selectors) asks, for every remaining token of an image, which of the
image's G target tokens is most similar. The runtime answers on onnxruntime (MLAS), not numpy's BLAS, for a
batch of B images with the same number of targets at once:

    targets = GatherND(features, target ids [B, G]) -> float32 -> / L2 norms (a zero row stays zero)  [B, G, D]
    features [B, N, D] (fp32 or fp16) -> float32 -> MatMul(features, targets^T)                     [B, N, G]
    -> ArgMax over G (first maximum on ties)                                                     labels int64 [B, N]

Every token's product is computed (gathering the [R, D] remaining rows first is a single-threaded copy that costs
more than the dominant rows it skips); the runtime reads the remaining tokens' labels. The runtime cannot import
onnx, so the graphs are committed files; tests/test_selectors_runtime.py checks they are what this module builds.
"""

from __future__ import annotations

import argparse
import sys

import onnx
from onnx import TensorProto, helper

from runtime.similarity import GRAPH_DIR, INPUTS, OUTPUT, graph_path

OPSET = 17  # every op here exists at opset 13+; 17 runs on every onnxruntime the bundles need (>= 1.14)
IR_VERSION = 8
ELEMENT_TYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}


def build(dtype: str) -> onnx.ModelProto:
    """The similarity graph for features of `dtype` ("fp32" or "fp16"): features [B, N, D], targets int64 [B, G]
    (row ids into each image's N tokens) -> labels int64 [B, N] (the index into targets of each token's nearest)."""
    if dtype not in ELEMENT_TYPES:
        raise ValueError(f"dtype must be one of {', '.join(ELEMENT_TYPES)}, got {dtype!r}")
    features, targets = INPUTS
    node = helper.make_node
    x, picked = features, "picked"
    nodes = [
        node("Unsqueeze", [targets, "last_axis"], ["target_index"]),  # [B, G, 1]
        node("GatherND", [features, "target_index"], [picked], batch_dims=1),  # [B, G, D]
    ]
    if dtype != "fp32":
        nodes += [node("Cast", [features], ["features_f32"], to=TensorProto.FLOAT),
                  node("Cast", [picked], ["picked_f32"], to=TensorProto.FLOAT)]  # fmt: skip
        x, picked = "features_f32", "picked_f32"
    nodes += [
        node("ReduceSumSquare", [picked], ["norms2"], axes=[2], keepdims=1),  # [B, G, 1]
        node("Sqrt", ["norms2"], ["norms"]),
        node("Greater", ["norms", "zero"], ["nonzero"]),
        node("Where", ["nonzero", "norms", "one"], ["divisors"]),
        node("Div", [picked, "divisors"], ["unit"]),  # [B, G, D] unit vectors
        node("Transpose", ["unit"], ["unit_t"], perm=[0, 2, 1]),  # [B, D, G]
        node("MatMul", [x, "unit_t"], ["sims"]),  # [B, N, G]
        node("ArgMax", ["sims"], [OUTPUT], axis=2, keepdims=0),  # first maximum on ties
    ]
    constants = [
        helper.make_tensor("last_axis", TensorProto.INT64, [1], [2]),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
    ]
    graph = helper.make_graph(
        nodes,
        f"nearest_{dtype}",
        [
            helper.make_tensor_value_info(features, ELEMENT_TYPES[dtype], ["B", "N", "D"]),
            helper.make_tensor_value_info(targets, TensorProto.INT64, ["B", "G"]),
        ],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.INT64, ["B", "N"])],
        initializer=constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="hired-edge")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def stale() -> list[str]:
    """The committed graphs that are missing or differ from what `build` makes (file names)."""
    out = []
    for dtype in ELEMENT_TYPES:
        path = graph_path(dtype)
        if not path.is_file() or onnx.load_model_from_string(path.read_bytes()) != build(dtype):
            out.append(path.name)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.nearest_graph", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check the committed graphs; exit 1 if stale")
    args = p.parse_args(argv)
    if args.check:
        bad = stale()
        if bad:
            print(f"stale: {', '.join(bad)}; run python -m export.nearest_graph", file=sys.stderr)
            return 1
        print(f"{GRAPH_DIR}: up to date")
        return 0
    GRAPH_DIR.mkdir(parents=True, exist_ok=True)
    for dtype in ELEMENT_TYPES:
        graph_path(dtype).write_bytes(build(dtype).SerializeToString())
        print(f"wrote {graph_path(dtype)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
