"""Multimodal projector -> `projector.onnx`: kept visual tokens [k, Dv] -> LLM embeddings [k, Dt].

    from export.projector import export_projector
    export_projector(model, "bundle/projector.onnx", opset=23)

The runtime calls it after HiRED selection, on the kept tokens only, so k is dynamic (1 .. 1 << 16).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from export.spec import PROJECTOR_INPUT, PROJECTOR_OUTPUT
from export.vision import save_program

MAX_TOKENS = 1 << 16


class ProjectorWrapper(nn.Module):
    """image_features [k, Dv] -> projected_features [k, Dt] (model.model.multi_modal_projector)."""

    def __init__(self, projector: nn.Module):
        super().__init__()
        self.projector = projector

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.projector(image_features)


def export_projector(model, path: str | Path, *, opset: int, external_data: bool | None = None) -> Path:
    """Export `model.model.multi_modal_projector` of a LlavaNextForConditionalGeneration to `path`."""
    path = Path(path)
    wrapper = ProjectorWrapper(model.model.multi_modal_projector).eval()
    dtype = next(wrapper.parameters()).dtype
    example = torch.zeros(7, int(model.config.vision_config.hidden_size), dtype=dtype)
    tokens = torch.export.Dim("tokens", min=1, max=MAX_TOKENS)
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[PROJECTOR_INPUT],
            output_names=[PROJECTOR_OUTPUT],
            dynamic_shapes={"image_features": {0: tokens}},
            optimize=True,
            verbose=False,
        )
    return save_program(program, path, wrapper, external_data)
