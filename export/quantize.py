"""Weight-only int4/int8 quantization of the decoder: MatMul(x, W) -> com.microsoft.MatMulNBits.

    from export.quantize import quantize_weight, quantize_decoder_file
    q = quantize_weight(w, bits=4, block_size=32)       # one float [K, N] weight -> packed, scales, zero points
    quantize_decoder_file("bundle/decoder.onnx", "int4")  # the in-memory route: rewrite a saved decoder graph

`quantize_weight` works on one tensor at a time, so the streaming (7B) route can quantize each linear layer as it
writes it and never holds the float model. The packing is onnxruntime's own (the C++ block quantizer its
`onnxruntime.quantization.matmul_nbits_quantizer` calls): asymmetric round-to-nearest per block of `block_size`
values down K, one scale (in the weight's float dtype) and one uint8 zero point per block and output column:

    packed       uint8 [N, K/block, block*bits/8]     (K padded up to a whole block with zeros)
    scales       float [N, K/block]
    zero_points  uint8 [N, ceil(K/block * bits/8)]    (int4: two blocks per byte, low nibble first)

`quantize_graph` rewrites every top-level MatMul whose B input is a 2-D float initializer (the decoder's
q/k/v/o, gate/up/down projections and lm_head; the exporter writes nn.Linear as MatMul with W^T stored [K, N])
into MatMulNBits(x, packed, scales, zero_points; K, N, bits, block_size, accuracy_level). accuracy_level 4 lets
the CPU kernel quantize the activations to int8 per block and use integer dot products (MLAS CompInt8), the
setting onnxruntime-genai's builder uses on CPU; other providers ignore it. The vision tower and the projector are
never touched: quantized ViTs drift and they are a small share of the work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime.quant import BITS, METHODS, MIN_ONNXRUNTIME

DEFAULT_BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations on CPU (MLAS CompInt8); ignored by other providers
MS_DOMAIN = "com.microsoft"
TWO_GB_MARGIN = 1_900_000_000  # protobuf's 2 GB limit, with room for the graph itself
_FLOATS = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}

__all__ = [
    "ACCURACY_LEVEL",
    "DEFAULT_BLOCK_SIZE",
    "METHODS",
    "MIN_ONNXRUNTIME",
    "QuantizedWeight",
    "check_block_size",
    "dequantize_weight",
    "matmul_nbits_node",
    "quant_spec",
    "quantized_initializers",
    "quantize_decoder_file",
    "quantize_graph",
    "quantize_weight",
]


@dataclass(frozen=True)
class QuantizedWeight:
    """One [K, N] weight in MatMulNBits layout (see the module docstring)."""

    packed: np.ndarray  # uint8 [N, K/block, block*bits/8]
    scales: np.ndarray  # weight dtype [N, K/block]
    zero_points: np.ndarray  # uint8 [N, ceil(K/block * bits/8)]
    k: int
    n: int
    bits: int
    block_size: int

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + self.zero_points.nbytes


def check_block_size(block_size: int) -> None:
    """ValueError unless a power of 2 >= 16 (MatMulNBits' requirement)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"--block-size must be a power of 2 >= 16 (16, 32, 64, 128, ...), got {block_size!r}")


def quant_spec(method: str, block_size: int = DEFAULT_BLOCK_SIZE) -> dict:
    """The manifest's `quant` entry for `method`."""
    if method not in METHODS:
        raise ValueError(f"--quant must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "none":
        return {"method": "none", "block_size": 0, "accuracy_level": 0}
    check_block_size(block_size)
    return {"method": method, "block_size": block_size, "accuracy_level": ACCURACY_LEVEL}


def quantize_weight(weight: np.ndarray, bits: int, block_size: int = DEFAULT_BLOCK_SIZE) -> QuantizedWeight:
    """Quantize one float32/float16 weight [K, N] (x @ W) to MatMulNBits' layout with onnxruntime's block quantizer."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    check_block_size(block_size)
    w = np.asarray(weight)
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D [K, N], got shape {w.shape}")
    if w.dtype not in (np.float32, np.float16):
        w = w.astype(np.float32)
    k, n = w.shape
    blocks = -(-k // block_size)
    if blocks * block_size != k:
        w = np.pad(w, ((0, blocks * block_size - k), (0, 0)))
    w = np.ascontiguousarray(w)
    per_byte = 8 // bits
    packed = np.zeros((n, blocks, block_size // per_byte), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=w.dtype)
    zero_points = np.zeros((n, -(-blocks // per_byte)), dtype=np.uint8)
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    quantize(packed, w, scales, zero_points, block_size, n, blocks * block_size, False)
    return QuantizedWeight(packed, scales, zero_points, k=k, n=n, bits=bits, block_size=block_size)


def dequantize_weight(q: QuantizedWeight) -> np.ndarray:
    """The float32 [K, N] weight MatMulNBits computes with: (q - zero_point) * scale per block."""
    n, blocks, _ = q.packed.shape
    if q.bits == 4:
        values = np.stack([q.packed & 0x0F, q.packed >> 4], axis=-1).reshape(n, blocks, q.block_size)
        zp = np.stack([q.zero_points & 0x0F, q.zero_points >> 4], axis=-1).reshape(n, -1)[:, :blocks]
    else:
        values, zp = q.packed, q.zero_points[:, :blocks]
    w = (values.astype(np.float32) - zp[..., None].astype(np.float32)) * q.scales.astype(np.float32)[..., None]
    return w.reshape(n, blocks * q.block_size)[:, : q.k].T.copy()


def quantized_initializers(q: QuantizedWeight, prefix: str) -> list[TensorProto]:
    """The three MatMulNBits initializers of `q`: `prefix`_Q{bits}, `prefix`_scales, `prefix`_zero_points."""
    return [
        numpy_helper.from_array(q.packed, f"{prefix}_Q{q.bits}"),
        numpy_helper.from_array(q.scales, f"{prefix}_scales"),
        numpy_helper.from_array(q.zero_points, f"{prefix}_zero_points"),
    ]


def matmul_nbits_node(
    x: str, out: str, q: QuantizedWeight, prefix: str, *, name: str = "", accuracy_level: int = ACCURACY_LEVEL
) -> onnx.NodeProto:
    """MatMulNBits computing `out` = x @ W from the initializers quantized_initializers(q, prefix) names."""
    attrs = {"K": q.k, "N": q.n, "bits": q.bits, "block_size": q.block_size}
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    inputs = [x, f"{prefix}_Q{q.bits}", f"{prefix}_scales", f"{prefix}_zero_points"]
    return helper.make_node("MatMulNBits", inputs, [out], name=name, domain=MS_DOMAIN, **attrs)


def quantize_graph(
    model: onnx.ModelProto, bits: int, block_size: int = DEFAULT_BLOCK_SIZE, *, accuracy_level: int = ACCURACY_LEVEL
) -> int:
    """Rewrite, in place, each top-level MatMul(x, W) with W a 2-D float initializer into MatMulNBits.

    Weights shared by several MatMuls are quantized once; a float initializer that nothing else reads is dropped.
    Weight values must be loaded (not external references). Returns the number of nodes rewritten.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    graph_inputs = {i.name for i in graph.input}  # an initializer that is also an input can be overridden: skip it
    readers: dict[str, int] = {}
    for name in [*(i for n in graph.node for i in n.input), *(o.name for o in graph.output),
                 *(i for n in graph.node for i in _subgraph_inputs(n))]:
        readers[name] = readers.get(name, 0) + 1

    done: dict[str, tuple[str, QuantizedWeight]] = {}  # float weight name -> (prefix, quantized)
    nodes, new_inits, count = [], [], 0
    for node in graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") else None
        if w is None or len(w.dims) != 2 or w.data_type not in _FLOATS or w.name in graph_inputs:
            nodes.append(node)
            continue
        if w.data_location == TensorProto.EXTERNAL:
            raise ValueError(f"weight {w.name!r} is external data; load the model with its weights first")
        if w.name not in done:
            q = quantize_weight(numpy_helper.to_array(w), bits, block_size)
            prefix = _safe(w.name)
            new_inits.extend(quantized_initializers(q, prefix))
            done[w.name] = (prefix, q)
        prefix, q = done[w.name]
        name = (node.name or w.name) + f"_Q{bits}"
        nodes.append(matmul_nbits_node(node.input[0], node.output[0], q, prefix, name=name, accuracy_level=accuracy_level))
        readers[w.name] -= 1
        count += 1
    keep = [t for t in graph.initializer if not (t.name in done and readers.get(t.name, 0) == 0)]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend([*keep, *new_inits])
    if done and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return count


def quantize_decoder_file(
    path: str | os.PathLike, method: str, block_size: int = DEFAULT_BLOCK_SIZE, *, accuracy_level: int = ACCURACY_LEVEL
) -> int:
    """Rewrite the saved graph at `path` (and its `<path>.data`, if any) with quantize_graph; returns nodes rewritten.

    The result keeps its weights inside the .onnx file when they fit protobuf's 2 GB limit (an old .data file is
    then deleted), else in one `<path>.data` file. Meant for a staging folder: the files are rewritten in place.
    """
    if method not in BITS:
        raise ValueError(f"method must be one of {', '.join(BITS)}, got {method!r}")
    path = Path(path)
    data = Path(str(path) + ".data")
    model = onnx.load(str(path), load_external_data=True)
    count = quantize_graph(model, BITS[method], block_size, accuracy_level=accuracy_level)
    external = sum(_tensor_bytes(t) for t in model.graph.initializer) > TWO_GB_MARGIN
    if data.exists():
        data.unlink()  # onnx appends to an existing external-data file
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data.name, size_threshold=1024)
    else:
        onnx.save(model, str(path))
    return count


def _tensor_bytes(t: TensorProto) -> int:
    if t.raw_data:
        return len(t.raw_data)
    return int(np.prod(t.dims, dtype=np.int64)) * 4


def _safe(name: str) -> str:
    return name.replace("/", "_").replace(":", "_")


def _subgraph_inputs(node: onnx.NodeProto) -> list[str]:
    names = []
    for attr in node.attribute:
        for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            for n in g.node:
                names.extend(n.input)
                names.extend(_subgraph_inputs(n))
    return names
