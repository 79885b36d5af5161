"""Find and load LLaVA-NeXT checkpoints by registry name or folder, offline only.

    from models.load import resolve_checkpoint, load_model, load_prompt
    path = resolve_checkpoint("llava-next-7b")          # checkpoints/llava-next-7b or the HF cache
    model, tokenizer, info = load_model("checkpoints/tiny")
    model, tokenizer, info = load_model("llava-next-7b", random_weights=True, dtype=torch.float16)
    template, add_bos = load_prompt("checkpoints/tiny")

Nothing is downloaded here (`models.download` does that; `python -m export` calls it first). A registry
name resolves to `checkpoints/<name>/` (under the current folder or the repository) or to a complete
snapshot of its `hf_id` in the local Hugging Face cache; otherwise `CheckpointNotFound` says what to
download and where to put it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from models import registry
from models.build import BUILD_INFO_FILE, PROMPT_FILE, random_model
from models.tokenizer import build_offline_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class CheckpointError(Exception):
    """A checkpoint folder is unusable here (not LLaVA-NeXT, unreadable config, no prompt template)."""


class CheckpointNotFound(CheckpointError):
    """No checkpoint for a name or path on this machine; the message says what to download or build."""


@dataclass(frozen=True)
class LoadInfo:
    """What `load_model` loaded, for manifests and logs.

    name:            registry name, or the folder's name when it matches no entry.
    hf_id:           the real checkpoint's hub id, when known.
    source:          one line: where the weights came from.
    checkpoint:      the folder the weights were read from; None when built in memory.
    random_weights:  True when the weights are seeded random (in memory or a `models.build` folder).
    seed:            the seed of random weights, else None.
    dtype:           torch dtype name of the weights as loaded ("float32", ...).
    prompt_template: text with one `<image>` and one `{prompt}`.
    add_bos:         whether BOS goes in front of the templated prompt.
    tokenizer:       "checkpoint", "offline-mistral-sp" (the stand-in) or "none".
    """

    name: str
    hf_id: str | None
    source: str
    checkpoint: Path | None
    random_weights: bool
    seed: int | None
    dtype: str
    prompt_template: str
    add_bos: bool
    tokenizer: str

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["checkpoint"] = None if self.checkpoint is None else str(self.checkpoint)
        return out


# ----------------------------------------------------------------------------- resolving


def _entry_for(name: str) -> registry.ModelEntry | None:
    """The registry entry called `name`, or whose hf_id is `name`; None if neither."""
    if name in registry.names():
        return registry.get(name)
    return registry.find_by_hf_id(name)


def _local_dirs(name: str) -> list[Path]:
    """Where a downloaded or built checkpoint of registry model `name` is looked for, in order."""
    dirs = [Path.cwd() / "checkpoints" / name, REPO_ROOT / "checkpoints" / name]
    unique: list[Path] = []
    for d in dirs:
        if d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hf_cache_snapshot(hf_id: str) -> Path | None:
    """The snapshot folder of `hf_id` in the local HF cache if it holds config.json and all weights.

    Never touches the network (`try_to_load_from_cache` only reads the cache). Safetensors shards must be whole
    (models.download.missing_files: every file of the weight map, headers that account for each file's size).
    """
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(hf_id, "config.json")
    if not isinstance(found, str):
        return None
    snapshot = Path(found).parent
    if not _has_weights(snapshot):
        return None
    from models.download import missing_files, weight_files

    if weight_files(snapshot) is not None and missing_files(snapshot, tokenizer=False):
        return None  # an interrupted download: a shard missing or truncated
    return snapshot


def _has_weights(folder: Path) -> bool:
    """True if `folder` has model.safetensors, or an index whose shards are all present."""
    if (folder / "model.safetensors").is_file():
        return True
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
            return bool(shards) and all((folder / s).is_file() for s in shards)
    return (folder / "pytorch_model.bin").is_file()


def _missing_message(entry: registry.ModelEntry) -> str:
    where = f"checkpoints/{entry.name}"
    if entry.hf_id is None:
        return (
            f"model {entry.name!r} has no checkpoint at {where}/ (it is built locally, not downloaded); "
            f"build it with: python -m models.build {entry.name} --out {where} "
            f"(or `make export MODEL={entry.name}`), or pass --random-weights to use seeded random weights"
        )
    return (
        f"model {entry.name!r} ({entry.hf_id}) is not on this machine: no {where}/config.json and no "
        f"complete copy in the Hugging Face cache ({_hf_cache_dir()}). Download it with: "
        f"python -m models.download {entry.name} (or `make export MODEL={entry.name}`, which downloads it), or "
        f"huggingface-cli download {entry.hf_id} --local-dir {where} "
        f"(or `hf download {entry.hf_id} --local-dir {where}`) and run again from the repository root, "
        f"or pass --random-weights to export it with seeded random weights and a stand-in tokenizer"
    )


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """The checkpoint folder for a folder path, a registry name or a registry hf_id.

    A folder must contain config.json (a folder without one that shares a registry name, such as the
    repository's own `bench/` package, is read as the name). A name resolves to checkpoints/<name>/ (current folder, then
    the repository) or to a complete snapshot in the local HF cache. Raises CheckpointNotFound
    saying what to download or build and where to put it.
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir() and ((path / "config.json").is_file() or _entry_for(text) is None):
        if (path / "config.json").is_file():
            return path
        raise CheckpointNotFound(
            f"{path} is a folder but has no config.json; point at a Hugging Face checkpoint folder "
            f"(config.json + model.safetensors) or use a registry name ({', '.join(registry.names())})"
        )
    entry = _entry_for(text)
    if entry is None:
        raise CheckpointNotFound(
            f"{text!r} is neither a checkpoint folder (no such directory) nor a registry model; "
            f"known models: {', '.join(registry.names())}"
        )
    for folder in _local_dirs(entry.name):
        if (folder / "config.json").is_file():
            return folder
    if entry.hf_id is not None:
        snapshot = hf_cache_snapshot(entry.hf_id)
        if snapshot is not None:
            return snapshot
    raise CheckpointNotFound(_missing_message(entry))


# ----------------------------------------------------------------------------- reading a folder


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of `folder` as a dict; raises CheckpointError unless it is a LLaVA-NeXT or LLaVA-1.5 config."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err
    model_type = config.get("model_type")
    if model_type not in ("llava_next", "llava"):
        raise CheckpointError(
            f"{folder} is not a LLaVA-NeXT or LLaVA-1.5 checkpoint: config.json has model_type {model_type!r}, "
            "expected 'llava_next' (llava-hf/llava-v1.6-*-hf, `python -m models.build tiny`) or 'llava' "
            "(llava-hf/llava-1.5-*-hf)"
        )
    return config


def _read_json_if(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); rebuild or fix it") from err


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in TOKENIZER_FILES)


def _template_from_config(config: Mapping[str, Any]) -> tuple[str, bool] | None:
    """The template of the registry entry a real checkpoint comes from, else by text model type."""
    entry = registry.match_config(config)
    if entry is not None:
        return entry.prompt_template, entry.add_bos
    model_type = (config.get("text_config") or {}).get("model_type")
    if model_type == "llama":
        return registry.VICUNA_TEMPLATE, True
    if model_type == "mistral":
        return registry.MISTRAL_TEMPLATE, True
    return None


def _prompt_from_folder(folder: Path) -> tuple[str, bool]:
    stored = _read_json_if(folder / PROMPT_FILE)
    if stored is not None:
        template, add_bos = stored.get("template"), stored.get("add_bos")
        if not isinstance(template, str) or not isinstance(add_bos, bool):
            raise CheckpointError(
                f"{folder / PROMPT_FILE} must hold {{\"template\": str, \"add_bos\": bool}}, got {stored!r}"
            )
        return registry.check_template(template), add_bos
    config = read_config(folder)
    found = _template_from_config(config)
    if found is None:
        model_type = (config.get("text_config") or {}).get("model_type")
        raise CheckpointError(
            f"no prompt template for {folder}: no {PROMPT_FILE} and text model_type {model_type!r} is neither "
            f'llama (Vicuna) nor mistral; write {folder / PROMPT_FILE} as {{"template": "... <image>\\n{{prompt}} ...", '
            '"add_bos": true}'
        )
    return found


def load_prompt(path_or_entry: str | os.PathLike | registry.ModelEntry) -> tuple[str, bool]:
    """(template, add_bos) of a checkpoint folder, a registry entry or a registry name.

    A folder's prompt_template.json wins; a real llava-hf folder without one is matched to its
    registry entry (by hub id or text model), else by text model type: llama -> Vicuna template,
    mistral -> Mistral template.
    """
    if isinstance(path_or_entry, registry.ModelEntry):
        return path_or_entry.prompt_template, path_or_entry.add_bos
    text = os.fspath(path_or_entry)
    if Path(text).is_dir():
        return _prompt_from_folder(Path(text))
    entry = _entry_for(text)
    if entry is None:
        raise CheckpointNotFound(
            f"{text!r} is neither a checkpoint folder nor a registry model; known models: {', '.join(registry.names())}"
        )
    return entry.prompt_template, entry.add_bos


# ----------------------------------------------------------------------------- loading


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _auto_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _load_random(text: str, *, dtype: torch.dtype, seed: int):
    """Random-weight model for a folder's config or a registry entry's config, with the best tokenizer at hand."""
    from models.arch import config_class

    path = Path(text).expanduser()
    if path.is_dir() and ((path / "config.json").is_file() or _entry_for(text) is None):
        folder = resolve_checkpoint(path)
        config_dict = read_config(folder)
        entry = registry.match_config(config_dict)
        config = config_class(config_dict["model_type"]).from_pretrained(str(folder))
        name = entry.name if entry is not None else folder.name
        hf_id = entry.hf_id if entry is not None else None
        template, add_bos = _prompt_from_folder(folder)
        source = f"random weights (seed {seed}) with the config of {folder}"
        tok_folder: Path | None = folder if _has_tokenizer(folder) else None
    else:
        entry = _entry_for(text)
        if entry is None:
            raise CheckpointNotFound(
                f"{text!r} is neither a checkpoint folder nor a registry model; "
                f"known models: {', '.join(registry.names())}"
            )
        config = entry.llava_config()
        name, hf_id = entry.name, entry.hf_id
        template, add_bos = entry.prompt_template, entry.add_bos
        source = f"random weights (seed {seed}) with the registry config of {entry.name}"
        try:
            found = resolve_checkpoint(entry.name)
        except CheckpointNotFound:
            found = None
        tok_folder = found if found is not None and _has_tokenizer(found) else None

    model = random_model(config, seed=seed, dtype=_dtype_name(dtype))
    if tok_folder is not None:
        tokenizer, tok_kind = _auto_tokenizer(tok_folder), registry.TOKENIZER_CHECKPOINT
    else:
        tokenizer, tok_kind = build_offline_tokenizer(), registry.TOKENIZER_OFFLINE_MISTRAL
    info = LoadInfo(
        name=name,
        hf_id=hf_id,
        source=source,
        checkpoint=None,
        random_weights=True,
        seed=seed,
        dtype=_dtype_name(dtype),
        prompt_template=template,
        add_bos=add_bos,
        tokenizer=tok_kind,
    )
    return model, tokenizer, info


def _load_folder(text: str, *, dtype: torch.dtype):
    from models.arch import model_class

    folder = resolve_checkpoint(text)
    config = read_config(folder)
    built = _read_json_if(folder / BUILD_INFO_FILE) or {}
    entry = registry.match_config(config)
    if built.get("model") in registry.names():
        entry = registry.get(built["model"])
    elif entry is None:
        entry = _entry_for(text)
    template, add_bos = _prompt_from_folder(folder)
    model = model_class(config["model_type"]).from_pretrained(str(folder), dtype=dtype, use_safetensors=True).eval()
    has_tok = _has_tokenizer(folder)
    tokenizer = _auto_tokenizer(folder) if has_tok else None
    if built:
        source = f"{folder} (built by models.build: {built.get('model')}, seed {built.get('seed')}, random weights)"
        tok_kind = str(built.get("tokenizer", registry.TOKENIZER_OFFLINE_MISTRAL)) if has_tok else registry.TOKENIZER_NONE
    else:
        source = f"{folder}" + (f" ({entry.hf_id})" if entry is not None and entry.hf_id else "")
        tok_kind = registry.TOKENIZER_CHECKPOINT if has_tok else registry.TOKENIZER_NONE
    info = LoadInfo(
        name=entry.name if entry is not None else folder.name,
        hf_id=entry.hf_id if entry is not None else None,
        source=source,
        checkpoint=folder,
        random_weights=bool(built.get("random_weights", False)),
        seed=built.get("seed") if built else None,
        dtype=_dtype_name(dtype),
        prompt_template=template,
        add_bos=add_bos,
        tokenizer=tok_kind,
    )
    return model, tokenizer, info


def load_model(
    name_or_path: str | os.PathLike,
    *,
    random_weights: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """(LlavaNextForConditionalGeneration, or LlavaForConditionalGeneration for LLaVA-1.5, in eval mode,
    tokenizer or None, LoadInfo).

    name_or_path:   a checkpoint folder, a registry name or a registry hf_id.
    random_weights: build the model in memory from the folder's or the registry's config with
                    weights seeded by `seed` (the same weights `python -m models.build` writes); the
                    tokenizer is the checkpoint's when one is on disk, else the offline Mistral stand-in.
                    Needs the full model in memory: ~28 GB for a 7B model in float32.
    dtype:          torch dtype of the weights.
    Raises CheckpointNotFound (what to download) or CheckpointError (not LLaVA-NeXT, bad files).
    The tokenizer is None when a folder has no tokenizer files.
    """
    text = os.fspath(name_or_path)
    if random_weights:
        return _load_random(text, dtype=dtype, seed=seed)
    return _load_folder(text, dtype=dtype)


__all__ = [
    "CheckpointError",
    "CheckpointNotFound",
    "LoadInfo",
    "hf_cache_snapshot",
    "load_model",
    "load_prompt",
    "read_config",
    "resolve_checkpoint",
]
