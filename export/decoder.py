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

from pathlib import Path

import onnx
import torch
from torch import nn

from export.decoder_graph import (
    CONCAT,
    SHARED,
    NotMatched,
    block_causal_attention,
    group_query_attention,
    rope_context,
    set_kv_cache,
)
from export.decoder_weights import append_external, pack_qkv
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
            group_query_attention(model, num_heads=heads, kv_heads=kv, rope=rope_context(text_config, path))
            kind = SHARED
        except NotMatched:
            pass
        if kind == SHARED:
            pack_qkv(model.graph)
            append_external(model.graph, path.parent)
    if kind == CONCAT:
        block_causal_attention(model.graph, blocks)
        set_kv_cache(model, CONCAT)
    onnx.save(model, str(path))
    return kind
