"""Weight-only int4/int8 quantization of the decoder: MatMul(x, W) -> com.microsoft.MatMulNBits.

    from export.quantize import quantize_weight, quantize_decoder_file
    q = quantize_weight(w, bits=4, block_size=32)       # one float [K, N] weight -> packed, scales, zero points
    quantize_decoder_file("bundle/decoder.onnx", "int4")  # the in-memory route: rewrite a saved decoder graph
    quantize_bundle(staging_folder, "int4")              # ... and the manifest (export_model --quant runs this)
    requantize("artifacts/bench", "artifacts/bench-int4", "int4")  # a quantized copy of a float bundle (the
                                                                 # command line is python -m export --quant)

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

import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.defaults import DEFAULT_BLOCK_SIZE
from runtime.quant import BITS, METHODS, MIN_ONNXRUNTIME

if TYPE_CHECKING:
    from runtime.manifest import Manifest

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
    "plan_streaming",
    "quant_spec",
    "quantize_bundle",
    "quantized_initializers",
    "requantize",
    "with_quant",
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
    quantize(packed, w, scales, zero_points, block_size, n, k, False)  # k: the padded rows never count
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
        name = (node.name or node.output[0]) + f"_Q{bits}"
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


def plan_streaming(model, specs: list, method: str, block_size: int = DEFAULT_BLOCK_SIZE, *,
                   accuracy_level: int = ACCURACY_LEVEL):
    """For the streaming writer (export.stream.write_graph and its per-tensor hook): quantize while writing.

    `model`: the data-less onnx_ir model of the decoder; `specs`: its pending [(initialiser value, WeightSpec)].
    Each top-level MatMul whose B is a pending 2-D weight read by MatMuls only (directly, or through one
    Transpose(perm=[1, 0]), as a traced nn.Linear stores W [N, K]) becomes MatMulNBits here, reading
    three new data-less initialisers. Returns (specs, transform) for write_graph: the float weight's entry now
    points at the packed initialiser, and transform(spec, values) quantizes the drawn float values into it; two
    entries after it (kind "zeros", so drawing them costs nothing) receive the scales and zero points computed
    then (a run of consecutive weights writes its packed weights first, then their scales, then their zero
    points: only their scales and zero points wait in memory).
    """
    import onnx_ir as ir
    from onnx_ir.convenience import replace_nodes_and_values

    bits = BITS[method]
    check_block_size(block_size)
    graph = model.graph
    pending = {id(v): (v, spec) for v, spec in specs}
    readers: dict[int, list] = {}  # weight id -> the MatMuls reading it (directly, or through one Transpose)
    flipped: dict[int, object] = {}  # weight id -> its Transpose(perm=[1, 0]) node (traced nn.Linear: W is [N, K])
    for node in graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        b = node.inputs[1]
        t = b.producer() if b is not None else None
        if t is not None and t.op_type == "Transpose" and t.domain in ("", "ai.onnx") and _is_2d_flip(t):
            b = t.inputs[0]
        if b is None or id(b) not in pending or len(pending[id(b)][1].shape) != 2:
            continue
        if t is not None and b is t.inputs[0]:
            if flipped.setdefault(id(b), t) is not t:
                continue
        readers.setdefault(id(b), []).append(node)
    replaced: dict[int, list] = {}
    parts: dict[str, tuple[str, str]] = {}  # pseudo spec name -> (float spec name, "scales" | "zero_points")
    for wid, nodes in readers.items():
        w, spec = pending[wid]
        t = flipped.get(wid)
        direct_uses = len(t.outputs[0].uses()) if t is not None else len(w.uses())
        if direct_uses != len(nodes) or (t is not None and len(w.uses()) != 1) or w.is_graph_output():
            continue  # read by something else too: keep it float
        k, n = spec.shape[::-1] if t is not None else spec.shape
        blocks = -(-k // block_size)
        prefix = _safe(w.name)
        shapes = {
            f"{prefix}_Q{bits}": ((n, blocks, block_size * bits // 8), np.dtype(np.uint8)),
            f"{prefix}_scales": ((n, blocks), np.dtype(spec.dtype)),
            f"{prefix}_zero_points": ((n, -(-blocks * bits // 8)), np.dtype(np.uint8)),
        }
        new_values = []
        for name, (shape, dtype) in shapes.items():
            v = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.from_numpy(dtype)))
            graph.initializers.add(v)
            new_values.append(v)
        for node in nodes:
            attrs = [ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", bits),
                     ir.AttrInt64("block_size", block_size)]
            if accuracy_level:
                attrs.append(ir.AttrInt64("accuracy_level", accuracy_level))
            new = ir.Node(MS_DOMAIN, "MatMulNBits", [node.inputs[0], *new_values], attrs, num_outputs=1,
                          name=f"{node.name or node.outputs[0].name}_Q{bits}")
            replace_nodes_and_values(graph, node, [node], [new], node.outputs, new.outputs)
        if t is not None:
            graph.remove(t, safe=True)
        graph.initializers.pop(w.name)
        packed, scales, zero_points = new_values
        replaced[wid] = [
            (packed, spec),
            (scales, dataclasses.replace(spec, name=f"{spec.name}#scales", shape=shapes[scales.name][0], kind="zeros")),
            (zero_points, dataclasses.replace(spec, name=f"{spec.name}#zero_points",
                                              shape=shapes[zero_points.name][0], dtype=np.dtype(np.uint8), kind="zeros")),
        ]
        parts[f"{spec.name}#scales"] = (spec.name, "scales")
        parts[f"{spec.name}#zero_points"] = (spec.name, "zero_points")
    if replaced:
        model.opset_imports[MS_DOMAIN] = 1
    # Consecutive quantized weights (a layer's q, k, v, ...) are written as all their packed weights, then all
    # their scales, then all their zero points: so q, k and v each lie back to back, and export.decoder_weights.pack_qkv
    # packs them into one MatMulNBits without copying any data.
    out_specs, run = [], []
    for v, spec in [*specs, (None, None)]:
        if v is not None and id(v) in replaced:
            run.append(replaced[id(v)])
            continue
        out_specs += [parts_[j] for j in range(3) for parts_ in run]
        run = []
        if v is not None:
            out_specs.append((v, spec))
    targets = {pending[wid][1].name: wid in flipped for wid in replaced}  # float spec name -> stored [N, K]
    done: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # float spec name -> (scales, zero points)

    def transform(spec, values: np.ndarray) -> np.ndarray:
        if spec.name in targets:
            q = quantize_weight(values.T if targets[spec.name] else values, bits, block_size)
            done[spec.name] = (q.scales, q.zero_points)  # kept until written; the packed weight is written now
            return q.packed
        if spec.name in parts:
            base, part = parts[spec.name]
            return done[base][0] if part == "scales" else done.pop(base)[1]
        return values

    return out_specs, transform


def with_quant(manifest: Manifest, method: str, block_size: int = DEFAULT_BLOCK_SIZE) -> Manifest:
    """`manifest` recording its decoder's quantization: `quant`, and in export_info the larger of the opset's and
    MatMulNBits' minimum onnxruntime."""
    from runtime.manifest import QuantSpec
    from runtime.quant import version_tuple

    info = dict(manifest.export_info)
    old_min = str(info.get("min_onnxruntime", "0"))
    need = MIN_ONNXRUNTIME[method]
    info["min_onnxruntime"] = old_min if version_tuple(old_min) >= version_tuple(need) else need
    return dataclasses.replace(manifest, export_info=info, quant=QuantSpec(**quant_spec(method, block_size)))


def quantize_bundle(
    folder: str | os.PathLike,
    method: str,
    block_size: int = DEFAULT_BLOCK_SIZE,
    *,
    log: Callable[[str], None] | None = None,
) -> Manifest:
    """Quantize, in place, the decoder of the float bundle in `folder` (a staging folder) and update manifest.json.

    The manifest gains `quant`, the decoder's new sha256 (and no `decoder_data` once the weights fit in the .onnx)
    and, in export_info, the larger of the opset's and MatMulNBits' minimum onnxruntime.
    """
    from runtime.manifest import MANIFEST_NAME, Manifest, sha256_file

    folder = Path(folder)
    manifest = Manifest.from_file(folder, verify=False)
    if manifest.quant.method != "none":
        raise ValueError(f"{folder} is already {manifest.quant.method}-quantized; quantize its float bundle instead")
    spec = quant_spec(method, block_size)
    graph = folder / manifest.files["decoder"]
    before = graph.stat().st_size + (Path(str(graph) + ".data").stat().st_size if Path(str(graph) + ".data").exists() else 0)
    t0 = time.perf_counter()
    count = quantize_decoder_file(graph, method, block_size)
    files, sha = dict(manifest.files), dict(manifest.sha256)
    data = Path(str(graph) + ".data")
    if data.exists():
        files["decoder_data"], sha["decoder_data"] = data.name, sha256_file(data)
    else:
        files.pop("decoder_data", None)
        sha.pop("decoder_data", None)
    sha["decoder"] = sha256_file(graph)
    new = with_quant(dataclasses.replace(manifest, files=files, sha256=sha), method, block_size)
    seconds = {**new.export_info.get("seconds", {}), "quantize": round(time.perf_counter() - t0, 2)}
    new = dataclasses.replace(new, export_info={**new.export_info, "seconds": seconds})
    new.to_file(folder / MANIFEST_NAME)
    stamp = folder / ".verified.json"
    if stamp.exists():
        stamp.unlink()
    after = graph.stat().st_size + (data.stat().st_size if data.exists() else 0)
    if log:
        log(
            f"{graph.name}: {count} MatMul -> MatMulNBits ({method}, block {block_size}, accuracy_level "
            f"{spec['accuracy_level']}): {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f} s"
        )
    return Manifest.from_file(folder)


def requantize(src: str | os.PathLike, out: str | os.PathLike, method: str, block_size: int = DEFAULT_BLOCK_SIZE,
               *, force: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """Copy the float bundle `src` to `out` (staged, moved into place last) with its decoder quantized."""
    from export.staging import Staging
    from runtime.manifest import Manifest

    manifest = Manifest.from_file(src)
    with Staging(Path(out), force=force, keep=[Path(src)]) as stage:
        for name in [*manifest.files.values(), "manifest.json"]:
            shutil.copy2(Path(src) / name, stage.path / name)
        quantize_bundle(stage.path, method, block_size, log=log)
        stage.commit()
    return Path(out)


def _tensor_bytes(t: TensorProto) -> int:
    if t.raw_data:
        return len(t.raw_data)
    return int(np.prod(t.dims, dtype=np.int64)) * 4


def _safe(name: str) -> str:
    return name.replace("/", "_").replace(":", "_")


def _is_2d_flip(node) -> bool:
    perm = node.attributes.get("perm")
    return perm is not None and list(perm.as_ints()) == [1, 0]


def _subgraph_inputs(node: onnx.NodeProto) -> list[str]:
    names = []
    for attr in node.attribute:
        for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            for n in g.node:
                names.extend(n.input)
                names.extend(_subgraph_inputs(n))
    return names
