"""Vision tower -> `vision.onnx`: features of the feature layer plus the CLS-row attention of two layers.

    from export.vision import VisionWrapper, export_vision, vision_layers
    layers = vision_layers(model.config)                  # early 0, late 22 for CLIP-L/14-336 (-2)
    export_vision(model, "bundle/vision.onnx", opset=23)  # pixel_values -> image_features, early/late scores

The wrapper runs `pre_layrnorm(embeddings(px))` and then only the encoder blocks the feature path needs
(blocks 0 .. num_layers + feature_layer); the last block(s) are not even part of the module. Beside the
early and the late block's own (fused) attention it recomputes only the CLS query row:

    q = q_proj(ln1(h))[:, :1]   k = k_proj(ln1(h))   a = softmax(q k^T / sqrt(head_dim))   [crops, heads, 1, 577]

then drops the CLS column (it stays inside the softmax) and sums over heads -> [crops, 576] float32.
No full [heads, 577, 577] attention matrix is ever materialised for the scores.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from export.spec import VISION_INPUT, VISION_OUTPUTS, VisionLayers, vision_layers

MAX_CROPS = 64  # upper bound of the dynamic crop axis at export time (the runtime feeds 1 + crops)


def cls_attention_row(layer: nn.Module, hidden: torch.Tensor, num_heads: int) -> torch.Tensor:
    """CLS query row of `layer`'s softmax attention, summed over heads, patch columns only.

    hidden: [crops, 1 + P, D] input of the block (before its layer_norm1)  ->  [crops, P] float32.
    The softmax runs over all 1 + P keys (CLS included); only the query row 0 is ever computed.
    """
    attn = layer.self_attn
    x = layer.layer_norm1(hidden)
    crops, tokens, dim = x.shape
    head_dim = dim // num_heads
    q = attn.q_proj(x[:, :1]).float().reshape(crops, 1, num_heads, head_dim).transpose(1, 2)  # [c, H, 1, hd]
    k = attn.k_proj(x).float().reshape(crops, tokens, num_heads, head_dim).permute(0, 2, 3, 1)  # [c, H, hd, T]
    probs = torch.softmax(torch.matmul(q, k) * (head_dim**-0.5), dim=-1)  # [c, H, 1, T]
    return probs.sum(dim=1)[:, 0, 1:]  # [c, P]


class VisionWrapper(nn.Module):
    """pixel_values [crops, 3, S, S] -> (image_features [crops, P, Dv], early_scores [crops, P], late_scores [crops, P]).

    Holds only the modules the graph needs: embeddings, pre_layrnorm and encoder blocks 0 .. blocks_run - 1.
    """

    def __init__(self, vision_tower: nn.Module, layers: VisionLayers):
        super().__init__()
        self.embeddings = vision_tower.embeddings
        self.pre_layrnorm = vision_tower.pre_layrnorm
        self.blocks = nn.ModuleList(list(vision_tower.encoder.layers[: layers.blocks_run]))
        self.num_heads = int(vision_tower.config.num_attention_heads)
        self.early = layers.early_layer
        self.late = layers.late_layer

    def forward(self, pixel_values: torch.Tensor):
        h = self.pre_layrnorm(self.embeddings(pixel_values))  # [c, 1 + P, Dv]
        early = late = None
        for i, block in enumerate(self.blocks):
            if i == self.early:
                early = cls_attention_row(block, h, self.num_heads)
            if i == self.late:
                late = cls_attention_row(block, h, self.num_heads)
            h = block(h, None)
        return h[:, 1:], early, late


def export_vision(model, path: str | Path, *, opset: int, external_data: bool | None = None) -> Path:
    """Export `model.model.vision_tower` (a LlavaNextForConditionalGeneration) to `path` with the dynamo exporter.

    The crop axis is dynamic (1 .. MAX_CROPS). Weights go to `<path>.data` when `external_data` is true
    (default: only when the graph's weights exceed 2 GB).
    """
    path = Path(path)
    layers = vision_layers(model.config)
    wrapper = VisionWrapper(model.model.vision_tower, layers).eval()
    param = next(wrapper.parameters())
    size = int(model.config.vision_config.image_size)
    example = torch.zeros(2, 3, size, size, dtype=param.dtype)
    crops = torch.export.Dim("crops", min=1, max=MAX_CROPS)
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[VISION_INPUT],
            output_names=list(VISION_OUTPUTS),
            dynamic_shapes={"pixel_values": {0: crops}},
            optimize=True,
            verbose=False,
        )
    return save_program(program, path, wrapper, external_data)


def save_program(program, path: Path, module: nn.Module, external_data: bool | None) -> Path:
    """Save an ONNXProgram to `path`, with one `<path>.data` external-data file when needed (> 2 GB weights)."""
    if external_data is None:
        external_data = module_bytes(module) > TWO_GB_MARGIN
    program.save(str(path), external_data=external_data)
    return path


TWO_GB_MARGIN = 1_900_000_000  # protobuf's 2 GB limit, with room for the graph itself


def module_bytes(module: nn.Module) -> int:
    """Bytes of the parameters and buffers of `module` (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
