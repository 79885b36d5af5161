"""The decoder graph's weight rewrites (export.decoder.rewrite_attention runs them after group_query_attention):

- `pack_qkv`: a layer's q, k, v projections -> one MatMul on their concatenated weights, feeding GroupQueryAttention's
  packed query. An external weight is never rewritten: the packed weight is the byte range q, k, v already span
  in the data file (the streaming route writes them back to back), or the layer stays unpacked;
- `append_external`: large new initialisers (the rotary caches) appended, page aligned, to the graph's data file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from export.decoder_graph import prune_dead_nodes


def pack_qkv(graph: onnx.GraphProto) -> int:
    """Each GroupQueryAttention reading q, k, v from three projections of one input becomes one projection on the
    concatenated weights, its output the packed `query` (key and value empty), in place. Returns the layers packed.

    Projections: MatMul(x, W [K, N]) (in-memory route), MatMul(x, Transpose(W [N, K])) (streaming route, float)
    or MatMulNBits(x, Q, scales, zero_points) (streaming route, quantized while written). The packed weight is a new
    initialiser when the three are stored in the graph; for external data it is the byte range the three span when
    they lie back to back in one file in q, k, v order and concatenate on their first axis (the streaming writer
    writes them so); otherwise that layer stays unpacked. Weights nothing else reads are dropped.
    """
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    outputs = {o.name for o in graph.output}
    added, packed = [], 0
    for gqa in graph.node:
        if gqa.op_type != "GroupQueryAttention" or len(gqa.input) < 3 or not gqa.input[1] or not gqa.input[2]:
            continue
        mms = [producer.get(x) for x in gqa.input[:3]]
        if any(m is None for m in mms) or len({(m.op_type, m.domain, m.input[0]) for m in mms}) != 1:
            continue
        if any(readers.get(m.output[0], 0) != 1 or m.output[0] in outputs for m in mms):
            continue
        plan = _pack_plan(mms, producer, inits, readers)
        if plan is None:
            continue
        parts, axes, write = plan
        tensors = [_concat([inits[n] for n in names], axis, f"{gqa.name}_qkv_{j}")
                   for j, (names, axis) in enumerate(zip(parts, axes))]
        if any(t is None for t in tensors):
            continue
        added.extend(tensors)
        write([t.name for t in tensors])
        mms[0].output[0] = f"{gqa.name}_qkv"
        gqa.input[0], gqa.input[1], gqa.input[2] = f"{gqa.name}_qkv", "", ""
        packed += 1
    graph.initializer.extend(added)
    prune_dead_nodes(graph)
    return packed


def _pack_plan(mms, producer, inits, readers):
    """(initialiser names per packed input [q, k, v], concat axis per input, setter of mms[0]'s new inputs) or None."""
    def attrs(node):
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    first = mms[0]
    if first.op_type == "MatMulNBits" and first.domain == "com.microsoft":
        a = [attrs(m) for m in mms]
        if any(len(m.input) != 4 for m in mms) or any({k: v for k, v in x.items() if k != "N"} !=
                                                      {k: v for k, v in a[0].items() if k != "N"} for x in a):
            return None
        parts = [[m.input[j] for m in mms] for j in (1, 2, 3)]
        if any(n not in inits or readers.get(n, 0) != 1 for names in parts for n in names):
            return None

        def write(names):
            first.input[1], first.input[2], first.input[3] = names
            for att in first.attribute:
                if att.name == "N":
                    att.i = sum(int(x["N"]) for x in a)
        return parts, (0, 0, 0), write
    if first.op_type != "MatMul" or first.domain not in ("", "ai.onnx"):
        return None
    weights = [m.input[1] for m in mms]
    if all(w in inits and len(inits[w].dims) == 2 and readers.get(w, 0) == 1 for w in weights):
        def write(names):
            first.input[1] = names[0]
        return [weights], (1,), write
    flips = [producer.get(w) for w in weights]
    if any(t is None or t.op_type != "Transpose" or attrs(t).get("perm") != [1, 0] or readers.get(w, 0) != 1
           for t, w in zip(flips, weights)):
        return None
    stored = [t.input[0] for t in flips]
    if not all(w in inits and len(inits[w].dims) == 2 and readers.get(w, 0) == 1 for w in stored):
        return None

    def write(names):
        flips[0].input[0] = names[0]
    return [stored], (0,), write


def _concat(tensors: list, axis: int, name: str):
    """`tensors` concatenated on `axis` as one initialiser `name`, or None when that would copy external data."""
    if len({(t.data_type, tuple(d for i, d in enumerate(t.dims) if i != axis)) for t in tensors}) != 1:
        return None
    if all(t.data_location != TensorProto.EXTERNAL for t in tensors):
        return onnx.numpy_helper.from_array(np.concatenate([onnx.numpy_helper.to_array(t) for t in tensors], axis), name)
    if axis != 0 or any(t.data_location != TensorProto.EXTERNAL for t in tensors):
        return None
    ext = [{e.key: e.value for e in t.external_data} for t in tensors]
    if len({e.get("location") for e in ext}) != 1 or any("offset" not in e or "length" not in e for e in ext):
        return None
    for a, b in zip(ext, ext[1:]):
        if int(a["offset"]) + int(a["length"]) != int(b["offset"]):
            return None
    out = TensorProto(name=name, data_type=tensors[0].data_type, data_location=TensorProto.EXTERNAL)
    out.dims.extend([sum(t.dims[0] for t in tensors), *tensors[0].dims[1:]])
    for key, value in (("location", ext[0]["location"]), ("offset", ext[0]["offset"]),
                       ("length", str(sum(int(e["length"]) for e in ext)))):
        out.external_data.add(key=key, value=value)
    return out


def append_external(graph: onnx.GraphProto, base_dir: Path, min_elements: int = 4096) -> int:
    """When the graph keeps its weights in one external-data file, move inline initialisers of at least
    `min_elements` (what the rewrite added: the rotary caches) to the end of that file, page aligned. Returns the
    bytes appended (0: nothing moved, the file is as it was)."""
    locations = {e.value for t in graph.initializer if t.data_location == TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
    big = [t for t in graph.initializer if t.data_location != TensorProto.EXTERNAL and int(np.prod(t.dims)) >= min_elements]
    if len(locations) != 1 or not big:
        return 0
    location = locations.pop()
    data = base_dir / location
    start = data.stat().st_size
    with open(data, "ab") as f:
        for t in big:
            raw = onnx.numpy_helper.to_array(t).tobytes()
            f.write(bytes(-f.tell() % 4096))
            offset = f.tell()
            f.write(raw)
            t.ClearField("raw_data")
            for field in ("float_data", "int32_data", "int64_data", "double_data"):
                t.ClearField(field)
            t.data_location = TensorProto.EXTERNAL
            del t.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
                t.external_data.add(key=key, value=value)
        end = f.tell()
    return end - start
