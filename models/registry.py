"""The model registry: named LLaVA-NeXT and LLaVA-1.5 models, their configs, prompt templates and tokenizers.

    from models.registry import get, names
    entry = get("tiny")              # ModelEntry
    cfg = entry.llava_config()       # transformers.LlavaNextConfig, or LlavaConfig for LLaVA-1.5 (lazy import)

Every entry's config ships as JSON in `models/configs/<name>.json`, so any entry can be built
offline with random weights (`python -m models.build <name>`). The real entries hold the
llava-hf `config.json` files verbatim; the top-level `_source` key of each file says where the
numbers come from and is dropped before the config is used.

`flops_split(...)` = vision FLOPs / LLM prefill FLOPs, the number that the `bench` entry is sized by.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

MISTRAL_TEMPLATE = "[INST] <image>\n{prompt} [/INST]"
VICUNA_TEMPLATE = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions. "
    "USER: <image>\n{prompt} ASSISTANT:"
)
IMAGE_PLACEHOLDER = "<image>"

# Tokenizer kinds. "checkpoint": the tokenizer comes with the real checkpoint (llava-hf repos ship one).
# "offline-mistral-sp": the 32000-piece Mistral sentencepiece model that the `mistral_common` package
# carries (data/tokenizer.model.v1) plus "<image>" as id 32000; the stand-in for random-weight models.
TOKENIZER_CHECKPOINT = "checkpoint"
TOKENIZER_OFFLINE_MISTRAL = "offline-mistral-sp"
TOKENIZER_NONE = "none"  # a checkpoint folder without tokenizer files
TOKENIZER_KINDS = (TOKENIZER_CHECKPOINT, TOKENIZER_OFFLINE_MISTRAL, TOKENIZER_NONE)

# CLIP ViT-L/14-336 preprocessing (the numbers of the llava-hf preprocessor_config.json files), used when a
# model has no processor config on disk.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Prefill length used for the FLOP split: the visual span of a 672x672 image at full budget
# (576 base + 4 * 576 crop tokens + 48 newline rows = 2928) plus a ~30-token prompt.
DEFAULT_PREFILL_TOKENS = 2928 + 30


@dataclass(frozen=True)
class ModelEntry:
    """One named model: where its weights live, its config, its prompt template and tokenizer kind.

    name:            registry name (`tiny`, `llava-next-7b`, ...).
    hf_id:           Hugging Face repo of the real checkpoint; None for locally built models.
    config:          the LlavaNextConfig (or LlavaConfig: model_type "llava") fields as a read-only mapping.
    prompt_template: text with exactly one `<image>` and one `{prompt}`.
    add_bos:         whether the BOS token id is put in front of the templated prompt.
    tokenizer:       TOKENIZER_CHECKPOINT or TOKENIZER_OFFLINE_MISTRAL.
    """

    name: str
    hf_id: str | None
    config: Mapping[str, Any]
    prompt_template: str
    add_bos: bool
    tokenizer: str

    def llava_config(self):
        """A fresh transformers config built from `self.config`: LlavaNextConfig, or LlavaConfig (LLaVA-1.5)."""
        from models.arch import config_from_dict

        return config_from_dict(_thaw(self.config))

    def config_dict(self) -> dict[str, Any]:
        """A mutable deep copy of the config fields (what `models/configs/<name>.json` holds, `_source` dropped)."""
        return _thaw(self.config)

    @property
    def single_image(self) -> bool:
        """True for LLaVA-1.5 entries: one 336 px partition per image (no anyres grid, no newline embedding)."""
        return self.config.get("model_type") == "llava"

    @property
    def text_model_type(self) -> str:
        """`llama` (Vicuna) or `mistral`."""
        return str(self.config["text_config"]["model_type"])


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def load_config_json(name: str) -> dict[str, Any]:
    """The config fields of `models/configs/<name>.json`, top-level `_` notes (like `_source`) dropped."""
    path = CONFIG_DIR / f"{name}.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def config_source(name: str) -> str:
    """The `_source` note of `models/configs/<name>.json`: where its numbers come from."""
    raw = json.loads((CONFIG_DIR / f"{name}.json").read_text(encoding="utf-8"))
    return str(raw.get("_source", ""))


# name -> (hf_id, prompt template, tokenizer kind). Order is the order `names()` lists.
_TABLE: dict[str, tuple[str | None, str, str]] = {
    "llava-next-7b": ("llava-hf/llava-v1.6-vicuna-7b-hf", VICUNA_TEMPLATE, TOKENIZER_CHECKPOINT),
    "llava-next-mistral-7b": ("llava-hf/llava-v1.6-mistral-7b-hf", MISTRAL_TEMPLATE, TOKENIZER_CHECKPOINT),
    "llava-next-13b": ("llava-hf/llava-v1.6-vicuna-13b-hf", VICUNA_TEMPLATE, TOKENIZER_CHECKPOINT),
    "llava-1.5-7b": ("llava-hf/llava-1.5-7b-hf", VICUNA_TEMPLATE, TOKENIZER_CHECKPOINT),
    "llava-1.5-13b": ("llava-hf/llava-1.5-13b-hf", VICUNA_TEMPLATE, TOKENIZER_CHECKPOINT),
    "tiny": (None, MISTRAL_TEMPLATE, TOKENIZER_OFFLINE_MISTRAL),
    "bench": (None, MISTRAL_TEMPLATE, TOKENIZER_OFFLINE_MISTRAL),
    "tiny-llava15": (None, VICUNA_TEMPLATE, TOKENIZER_OFFLINE_MISTRAL),
}


def check_template(template: str) -> str:
    """Return `template` if it has exactly one `<image>` and one `{prompt}`, else raise ValueError."""
    n_image = template.count(IMAGE_PLACEHOLDER)
    n_prompt = template.count("{prompt}")
    if n_image != 1 or n_prompt != 1:
        raise ValueError(
            f"prompt template must contain exactly one {IMAGE_PLACEHOLDER!r} and one '{{prompt}}', "
            f"got {n_image} and {n_prompt} in {template!r}"
        )
    return template


@cache
def _entries() -> dict[str, ModelEntry]:
    out = {}
    for name, (hf_id, template, tokenizer) in _TABLE.items():
        out[name] = ModelEntry(
            name=name,
            hf_id=hf_id,
            config=_freeze(load_config_json(name)),
            prompt_template=check_template(template),
            add_bos=True,
            tokenizer=tokenizer,
        )
    return out


def names() -> list[str]:
    """Registry names, real checkpoints first: llava-next-7b, llava-next-mistral-7b, llava-next-13b, llava-1.5-7b,
    llava-1.5-13b, tiny, bench, tiny-llava15."""
    return list(_TABLE)


def get(name: str) -> ModelEntry:
    """The entry called `name`; an unknown name raises ValueError listing the known ones."""
    entries = _entries()
    if name not in entries:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(names())}")
    return entries[name]


def find_by_hf_id(hf_id: str) -> ModelEntry | None:
    """The entry whose `hf_id` equals `hf_id` (case-insensitive), or None."""
    for entry in _entries().values():
        if entry.hf_id is not None and entry.hf_id.lower() == hf_id.lower():
            return entry
    return None


def match_config(config: Mapping[str, Any]) -> ModelEntry | None:
    """The real-checkpoint entry that a checkpoint's config.json dict comes from, or None.

    Matched by the top-level `_name_or_path` (the hub id, when transformers saved it), else by the
    `model_type` (llava_next or llava) and the text model's `_name_or_path` (e.g. `lmsys/vicuna-7b-v1.5`).
    """
    top = config.get("_name_or_path")
    if isinstance(top, str) and top:
        hit = find_by_hf_id(top)
        if hit is not None:
            return hit
    text_src = (config.get("text_config") or {}).get("_name_or_path")
    if not text_src:
        return None
    model_type = config.get("model_type", "llava_next")
    for entry in _entries().values():
        if entry.hf_id is None or entry.config.get("model_type") != model_type:
            continue
        if entry.config["text_config"].get("_name_or_path") == text_src:
            return entry
    return None


# ----------------------------------------------------------------------------- FLOPs


def _num(cfg: Mapping[str, Any], key: str, default: Any) -> Any:
    value = cfg.get(key)
    return default if value is None else value


def _vision_shape(vision: Mapping[str, Any]) -> dict[str, int]:
    """Vision tower numbers with CLIPVisionConfig's defaults filled in."""
    return {
        "d": int(_num(vision, "hidden_size", 768)),
        "ff": int(_num(vision, "intermediate_size", 3072)),
        "layers": int(_num(vision, "num_hidden_layers", 12)),
        "image": int(_num(vision, "image_size", 224)),
        "patch": int(_num(vision, "patch_size", 32)),
        "channels": int(_num(vision, "num_channels", 3)),
    }


# Defaults of the text configs that the real llava-hf files leave out (LlamaConfig / MistralConfig).
_TEXT_DEFAULTS = {
    "llama": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
    "mistral": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32},
}


def _text_shape(text: Mapping[str, Any]) -> dict[str, int]:
    """Decoder numbers with the Llama/Mistral defaults filled in."""
    model_type = str(text.get("model_type", "llama"))
    if model_type not in _TEXT_DEFAULTS:
        raise ValueError(f"text model_type must be one of {sorted(_TEXT_DEFAULTS)}, got {model_type!r}")
    defaults = _TEXT_DEFAULTS[model_type]
    d = int(_num(text, "hidden_size", defaults["hidden_size"]))
    heads = int(_num(text, "num_attention_heads", defaults["num_attention_heads"]))
    kv = int(_num(text, "num_key_value_heads", heads))
    head_dim = int(_num(text, "head_dim", d // heads))
    return {
        "d": d,
        "ff": int(_num(text, "intermediate_size", defaults["intermediate_size"])),
        "layers": int(_num(text, "num_hidden_layers", defaults["num_hidden_layers"])),
        "heads": heads,
        "kv_heads": kv,
        "head_dim": head_dim,
        "vocab": int(_num(text, "vocab_size", 32000)),
    }


def vision_flops(config: Mapping[str, Any] | ModelEntry, n_crops: int = 5) -> float:
    """FLOPs of the vision tower on `n_crops` crops, up to the feature layer only.

    Per crop: T = (image/patch)^2 + 1 tokens (CLS). The patch embedding, then the encoder blocks
    that `vision_feature_layer` needs (layer -2 = hidden_states[-2] = all blocks but the last).
    A block costs 2 * (4 d^2 + 2 d ff) * T for its matmuls and 4 * T^2 * d for attention
    (QK^T and AV). Layer norms, softmax and activations are not counted.
    """
    cfg = config.config if isinstance(config, ModelEntry) else config
    v = _vision_shape(cfg["vision_config"])
    feature_layer = int(cfg.get("vision_feature_layer", -2))
    if isinstance(cfg.get("vision_feature_layer"), list | tuple):
        raise ValueError("flops_split supports a single vision_feature_layer, got a list")
    blocks = feature_layer if feature_layer >= 0 else v["layers"] + 1 + feature_layer
    if not 0 <= blocks <= v["layers"]:
        raise ValueError(f"vision_feature_layer {feature_layer} is outside a {v['layers']}-layer tower")
    patches = (v["image"] // v["patch"]) ** 2
    tokens = patches + 1
    d, ff = v["d"], v["ff"]
    embed = 2 * (v["channels"] * v["patch"] ** 2 * d) * patches
    block = 2 * (4 * d * d + 2 * d * ff) * tokens + 4 * tokens**2 * d
    return float(n_crops * (embed + blocks * block))


def llm_prefill_flops(config: Mapping[str, Any] | ModelEntry, tokens: int = DEFAULT_PREFILL_TOKENS) -> float:
    """FLOPs of one LLM prefill over `tokens` positions (empty KV cache).

    Per layer: 2 * (q, k, v, o, gate, up, down weights) * T for the matmuls (k/v sized by the
    KV heads) and 4 * T^2 * d for attention. The LM head is counted for the last position only,
    as the exported decoder returns last-position logits; embedding lookups cost nothing.
    """
    cfg = config.config if isinstance(config, ModelEntry) else config
    t = _text_shape(cfg["text_config"])
    d, hd = t["d"], t["head_dim"]
    attn_params = d * t["heads"] * hd * 2 + d * t["kv_heads"] * hd * 2
    mlp_params = 3 * d * t["ff"]
    per_layer = 2 * (attn_params + mlp_params) * tokens + 4 * tokens**2 * t["heads"] * hd
    head = 2 * d * t["vocab"]
    return float(t["layers"] * per_layer + head)


def flops_split(
    config: Mapping[str, Any] | ModelEntry, n_crops: int = 5, text_tokens: int = DEFAULT_PREFILL_TOKENS
) -> float:
    """Vision FLOPs over LLM prefill FLOPs for one full-budget request.

    config:      an entry or a LlavaNextConfig-shaped dict (`vision_config`, `text_config`, ...).
    n_crops:     images through the tower (the base image + 4 crops = 5 for a 2x2 grid).
    text_tokens: the whole prefill length, visual span included (2928 visual + ~30 prompt).
    """
    return vision_flops(config, n_crops) / llm_prefill_flops(config, text_tokens)


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_PREFILL_TOKENS",
    "IMAGE_PLACEHOLDER",
    "MISTRAL_TEMPLATE",
    "TOKENIZER_CHECKPOINT",
    "TOKENIZER_KINDS",
    "TOKENIZER_NONE",
    "TOKENIZER_OFFLINE_MISTRAL",
    "VICUNA_TEMPLATE",
    "ModelEntry",
    "check_template",
    "config_source",
    "find_by_hf_id",
    "flops_split",
    "get",
    "llm_prefill_flops",
    "match_config",
    "names",
    "vision_flops",
]
