"""Language model -> `decoder.onnx`: inputs_embeds + mask + positions + past KV -> last logits + present KV.

    from export.decoder import export_decoder
    export_decoder(model, "bundle/decoder.onnx", opset=23)

One graph serves prefill (past of length 0) and decode (s = 1). Tensor names:
    inputs_embeds [b, s, Dt]   attention_mask int64 [b, p + s]   position_ids int64 [b, s]
    past_key_values.{i}.key / .value [b, kv, p, hd]
 -> logits float32 [b, 1, V] (last position only)   present.{i}.key / .value [b, kv, p + s, hd]

The dynamo exporter at opset 23 emits the ONNX Attention / RotaryEmbedding / RMSNormalization ops
(onnxruntime >= 1.23 for the Attention-23 CPU kernel); opset 18 decomposes attention into primitive ops and
runs on onnxruntime >= 1.14, about 2.5x slower on long prompts.

After export, each masked `Attention` node is split into ATTENTION_BLOCKS query blocks (`block_causal_attention`):
block j attends only to the keys a causal mask can let it see (past + its last row), so the upper triangle of
QK^T is never computed and each block's score matrix stays cache-sized. ORT 1.32's CPU Attention kernel
computes the full [s, p + s] scores even with is_causal; blocking cuts attention time 2.5x and the whole prefill
1.4-1.6x at 2950 tokens (bench shape). The result is exact for any mask that includes causality (the exported
one does). Chunks shorter than ATTENTION_BLOCKS rows (decode steps) take the original single node through an
`If`, as ORT rejects empty queries. Opset 18 graphs have no Attention node and are left as they are.
"""

from __future__ import annotations

from pathlib import Path

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
    rewrite_attention(path)
    return path


def rewrite_attention(path: Path, blocks: int = ATTENTION_BLOCKS) -> None:
    """Replace the masked Attention nodes of the saved graph at `path` by `block_causal_attention`, in place.

    External weights (`<path>.data`) are neither loaded nor rewritten: the graph keeps its references to them.
    """
    model = onnx.load(str(path), load_external_data=False)
    block_causal_attention(model.graph, blocks)
    onnx.save(model, str(path))


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
