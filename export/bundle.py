"""The artifact bundle's files beside the graphs, and the manifest's numbers.

    write_arrays(model, folder, "fp32")                  # embed_tokens.npy, image_newline.npy
    write_tokenizer(tokenizer, checkpoint, folder)       # tokenizer.json
    write_manifest(folder, build_manifest(...))          # manifest.json with every file's sha256

The numbers functions (`image_processor_spec`, `vision_spec`, `text_spec`, `token_ids`) take a `LlavaNextConfig`
and work for any model size, so both routes (export.pipeline in memory, export.stream from the meta device)
use them. Where the files are written safely: export.staging.
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from export.defaults import BUNDLE_DTYPES, EXPORTER, min_onnxruntime
from export.errors import ExportError
from export.spec import (
    DATA_SUFFIX,
    DECODER_INPUTS,
    LOGITS,
    OTHER_FILES,
    PAST_KEY,
    PAST_VALUE,
    PRESENT_KEY,
    PRESENT_VALUE,
    PROJECTOR_INPUT,
    PROJECTOR_OUTPUT,
    VISION_INPUT,
    VISION_OUTPUTS,
    text_shape,
    vision_layers,
)
from models.registry import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_PLACEHOLDER,
    TOKENIZER_CHECKPOINT,
    TOKENIZER_OFFLINE_MISTRAL,
)
from runtime.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    GraphSpec,
    HiredDefaults,
    ImageProcessorSpec,
    Manifest,
    ModelInfo,
    PromptSpec,
    TextSpec,
    TokenIds,
    VisionSpec,
    sha256_file,
)

HIRED_DEFAULTS = HiredDefaults(rate=0.2, alpha=0.5, distribution="spatial", newlines="none")
# PIL resample codes as stored in llava-hf preprocessor configs.
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def numpy_dtype(dtype: str) -> type:
    """'fp32' -> np.float32, 'fp16' -> np.float16."""
    if dtype not in BUNDLE_DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(BUNDLE_DTYPES)}, got {dtype!r}")
    return np.float16 if dtype == "fp16" else np.float32


# ---------------------------------------------------------------------------------------------- files
def write_arrays(model, folder: Path, dtype: str) -> dict[str, str]:
    """embed_tokens.npy [V, Dt] and image_newline.npy [Dt] in the bundle dtype; returns {logical: file}.

    LLaVA-1.5 has no newline embedding and its visual span no newline slot (one partition, no canvas rows), so
    its image_newline.npy is zeros that the runtime never reads into the LLM."""
    np_dtype = numpy_dtype(dtype)
    embed = model.get_input_embeddings().weight.detach().float().cpu().numpy().astype(np_dtype)
    newline = newline_vector(model, np_dtype)
    np.save(folder / OTHER_FILES["embed_tokens"], embed, allow_pickle=False)
    np.save(folder / OTHER_FILES["image_newline"], newline, allow_pickle=False)
    return {"embed_tokens": OTHER_FILES["embed_tokens"], "image_newline": OTHER_FILES["image_newline"]}


def newline_vector(model, np_dtype) -> np.ndarray:
    """model.model.image_newline [Dt] as numpy, or zeros [Dt] for a model without one (LLaVA-1.5)."""
    newline = getattr(model.model, "image_newline", None)
    if newline is None:
        return np.zeros(int(model.config.text_config.hidden_size), dtype=np_dtype)
    return newline.detach().float().cpu().numpy().astype(np_dtype)


def write_tokenizer(tokenizer, checkpoint: Path | None, folder: Path) -> Path:
    """tokenizer.json in `folder`: the checkpoint's file verbatim when it has one, else saved from `tokenizer`.

    Raises ExportError when neither exists or the result does not load with `tokenizers.Tokenizer.from_file`.
    """
    from tokenizers import Tokenizer

    target = folder / OTHER_FILES["tokenizer"]
    source = checkpoint / "tokenizer.json" if checkpoint is not None else None
    if source is not None and source.is_file():
        shutil.copyfile(source, target)
    elif tokenizer is not None:
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            tokenizer.save_pretrained(scratch)
            saved = Path(scratch) / "tokenizer.json"
            if not saved.is_file():
                raise ExportError(
                    f"the tokenizer ({type(tokenizer).__name__}) cannot be saved as tokenizer.json; "
                    "put a fast-tokenizer tokenizer.json into the checkpoint folder"
                )
            shutil.copyfile(saved, target)
    else:
        where = checkpoint if checkpoint is not None else "the model"
        raise ExportError(
            f"no tokenizer in {where}: add tokenizer.json (or tokenizer.model + tokenizer_config.json) to it, "
            "or pass --random-weights to use the offline Mistral stand-in"
        )
    try:
        Tokenizer.from_file(str(target))
    except Exception as e:  # tokenizers raises a bare Exception subclass
        raise ExportError(f"tokenizer.json does not load with the tokenizers library ({e}); re-save the tokenizer") from None
    return target


def file_table(folder: Path, names: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(files, sha256) for the manifest: `names` plus `<graph>_data` for every graph with external data."""
    files = dict(names)
    for logical, fname in names.items():
        if (folder / (fname + DATA_SUFFIX)).is_file():
            files[f"{logical}_data"] = fname + DATA_SUFFIX
    missing = [f for f in files.values() if not (folder / f).is_file()]
    if missing:
        raise ExportError(f"the bundle is missing {', '.join(missing)} after export; this is a bug in export/")
    return files, {logical: sha256_file(folder / fname) for logical, fname in files.items()}


# ---------------------------------------------------------------------------------------------- numbers
def graph_specs() -> dict[str, GraphSpec]:
    """Logical -> tensor names of the three graphs ("{i}" marks the layer index of KV tensors)."""
    features, early, late = VISION_OUTPUTS
    embeds, mask, positions = DECODER_INPUTS
    return {
        "vision": GraphSpec(
            inputs={"pixel_values": VISION_INPUT},
            outputs={"features": features, "early_scores": early, "late_scores": late},
        ),
        "projector": GraphSpec(inputs={"features": PROJECTOR_INPUT}, outputs={"projected": PROJECTOR_OUTPUT}),
        "decoder": GraphSpec(
            inputs={
                "inputs_embeds": embeds,
                "attention_mask": mask,
                "position_ids": positions,
                "past_key": PAST_KEY,
                "past_value": PAST_VALUE,
            },
            outputs={"logits": LOGITS, "present_key": PRESENT_KEY, "present_value": PRESENT_VALUE},
        ),
    }


def read_processor_config(checkpoint: Path | None) -> dict[str, Any] | None:
    """The image-processor dict of a checkpoint: preprocessor_config.json, or processor_config.json's
    "image_processor" entry (transformers 5 saves it there); None when the folder has neither."""
    if checkpoint is None:
        return None
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = checkpoint / name
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise ExportError(f"{path} is not readable JSON ({e}); fix or remove it") from None
            data = data.get(key) if key else data
            if isinstance(data, dict):
                return data
    return None


def image_processor_spec(config, processor: Mapping[str, Any] | None) -> ImageProcessorSpec:
    """Preprocessing numbers from a checkpoint's processor config, else CLIP-336 defaults + the model's pinpoints.

    Pinpoints are (height, width) pairs, as transformers stores them. LLaVA-1.5 has none: an empty list tells the
    runtime the image is one partition (shortest edge resized to `shortest_edge`, centre crop of `crop_size`).
    """
    side = int(config.vision_config.image_size)
    p = dict(processor or {})
    crop = p.get("crop_size", {"height": side, "width": side})
    if isinstance(crop, Mapping):
        if crop.get("height") != crop.get("width"):
            raise ExportError(f"processor crop_size must be square, got {dict(crop)}")
        crop = crop["height"]
    size = p.get("size", {"shortest_edge": side})
    shortest = size.get("shortest_edge", side) if isinstance(size, Mapping) else size
    pins = p.get("image_grid_pinpoints", getattr(config, "image_grid_pinpoints", None)) or ()
    resample = p.get("resample", 3)
    resample = RESAMPLE_NAMES.get(resample, resample) if isinstance(resample, int) else str(resample).lower()
    return ImageProcessorSpec(
        crop_size=int(crop),
        shortest_edge=int(shortest),
        grid_pinpoints=tuple((int(h), int(w)) for h, w in pins),
        image_mean=tuple(float(x) for x in p.get("image_mean", CLIP_MEAN)),
        image_std=tuple(float(x) for x in p.get("image_std", CLIP_STD)),
        rescale_factor=float(p.get("rescale_factor", 1 / 255)),
        resample=resample,
    )


def vision_spec(config) -> VisionSpec:
    """Vision facts of a LlavaNextConfig; early/late are 0-based blocks (late = last block the features need)."""
    vc = config.vision_config
    layers = vision_layers(config)
    image, patch = int(vc.image_size), int(vc.patch_size)
    return VisionSpec(
        num_layers=layers.num_layers,
        heads=int(vc.num_attention_heads),
        hidden_size=int(vc.hidden_size),
        image_size=image,
        patch_size=patch,
        tokens_per_image=(image // patch) ** 2,
        feature_layer=layers.feature_layer,
        early_layer=layers.early_layer,
        late_layer=layers.late_layer,
    )


def text_spec(config) -> TextSpec:
    """Text model facts of a LlavaNextConfig (KV cache shape, vocab, context length)."""
    tc = config.text_config
    num_layers, kv, head_dim = text_shape(config)
    return TextSpec(
        hidden_size=int(tc.hidden_size),
        num_layers=num_layers,
        num_kv_heads=kv,
        head_dim=head_dim,
        vocab_size=int(tc.vocab_size),
        max_position_embeddings=int(tc.max_position_embeddings),
    )


def token_ids(config, tokenizer_json: Path) -> TokenIds:
    """Image/BOS/EOS/PAD ids: the config's, else the tokenizer's; PAD falls back to EOS when neither has one.

    Raises ExportError when tokenizer.json does not map `<image>` to the config's image token id.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tc = config.text_config
    image = int(getattr(config, "image_token_id", None) or config.image_token_index)
    got = tok.token_to_id(IMAGE_PLACEHOLDER)
    if got != image:
        raise ExportError(
            f"tokenizer.json maps {IMAGE_PLACEHOLDER} to {got}, the config's image_token_index is {image}; "
            "the tokenizer does not belong to this checkpoint"
        )

    def pick(config_value, *pieces: str) -> int | None:
        if isinstance(config_value, list):
            config_value = config_value[0] if config_value else None
        if config_value is not None:
            return int(config_value)
        for piece in pieces:
            found = tok.token_to_id(piece)
            if found is not None:
                return int(found)
        return None

    bos = pick(getattr(tc, "bos_token_id", None), "<s>")
    eos = pick(getattr(tc, "eos_token_id", None), "</s>")
    pad = pick(getattr(tc, "pad_token_id", None), "<pad>")
    if bos is None or eos is None:
        raise ExportError("neither the config nor tokenizer.json names BOS/EOS tokens; add bos/eos_token_id to config.json")
    return TokenIds(image=image, bos=bos, eos=eos, pad=eos if pad is None else pad)


def describe_tokenizer(kind: str) -> str:
    """manifest.model.tokenizer: "checkpoint", or what stands in for the checkpoint's tokenizer."""
    if kind == TOKENIZER_CHECKPOINT:
        return TOKENIZER_CHECKPOINT
    if kind == TOKENIZER_OFFLINE_MISTRAL:
        return f"{kind} (stand-in: mistral-common's Mistral sentencepiece + <image>, not the checkpoint's)"
    return kind


def build_manifest(
    *,
    config,
    model_info: ModelInfo,
    processor: Mapping[str, Any] | None,
    prompt_template: str,
    add_bos: bool,
    files: dict[str, str],
    sha256: dict[str, str],
    tokenizer_json: Path,
    export_info: dict[str, Any],
) -> Manifest:
    """The bundle's Manifest from a LlavaNextConfig and what was written."""
    return Manifest(
        format_version=FORMAT_VERSION,
        model=model_info,
        files=files,
        sha256=sha256,
        image_processor=image_processor_spec(config, processor),
        vision=vision_spec(config),
        text=text_spec(config),
        tokens=token_ids(config, tokenizer_json),
        prompt=PromptSpec(template=prompt_template, add_bos=bool(add_bos), image_placeholder=IMAGE_PLACEHOLDER),
        graphs=graph_specs(),
        hired=HIRED_DEFAULTS,
        export_info=export_info,
    )


def export_info(opset: int, seconds: dict[str, float]) -> dict[str, Any]:
    """Provenance for the manifest: versions, opset, exporter, minimum onnxruntime, stage times."""
    import onnx
    import onnxscript
    import torch
    import transformers

    return {
        "exporter": EXPORTER,
        "opset": opset,
        "min_onnxruntime": min_onnxruntime(opset),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__,
            "python": platform.python_version(),
        },
        "seconds": seconds,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """manifest.json in `folder`, then read back through Manifest.from_file (keys, types, hashes)."""
    path = folder / MANIFEST_NAME
    manifest.to_file(path)
    Manifest.from_file(folder)
    return path


def human_size(n: int) -> str:
    """Bytes as '12.3 MiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def folder_bytes(folder: Path, names: Mapping[str, str]) -> int:
    return sum((folder / f).stat().st_size for f in names.values() if (folder / f).is_file())

