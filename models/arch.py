"""The two LLaVA architectures hired-edge exports, by config `model_type`: LLaVA-NeXT (anyres) and LLaVA-1.5.

    from models.arch import model_class, config_class, is_single_image
    model_class("llava")        # transformers.LlavaForConditionalGeneration (imported lazily)
    config_class("llava_next")  # transformers.LlavaNextConfig
    is_single_image(config)     # True for LLaVA-1.5: one 336 px partition, no anyres grid, no image_newline

Both share the modules the export reads (model.model.vision_tower, multi_modal_projector, language_model,
lm_head); only LLaVA-NeXT has `image_newline` and `image_grid_pinpoints`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# model_type -> (config class, model class, processor class), names in transformers
ARCHITECTURES: dict[str, tuple[str, str, str]] = {
    "llava_next": ("LlavaNextConfig", "LlavaNextForConditionalGeneration", "LlavaNextProcessor"),
    "llava": ("LlavaConfig", "LlavaForConditionalGeneration", "LlavaProcessor"),
}
MODEL_TYPES = tuple(ARCHITECTURES)


def _check(model_type: object) -> str:
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"model_type must be one of {', '.join(MODEL_TYPES)} (LLaVA-NeXT or LLaVA-1.5), got {model_type!r}"
        )
    return str(model_type)


def _transformers(name: str):
    import transformers

    return getattr(transformers, name)


def config_class(model_type: str):
    """transformers config class of `model_type` ("llava_next" or "llava")."""
    return _transformers(ARCHITECTURES[_check(model_type)][0])


def model_class(model_type: str):
    """transformers *ForConditionalGeneration class of `model_type`."""
    return _transformers(ARCHITECTURES[_check(model_type)][1])


def processor_class(model_type: str):
    """transformers processor class of `model_type` (LlavaNextProcessor or LlavaProcessor)."""
    return _transformers(ARCHITECTURES[_check(model_type)][2])


def config_from_dict(fields: Mapping[str, Any]):
    """The transformers config of a config.json-shaped dict, by its `model_type` (default llava_next)."""
    data = dict(fields)
    return config_class(data.get("model_type", "llava_next"))(**data)


def model_type_of(config) -> str:
    """`model_type` of a transformers config or a config dict."""
    value = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    return _check(value)


def is_single_image(config) -> bool:
    """True for LLaVA-1.5 (model_type "llava"): each image is one partition, no anyres grid, no newline embedding."""
    return model_type_of(config) == "llava"


def model_for(config):
    """An untrained model of `config`'s architecture (`_from_config`; the caller picks device and dtype)."""
    return model_class(model_type_of(config))


__all__ = [
    "ARCHITECTURES",
    "MODEL_TYPES",
    "config_class",
    "config_from_dict",
    "is_single_image",
    "model_class",
    "model_for",
    "model_type_of",
    "processor_class",
]
