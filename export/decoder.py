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
"""

from __future__ import annotations

from pathlib import Path

import torch
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
    return save_program(program, path, wrapper, external_data)
