"""Language model -> `decoder.onnx`: inputs_embeds + mask + positions + past KV -> last logits + present KV.

    from export.decoder import export_decoder
    export_decoder(model, "bundle/decoder.onnx", opset=23)

One graph serves prefill (past of length 0) and decode (s = 1). Tensor names:
    inputs_embeds [b, s, Dt]   attention_mask int64 [b, p + s]   position_ids int64 [b, s]
    past_key_values.{i}.key / .value [b, kv, p or max_len, hd]
 -> logits float32 [b, 1, V] (last position only)   present.{i}.key / .value [b, kv, p + s or max_len, hd]

The dynamo exporter at opset 23 emits the ONNX Attention / RotaryEmbedding / RMSNormalization ops; opset 18
decomposes attention into primitive ops and runs on onnxruntime >= 1.14, about 2.5x slower on long prompts.

After export (`rewrite_attention`, also run by the streaming route on its saved graph, weights untouched):
- opset 23: each layer's Concat(past, new) + repeat_kv Expand + Attention becomes one com.microsoft
  GroupQueryAttention (`group_query_attention`): it reads the KV heads as they are and, with past_* and present_*
  bound to one buffer [b, kv, max_len, hd] (runtime/decoder.py), writes only the new positions in place. Its
  mask is seqlens_k / total_sequence_length from attention_mask (ones: batch 1 or right padding). Where the
  exporter rotated q and k with RotaryEmbedding (float32 graphs) and the RoPE frequencies are static, rotary
  moves inside it too (do_rotary=1, cos_cache / sin_cache as long as the model's context, position_ids), and
  q, k, v become one projection on the concatenated weights feeding its packed `query` (`pack_qkv`). Residual
  Add + RMSNormalization pairs become SkipSimplifiedLayerNormalization. The linear layers stay MatMul(x, W
  [in, out]) on initialisers (what export/quantize.py turns into MatMulNBits). The graph's metadata says
  `hired_edge.kv_cache: shared-buffer`; needs onnxruntime >= 1.23 (the opset-23 ops) with the contrib ops.
- a graph GroupQueryAttention cannot take (a sliding-window model, an attention of another form) keeps Concat
  and splits each masked Attention into ATTENTION_BLOCKS query blocks (`block_causal_attention`): block j
  attends only to the keys a causal mask lets it see, so the upper triangle of QK^T is never computed (ORT 1.32's
  CPU Attention computes the full [s, p + s] scores even with is_causal). Metadata `hired_edge.kv_cache: concat`.
- opset 18: no Attention node; left as it is (concat).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from export.spec import (
    DECODER_INPUTS,
    LOGITS,
    PAST_KEY,
    PAST_VALUE,
    PRESENT_KEY,
    PRESENT_VALUE,
    kv_names,
    text_shape,
)
from export.vision import save_program

MAX_TOKENS = 1 << 18  # upper bound of the dynamic sequence axes at export time
ATTENTION_BLOCKS = 8  # query blocks per Attention at prefill (8 ~ 16 at 600-2950 tokens; 4, 32 slower)


class DecoderWrapper(nn.Module):
    """(inputs_embeds, attention_mask, position_ids, k0, v0, k1, v1, ...) -> (logits[:, -1:], k0', v0', ...)."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.lm = language_model
        self.head = lm_head
        self.num_layers = int(language_model.config.num_hidden_layers)

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]
        cache = DynamicCache(ddp_cache_data=pairs, config=self.lm.config)
        out = self.lm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        logits = self.head(out.last_hidden_state[:, -1:]).float()  # [b, 1, V]
        layers = out.cache.layers
        return (logits, *[t for i in range(self.num_layers) for t in (layers[i].keys, layers[i].values)])


def example_inputs(config, dtype: torch.dtype, *, batch: int = 2, seq: int = 5, past: int = 7) -> tuple:
    """Dummy decoder inputs: batch 2, a non-empty past (p=7) and a new chunk (s=5); sizes 0 and 1 would be specialised."""
    num_layers, kv, head_dim = text_shape(config)
    hidden = int(config.text_config.hidden_size)
    embeds = torch.zeros(batch, seq, hidden, dtype=dtype)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    positions = torch.arange(past, past + seq, dtype=torch.int64).expand(batch, seq).contiguous()
    kvs = tuple(torch.zeros(batch, kv, past, head_dim, dtype=dtype) for _ in range(2 * num_layers))
    return (embeds, mask, positions, *kvs)


def export_decoder(model, path: str | Path, *, opset: int, external_data: bool | None = None) -> Path:
    """Export `model.model.language_model` + `model.lm_head` of a LlavaNextForConditionalGeneration to `path`."""
    path = Path(path)
    num_layers, _, _ = text_shape(model.config)
    wrapper = DecoderWrapper(model.model.language_model, model.lm_head).eval()
    dtype = next(wrapper.parameters()).dtype
    args = example_inputs(model.config, dtype)
    # Ranges match the guards torch.export derives for LLaMA/Mistral (else it exports twice to fix them).
    # p + s cannot be expressed, so the mask gets its own Dim. ORT still accepts a past of length 0.
    batch = torch.export.Dim("batch", min=1, max=64)
    seq = torch.export.Dim("sequence", min=1, max=MAX_TOKENS)
    total = torch.export.Dim("total", min=4, max=MAX_TOKENS)
    past_len = torch.export.Dim("past", min=1, max=MAX_TOKENS - 2)
    dynamic_shapes = {
        "inputs_embeds": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past_len} for _ in range(2 * num_layers)),
    }
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=[*DECODER_INPUTS, *kv_names(num_layers, PAST_KEY, PAST_VALUE)],
            output_names=[LOGITS, *kv_names(num_layers, PRESENT_KEY, PRESENT_VALUE)],
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            verbose=False,
        )
    save_program(program, path, wrapper, external_data)
    rewrite_attention(path, model.config.text_config)
    return path


def rewrite_attention(path: Path, text_config, blocks: int = ATTENTION_BLOCKS) -> str:
    """Rewrite the attention of the saved decoder graph at `path`, in place; returns its KV-cache kind.

    GroupQueryAttention (SHARED) where `group_query_attention` matches every layer and the model has no sliding
    window, then `pack_qkv`; else each masked Attention becomes `block_causal_attention` (CONCAT). Opset 18 graphs
    have no Attention node: CONCAT, unchanged. External weights (`<path>.data`) are never rewritten: a packed
    q/k/v weight there is the byte range its three parts already span (or the layer stays unpacked); the rotary
    caches are appended to that file (`append_external`), so a graph with external data keeps only small tensors.
    """
    model = onnx.load(str(path), load_external_data=False)
    heads = int(text_config.num_attention_heads)
    kv = int(getattr(text_config, "num_key_value_heads", None) or heads)
    kind = CONCAT
    if getattr(text_config, "sliding_window", None) is None:
        try:
            group_query_attention(model, num_heads=heads, kv_heads=kv, rope=_rope_context(text_config, path))
            kind = SHARED
        except NotMatched:
            pass
        if kind == SHARED:
            pack_qkv(model.graph, path.parent)
            append_external(model.graph, path.parent)
    if kind == CONCAT:
        block_causal_attention(model.graph, blocks)
        set_kv_cache(model, CONCAT)
    onnx.save(model, str(path))
    return kind


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
    With `rope` (a static RoPE: see _rope_context) and q and k rotated by the exporter's RotaryEmbedding on
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


def _rope_context(text_config, path: Path) -> RopeContext | None:
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


def pack_qkv(graph: onnx.GraphProto, base_dir: Path) -> int:
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
        tensors = [_concat([inits[n] for n in names], axis, f"{gqa.name}_qkv_{j}", base_dir)
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


def _concat(tensors: list, axis: int, name: str, base_dir: Path):
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
