"""The decoder graph's rewrites after export (export.decoder.rewrite_attention picks them; the streaming route
runs the same on its saved graph): onnx graph surgery only, no torch. The weight rewrites that follow GQA
(packed q/k/v, the rotary caches in external data) are export/decoder_weights.py.

- `group_query_attention`: each layer's Concat(past, new) + repeat_kv Expand + Attention -> one com.microsoft
  GroupQueryAttention on a shared past/present buffer (rotary inside it where the RoPE frequencies are static);
- `fuse_residual_norms`: Add + RMSNormalization -> SkipSimplifiedLayerNormalization;
- `block_causal_attention`: the fallback (concat cache), each masked Attention split into causal query blocks;
- `set_kv_cache`: the graph metadata saying which of the two forms it has.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from export.spec import DECODER_INPUTS


def block_causal_attention(graph: onnx.GraphProto, blocks: int) -> int:
    """Split each Attention(Q [b,H,s,D], K/V [b,h,p+s,D], mask [b,1,s,p+s]) node into `blocks` query blocks.

    Block j = rows [s*j // blocks, s*(j+1) // blocks) of Q and the mask, keys [0, p + s*(j+1) // blocks):
    the keys after that are masked for all its rows by causality. Concat of the blocks on axis 2 = the old
    output. Taken when s >= blocks (an If), else the original node runs. Returns the number of nodes rewritten.
    """
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
    nodes, count = [], 0
    for node in graph.node:
        if node.op_type != "Attention" or len(node.input) != 4 or not node.input[3] or len(node.output) != 1:
            nodes.append(node)
            continue
        elem = types.get(node.output[0]) or types.get(node.input[0])
        if not elem:
            raise ValueError(f"no element type recorded for Attention output {node.output[0]!r}; run shape inference first")
        count += 1
        nodes.extend(_blocked_attention(node, blocks, elem, f"{node.name or node.output[0]}_blk"))
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def _blocked_attention(node: onnx.NodeProto, blocks: int, elem: int, tag: str) -> list[onnx.NodeProto]:
    """[Shape/If nodes] computing node.output[0] blockwise when s >= blocks, else with `node` itself."""
    q, k, v, mask = node.input
    out = node.output[0]
    attrs = list(node.attribute)

    def const(name: str, values: list[int]) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))

    n = lambda name: f"{tag}_{name}"  # noqa: E731
    outer = [
        helper.make_node("Shape", [q], [n("s")], start=2, end=3),
        helper.make_node("Shape", [k], [n("total")], start=2, end=3),
        helper.make_node("Sub", [n("total"), n("s")], [n("past")]),
        const(n("nblk"), [blocks]),
        helper.make_node("GreaterOrEqual", [n("s"), n("nblk")], [n("big1")]),
        helper.make_node("Squeeze", [n("big1")], [n("big")]),
    ]
    body = [const(n("ax2"), [2]), const(n("ax23"), [2, 3]), const(n("zero"), [0])]
    ends = [n("zero")]
    for j in range(1, blocks + 1):
        body += [const(n(f"j{j}"), [j]), helper.make_node("Mul", [n("s"), n(f"j{j}")], [n(f"sj{j}")]),
                 helper.make_node("Div", [n(f"sj{j}"), n("nblk")], [n(f"e{j}")])]
        ends.append(n(f"e{j}"))
    outs = []
    for j in range(blocks):
        lo, hi = ends[j], ends[j + 1]
        body += [
            helper.make_node("Add", [n("past"), hi], [n(f"ke{j}")]),
            helper.make_node("Slice", [q, lo, hi, n("ax2")], [n(f"q{j}")]),
            helper.make_node("Slice", [k, n("zero"), n(f"ke{j}"), n("ax2")], [n(f"k{j}")]),
            helper.make_node("Slice", [v, n("zero"), n(f"ke{j}"), n("ax2")], [n(f"v{j}")]),
            helper.make_node("Concat", [lo, n("zero")], [n(f"mlo{j}")], axis=0),
            helper.make_node("Concat", [hi, n(f"ke{j}")], [n(f"mhi{j}")], axis=0),
            helper.make_node("Slice", [mask, n(f"mlo{j}"), n(f"mhi{j}"), n("ax23")], [n(f"m{j}")]),
        ]
        att = helper.make_node("Attention", [n(f"q{j}"), n(f"k{j}"), n(f"v{j}"), n(f"m{j}")], [n(f"o{j}")])
        att.attribute.extend(attrs)
        body.append(att)
        outs.append(n(f"o{j}"))
    body.append(helper.make_node("Concat", outs, [n("blocked")], axis=2))
    single = helper.make_node("Attention", [q, k, v, mask], [n("single")], name=node.name)
    single.attribute.extend(attrs)
    typed = helper.make_tensor_value_info  # If outputs: element type only, the shape is left to inference
    then_g = helper.make_graph(body, n("then"), [], [typed(n("blocked"), elem, None)])
    else_g = helper.make_graph([single], n("else"), [], [typed(n("single"), elem, None)])
    return [*outer, helper.make_node("If", [n("big")], [out], name=tag, then_branch=then_g, else_branch=else_g)]


# ---------------------------------------------------------------------------------------------- GroupQueryAttention
KV_CACHE_KEY = "hired_edge.kv_cache"  # decoder.onnx metadata: how the graph treats past and present KV
SHARED = "shared-buffer"  # GroupQueryAttention: past_* and present_* may be one buffer [b, kv, max_len, hd]
CONCAT = "concat"  # present = Concat(past, new): a new, one-longer tensor per step


class NotMatched(ValueError):
    """The exported attention does not have the shape group_query_attention knows; the graph is left unchanged."""


def group_query_attention(model: onnx.ModelProto, *, num_heads: int, kv_heads: int, rope: RopeContext | None = None) -> int:
    """Rewrite every Attention of an exported decoder into com.microsoft GroupQueryAttention, in place.

    Per layer the exporter writes  q, k, v = MatMul -> Reshape [b, s, h, hd] -> Transpose [b, h, s, hd]
    (-> RotaryEmbedding for q, k),  present = Concat(past, k_new),  repeat_kv = Unsqueeze/Expand/Reshape,
    Attention(q, K, V, mask) (-> a shape-keeping Reshape [b, -1, s, hd]: the streaming route's meta-device trace)
    -> Transpose -> Reshape [b, s, h*hd]. It becomes
        RotaryEmbedding(MatMul [b, s, h*hd], cos, sin, num_heads)          (the exporter's own cos/sin)
        GroupQueryAttention(q, k, v, past_key, past_value, seqlens_k, total_sequence_length)
            -> [b, s, h*hd] (the old Reshape's output), present_key, present_value
    with seqlens_k = ReduceSum(attention_mask) - 1 and total_sequence_length = attention_mask's length (int32).
    With `rope` (a static RoPE: see rope_context) and q and k rotated by the exporter's RotaryEmbedding on
    Cos/Sin(position_ids x inv_freq), rotary moves into GroupQueryAttention instead (`_rope_frequencies`, `_rotary_cache`): do_rotary=1,
    cos_cache / sin_cache [max_positions, hd/2] initialisers computed from the graph's own inv_freq, and
    position_ids as its position_ids input; the 2 x layers RotaryEmbedding nodes and the Cos/Sin go away.
    No node reads a past K/V input any more except GroupQueryAttention: bound to the same OrtValue as its
    present, it writes only the new positions (past_present_share_buffer); fed a past of length p it returns a
    present of p + s, as before. Causality and the key count come from seqlens_k: every attention_mask must be
    ones (batch 1, or right padding). Returns the number of layers rewritten; raises NotMatched and changes
    nothing when a layer does not have the expected form.
    """
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inputs = {i.name for i in graph.input}
    mask_input = DECODER_INPUTS[1]
    if mask_input not in inputs:
        raise NotMatched(f"the graph has no {mask_input!r} input")

    def prod(name: str, op: str) -> onnx.NodeProto:
        node = producer.get(name)
        if node is None or node.op_type != op:
            raise NotMatched(f"{name!r} is not the output of a {op} (got {node.op_type if node else 'an input'})")
        return node

    shapes = {v.name: v.type.tensor_type.shape for v in graph.value_info}

    def same_shape(a: str, b: str) -> bool:
        """The exporter's symbolic shapes of `a` and `b` are known and equal dim for dim: b = Reshape(a) is a no-op."""
        da, db = (shapes[x].dim if x in shapes else None for x in (a, b))
        key = lambda d: d.dim_value or d.dim_param or None  # noqa: E731
        return bool(da) and db is not None and len(da) == len(db) and all(
            key(x) is not None and key(x) == key(y) for x, y in zip(da, db)
        )

    def perm(node: onnx.NodeProto) -> list[int]:
        return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])

    def projection(x4: str) -> tuple[str, onnx.NodeProto | None, bool]:
        """[b, h, s, hd] tensor -> (its [b, s, h*hd] source, the RotaryEmbedding applied on the way or None, False)
        when it is MatMul -> Reshape -> Transpose (-> RotaryEmbedding); else (x4, None, True): transpose it back.
        (fp16 exports spell rotary out in Mul/Slice/Neg/Concat on [b, h, s, hd]: the generic case.)"""
        rotary = producer.get(x4) if producer.get(x4) is not None and producer[x4].op_type == "RotaryEmbedding" else None
        try:
            t = prod(rotary.input[0] if rotary else x4, "Transpose")
            if perm(t) != [0, 2, 1, 3]:
                raise NotMatched(f"Transpose {t.name!r} has perm {perm(t)}, expected [0, 2, 1, 3]")
            return prod(t.input[0], "Reshape").input[0], rotary, False
        except NotMatched:
            return x4, None, True

    def cache(kv: str) -> onnx.NodeProto:
        """The Concat(past, new) that the attention's key/value input is derived from (through repeat_kv)."""
        node = producer.get(kv)
        while node is not None and node.op_type in ("Reshape", "Expand", "Unsqueeze"):
            node = producer.get(node.input[0])
        if node is None or node.op_type != "Concat" or node.input[0] not in inputs or len(node.input) != 2:
            raise NotMatched(f"attention input {kv!r} is not derived from Concat(past, new)")
        return node

    plans = []
    for node in graph.node:
        if node.op_type != "Attention":
            continue
        if len(node.output) != 1:
            raise NotMatched(f"Attention {node.name!r} has {len(node.output)} outputs (it concatenates a cache itself)")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("softcap") or attrs.get("softmax_precision") not in (None, 1):
            raise NotMatched(f"Attention {node.name!r} has attributes GroupQueryAttention does not take: {attrs}")
        k_cat, v_cat = cache(node.input[1]), cache(node.input[2])
        qkv = [projection(node.input[0]), projection(k_cat.input[1]), projection(v_cat.input[1])]
        after = consumers.get(node.output[0], [])
        if len(after) == 1 and after[0].op_type == "Reshape" and same_shape(node.output[0], after[0].output[0]):
            after = consumers.get(after[0].output[0], [])  # the streaming route's view [b, -1, s, hd]: a no-op
        if len(after) != 1 or after[0].op_type != "Transpose" or perm(after[0]) != [0, 2, 1, 3]:
            raise NotMatched(f"Attention {node.name!r} output is not transposed back to [b, s, h, hd]")
        reshape = consumers.get(after[0].output[0], [])
        if len(reshape) != 1 or reshape[0].op_type != "Reshape":
            raise NotMatched(f"Attention {node.name!r} output is not reshaped to [b, s, h*hd]")
        plans.append((node, attrs, qkv, k_cat, v_cat, reshape[0].output[0]))
    if not plans:
        raise NotMatched("the graph has no Attention node")

    tag = "gqa"
    seq_nodes = [
        helper.make_node("ReduceSum", [mask_input, f"{tag}_axis1"], [f"{tag}_lens"], keepdims=0),
        helper.make_node("Sub", [f"{tag}_lens", f"{tag}_one"], [f"{tag}_lens_1"]),
        helper.make_node("Cast", [f"{tag}_lens_1"], [f"{tag}_seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", [mask_input], [f"{tag}_total_1"], start=1, end=2),
        helper.make_node("Squeeze", [f"{tag}_total_1"], [f"{tag}_total_64"]),
        helper.make_node("Cast", [f"{tag}_total_64"], [f"{tag}_total"], to=TensorProto.INT32),
    ]
    graph.initializer.extend([
        onnx.numpy_helper.from_array(np.array([1], np.int64), f"{tag}_axis1"),
        onnx.numpy_helper.from_array(np.array(1, np.int64), f"{tag}_one"),
        onnx.numpy_helper.from_array(np.array([0, 0, -1], np.int64), f"{tag}_bs_1"),
    ])
    replaced = {}
    caches: dict[str, list[str]] = {}  # inv_freq initialiser -> GroupQueryAttention's rotary inputs
    inits = {t.name: t for t in graph.initializer}
    for i, (node, attrs, qkv, k_cat, v_cat, out) in enumerate(plans):
        new, names = [], []
        rotary = None
        (_, rot_q, _), (_, rot_k, _) = qkv[:2]
        if rope is not None and rot_q is not None and rot_k is not None:
            freq = _rope_frequencies(rot_q, producer, inits)
            if freq is not None and freq == _rope_frequencies(rot_k, producer, inits):
                if freq not in caches:
                    caches[freq] = _rotary_cache(graph, inits[freq], rope, f"{tag}_rotary{len(caches) or ''}")
                rotary = caches[freq]
        for (src, rot, generic), heads, x in zip(qkv, (num_heads, kv_heads, kv_heads), "qkv"):
            name = f"{tag}{i}_{x}"
            if generic:  # [b, h, s, hd] -> [b, s, h, hd] -> [b, s, h*hd]
                new.append(helper.make_node("Transpose", [src], [f"{name}_t"], perm=[0, 2, 1, 3]))
                new.append(helper.make_node("Reshape", [f"{name}_t", f"{tag}_bs_1"], [name]))
            elif rot is not None and rotary is None:
                new.append(_rotary_3d(src, rot, heads, name))
            else:
                name = src
            names.append(name)
        gqa = helper.make_node(
            "GroupQueryAttention",
            [*names, k_cat.input[0], v_cat.input[0], f"{tag}_seqlens_k", f"{tag}_total", *(rotary or [])],
            [out, k_cat.output[0], v_cat.output[0]],
            name=f"{tag}{i}",
            domain="com.microsoft",
            num_heads=num_heads,
            kv_num_heads=kv_heads,
        )
        if rotary:
            gqa.attribute.extend([helper.make_attribute("do_rotary", 1), helper.make_attribute("rotary_interleaved", 0)])
        if attrs.get("scale") is not None:
            gqa.attribute.append(helper.make_attribute("scale", float(attrs["scale"])))
        new.append(gqa)
        replaced[id(node)] = new
    dead = {id(p[3]) for p in plans} | {id(p[4]) for p in plans} | {id(producer[p[5]]) for p in plans}
    nodes = list(seq_nodes)
    for n in graph.node:
        if id(n) in replaced:
            nodes.extend(replaced[id(n)])
        elif id(n) not in dead:
            nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)
    prune_dead_nodes(graph)
    fuse_residual_norms(graph)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    set_kv_cache(model, SHARED)
    return len(plans)


STATIC_ROPE = ("default", "linear", "llama3")  # rope types whose inv_freq does not depend on the sequence length


@dataclass(frozen=True)
class RopeContext:
    """What `_rotary_cache` needs besides the graph: the cache length and where external initialisers live."""

    max_positions: int  # rows of cos_cache / sin_cache: the model's context (the manifest's max_position_embeddings)
    base_dir: Path  # folder of the graph file (its external data, if any)


def rope_context(text_config, path: Path) -> RopeContext | None:
    """A RopeContext for a model whose RoPE frequencies are fixed (STATIC_ROPE), else None (rotary stays outside)."""
    params = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    limit = getattr(text_config, "max_position_embeddings", None)
    if kind not in STATIC_ROPE or not limit:
        return None
    return RopeContext(int(limit), path.parent)


def _rope_frequencies(rot: onnx.NodeProto, producer: dict, inits: dict) -> str | None:
    """The inv_freq initialiser of RotaryEmbedding `rot` when its cos / sin are
    Cos / Sin(Cast<float>(Unsqueeze(position_ids, -1)) x inv_freq) (1-D float) and it rotates whole heads, else None."""
    def attrs(node):
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    if rot.domain not in ("", "ai.onnx") or len(rot.input) != 3:
        return None
    if attrs(rot).get("interleaved", 0) or attrs(rot).get("rotary_embedding_dim", 0):
        return None
    cos, sin = producer.get(rot.input[1]), producer.get(rot.input[2])
    if cos is None or sin is None or (cos.op_type, sin.op_type) != ("Cos", "Sin"):
        return None
    freqs = set()
    for trig in (cos, sin):
        mul = producer.get(trig.input[0])
        if mul is None or mul.op_type != "Mul" or len(mul.input) != 2:
            return None
        freq = next((i for i in mul.input if i in inits), None)
        cast = producer.get(next((i for i in mul.input if i != freq), ""))
        if freq is None or len(inits[freq].dims) != 1 or inits[freq].data_type != TensorProto.FLOAT:
            return None
        if cast is None or cast.op_type != "Cast" or attrs(cast).get("to") != TensorProto.FLOAT:
            return None
        unsq = producer.get(cast.input[0])
        if unsq is None or unsq.op_type != "Unsqueeze" or unsq.input[0] != DECODER_INPUTS[2] or len(unsq.input) != 2:
            return None
        axes = inits.get(unsq.input[1])
        if axes is None or onnx.numpy_helper.to_array(axes).tolist() not in ([-1], [2]):
            return None
        freqs.add(freq)
    return freqs.pop() if len(freqs) == 1 else None


def _rotary_cache(graph: onnx.GraphProto, freq: onnx.TensorProto, rope: RopeContext, tag: str) -> list[str]:
    """GroupQueryAttention's rotary inputs [cos_cache, sin_cache, position_ids] for inv_freq initialiser `freq`:
    adds the two caches [rope.max_positions, hd/2] (float32, the graph's own arithmetic: float(position) x
    inv_freq, then cos / sin)."""
    inv = onnx.numpy_helper.to_array(freq, base_dir=str(rope.base_dir)).astype(np.float32)
    angles = np.arange(rope.max_positions, dtype=np.float32)[:, None] * inv[None, :]
    names = [f"{tag}_cos_cache", f"{tag}_sin_cache"]
    graph.initializer.extend([
        onnx.numpy_helper.from_array(np.cos(angles).astype(np.float32), names[0]),
        onnx.numpy_helper.from_array(np.sin(angles).astype(np.float32), names[1]),
    ])
    return [*names, DECODER_INPUTS[2]]


def fuse_residual_norms(graph: onnx.GraphProto) -> int:
    """Add(x, y) -> RMSNormalization(sum, w) becomes com.microsoft SkipSimplifiedLayerNormalization(x, y, w), whose
    fourth output is the sum (the next residual). Returns the number fused (2 per layer + the final norm)."""
    producer = {o: n for n in graph.node for o in n.output}
    initialisers = {t.name for t in graph.initializer}
    fused: dict[int, onnx.NodeProto] = {}
    dead: set[int] = set()
    for node in graph.node:
        add = producer.get(node.input[0]) if node.op_type == "RMSNormalization" else None
        if add is None or add.op_type != "Add" or any(i in initialisers for i in add.input) or len(node.input) != 2:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("axis", -1) != -1 or attrs.get("stash_type", 1) != 1:
            continue
        skip = helper.make_node(
            "SkipSimplifiedLayerNormalization",
            [add.input[0], add.input[1], node.input[1]],
            [node.output[0], "", "", add.output[0]],
            name=f"{node.name or node.output[0]}_skip",
            domain="com.microsoft",
            epsilon=float(attrs.get("epsilon", 1e-5)),
        )
        fused[id(node)], dead = skip, dead | {id(add)}
    nodes = [fused.get(id(n), n) for n in graph.node if id(n) not in dead]
    del graph.node[:]
    graph.node.extend(nodes)
    return len(fused)


def _rotary_3d(src: str, rot: onnx.NodeProto, heads: int, name: str) -> onnx.NodeProto:
    """`rot` (a RotaryEmbedding on [b, h, s, hd]) applied to its [b, s, h*hd] source `src` instead."""
    r = helper.make_node("RotaryEmbedding", [src, *rot.input[1:]], [name], name=name)
    r.attribute.extend(a for a in rot.attribute if a.name != "num_heads")
    r.attribute.append(helper.make_attribute("num_heads", heads))
    return r


def prune_dead_nodes(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nobody reads (graph outputs count as read), then unused initialisers/value_info."""
    needed = {o.name for o in graph.output}
    keep = []
    for n in reversed(graph.node):
        if any(o in needed for o in n.output) or not n.output:
            keep.append(n)
            needed.update(n.input)
            for a in n.attribute:  # subgraphs read outer names
                for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                    needed.update(i for sub in g.node for i in sub.input)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    live = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(live)
    produced = {o for n in graph.node for o in n.output}
    info = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(info)


def set_kv_cache(model: onnx.ModelProto, kind: str) -> None:
    """Record in the graph's metadata how it treats its KV cache (KV_CACHE_KEY: SHARED or CONCAT)."""
    for p in model.metadata_props:
        if p.key == KV_CACHE_KEY:
            p.value = kind
            return
    model.metadata_props.add(key=KV_CACHE_KEY, value=kind)
