"""The bundle's fixed names and layer arithmetic, torch-free (the CLI's error paths import only this).

    from export.spec import GRAPH_FILES, vision_layers, text_shape
    vision_layers(config)   # VisionLayers(num_layers=24, feature_layer=-2, blocks_run=23, early_layer=0, late_layer=22)
    text_shape(config)      # (num_layers, num_kv_heads, head_dim) of the text model

`config` is a transformers `LlavaNextConfig` (or anything with the same attributes).
"""

from __future__ import annotations

from dataclasses import dataclass

# ---- file names inside a bundle ----
GRAPH_FILES = {"vision": "vision.onnx", "projector": "projector.onnx", "decoder": "decoder.onnx"}
OTHER_FILES = {"embed_tokens": "embed_tokens.npy", "image_newline": "image_newline.npy", "tokenizer": "tokenizer.json"}
DATA_SUFFIX = ".data"  # external weights of `<graph>.onnx` live in `<graph>.onnx.data`

# ---- tensor names (the runtime reads them from the manifest; these are what export writes) ----
VISION_INPUT = "pixel_values"  # [crops, 3, S, S], bundle dtype
VISION_OUTPUTS = ("image_features", "early_scores", "late_scores")  # [crops, P, Dv]; [crops, P] float32 x 2
PROJECTOR_INPUT = "image_features"  # [k, Dv]
PROJECTOR_OUTPUT = "projected_features"  # [k, Dt]
DECODER_INPUTS = ("inputs_embeds", "attention_mask", "position_ids")  # [b, s, Dt]; int64 [b, p + s]; int64 [b, s]
PAST_KEY = "past_key_values.{i}.key"  # [b, kv, p, hd]
PAST_VALUE = "past_key_values.{i}.value"
PRESENT_KEY = "present.{i}.key"  # [b, kv, p + s, hd]
PRESENT_VALUE = "present.{i}.value"
LOGITS = "logits"  # [b, 1, V] float32, last position only


def kv_names(num_layers: int, key: str, value: str) -> list[str]:
    """[key(0), value(0), key(1), value(1), ...] with the layer index filled in."""
    return [name.format(i=i) for i in range(num_layers) for name in (key, value)]


@dataclass(frozen=True)
class VisionLayers:
    """Which encoder blocks the vision graph runs and reads (0-based block indices)."""

    num_layers: int  # blocks in the checkpoint
    feature_layer: int  # HF hidden_states index of the features (e.g. -2)
    blocks_run: int  # blocks the graph runs: hidden_states[feature_layer] is the output of block blocks_run - 1
    early_layer: int  # 0
    late_layer: int  # blocks_run - 1: the last block the feature path runs


def vision_layers(config) -> VisionLayers:
    """Block indices for a LlavaNextConfig: features = hidden_states[vision_feature_layer], CLS dropped.

    hidden_states[0] is the embedding output and hidden_states[i] the output of block i - 1, so
    hidden_states[f] (f < 0) is the output of block num_layers + f; the graph runs blocks 0 .. num_layers + f.
    Raises ValueError for multi-layer features, the "full" strategy or an out-of-range layer.
    """
    n = int(config.vision_config.num_hidden_layers)
    f = config.vision_feature_layer
    if isinstance(f, bool) or not isinstance(f, int):
        raise ValueError(f"vision_feature_layer must be one integer, got {f!r}; multi-layer features are not supported")
    if config.vision_feature_select_strategy != "default":
        raise ValueError(
            f"vision_feature_select_strategy must be 'default' (CLS dropped), got "
            f"{config.vision_feature_select_strategy!r}"
        )
    index = f if f >= 0 else n + 1 + f  # index into hidden_states (length n + 1)
    if not 1 <= index <= n:
        raise ValueError(f"vision_feature_layer {f} is out of range for a {n}-block vision tower")
    return VisionLayers(num_layers=n, feature_layer=f, blocks_run=index, early_layer=0, late_layer=index - 1)


def text_shape(config) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a LlavaNextConfig's text model."""
    tc = config.text_config
    heads = int(tc.num_attention_heads)
    kv = int(getattr(tc, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(tc, "head_dim", None) or tc.hidden_size // heads)
    return int(tc.num_hidden_layers), kv, head_dim
