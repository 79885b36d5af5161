"""Checkpoint -> verified artifact bundle, stage by stage, written atomically.

    from export.pipeline import export_model, export_bundle
    export_model("checkpoints/tiny", "artifacts/tiny", force=True, verify=True)   # what the CLI runs
    export_bundle(model, tokenizer, meta, folder, dtype="fp32", opset=23)        # a loaded model -> files

`export_model` resolves and loads the model (models.load), stages the bundle in a temp folder beside `out`,
writes vision/projector/decoder graphs, the embedding table, the newline vector, tokenizer.json and
manifest.json, optionally verifies it against PyTorch, and only then moves it into place. A bundle that
fails verification is kept beside `out` as `<out>.unverified` for inspection; `out` is left untouched.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.bundle import (
    DTYPES,
    Staging,
    build_manifest,
    check_out,
    describe_tokenizer,
    file_table,
    folder_bytes,
    human_size,
    read_processor_config,
    write_arrays,
    write_manifest,
    write_tokenizer,
)
from export.errors import ExportError, VerificationError
from export.spec import GRAPH_FILES, vision_layers
from runtime.manifest import Manifest, ModelInfo

DEFAULT_OPSET = 23
OPSETS = (18, 19, 20, 21, 22, 23)  # the dynamo exporter starts at 18
# Oldest onnxruntime able to run each opset's graphs. 23: the ONNX Attention-23 CPU kernel arrived in
# onnxruntime 1.23 (microsoft/onnxruntime#25156; RotaryEmbedding/RMSNormalization-23 came with 1.22);
# CUDA kernels for Attention-23 came later (microsoft/onnxruntime#27542, 2026). 18: onnxruntime 1.14.
# Opsets 19-22 are allowed but untested here; look them up in the compatibility table.
MIN_ONNXRUNTIME = {18: "1.14", 23: "1.23"}
COMPAT_TABLE = "https://onnxruntime.ai/docs/reference/compatibility.html"
EXPORTER = "torch.onnx.export(dynamo=True)"


def stderr_log(msg: str) -> None:
    print(f"[export] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class BundleMeta:
    """What the manifest needs beyond the model object: where it came from and how to prompt it."""

    name: str
    source: str
    random_weights: bool
    tokenizer_kind: str  # "checkpoint" | "offline-mistral-sp" | ...
    prompt_template: str
    add_bos: bool
    checkpoint: Path | None  # folder with the processor config / tokenizer.json, if any


def export_bundle(
    model,
    tokenizer,
    meta: BundleMeta,
    folder: Path,
    *,
    dtype: str,
    opset: int = DEFAULT_OPSET,
    log: Callable[[str], None] = stderr_log,
    timings: dict[str, float] | None = None,
) -> Manifest:
    """Write the whole bundle of a loaded LlavaNextForConditionalGeneration into the (empty) `folder`."""
    from export.decoder import export_decoder
    from export.projector import export_projector
    from export.vision import export_vision

    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if opset not in OPSETS:
        raise ExportError(f"--opset must be one of {', '.join(map(str, OPSETS))}, got {opset}")
    try:
        layers = vision_layers(model.config)
    except ValueError as e:
        raise ExportError(f"{meta.name}: {e}") from None
    times = dict(timings or {})
    log(
        f"vision: blocks 0..{layers.blocks_run - 1} of {layers.num_layers} (feature layer {layers.feature_layer}), "
        f"scores of blocks {layers.early_layer} and {layers.late_layer}"
    )
    writers = {"vision": export_vision, "projector": export_projector, "decoder": export_decoder}
    for name, writer in writers.items():
        t0 = time.perf_counter()
        writer(model, folder / GRAPH_FILES[name], opset=opset)
        times[name] = round(time.perf_counter() - t0, 2)
        names = {name: GRAPH_FILES[name], f"{name}_data": GRAPH_FILES[name] + ".data"}
        log(f"{GRAPH_FILES[name]} (opset {opset}): {human_size(folder_bytes(folder, names))} in {times[name]:.1f} s")

    t0 = time.perf_counter()
    arrays = write_arrays(model, folder, dtype)
    tokenizer_json = write_tokenizer(tokenizer, meta.checkpoint, folder)
    times["arrays_and_tokenizer"] = round(time.perf_counter() - t0, 2)
    log(
        f"embed_tokens.npy, image_newline.npy, tokenizer.json: {human_size(folder_bytes(folder, arrays))} "
        f"in {times['arrays_and_tokenizer']:.1f} s"
    )

    t0 = time.perf_counter()
    files, sha256 = file_table(folder, {**GRAPH_FILES, **arrays, "tokenizer": tokenizer_json.name})
    times["hashing"] = round(time.perf_counter() - t0, 2)
    info = ModelInfo(
        name=meta.name,
        source=meta.source,
        dtype=dtype,
        random_weights=meta.random_weights,
        tokenizer=describe_tokenizer(meta.tokenizer_kind),
    )
    manifest = build_manifest(
        config=model.config,
        model_info=info,
        processor=read_processor_config(meta.checkpoint),
        prompt_template=meta.prompt_template,
        add_bos=meta.add_bos,
        files=files,
        sha256=sha256,
        tokenizer_json=tokenizer_json,
        export_info=export_info(opset, times),
    )
    write_manifest(folder, manifest)
    log(f"manifest.json: {len(files)} files, {human_size(folder_bytes(folder, files))} in all")
    return Manifest.from_file(folder, verify=False)


def export_info(opset: int, seconds: dict[str, float]) -> dict[str, Any]:
    """Provenance for the manifest: versions, opset, exporter, minimum onnxruntime, stage times."""
    import onnx
    import onnxscript
    import torch
    import transformers

    return {
        "exporter": EXPORTER,
        "opset": opset,
        "min_onnxruntime": MIN_ONNXRUNTIME.get(opset, f"see {COMPAT_TABLE}"),
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


def check_model_arg(model: str | os.PathLike) -> None:
    """Refuse, before torch is even imported, a `--model` that is neither a folder nor a registry name/hub id."""
    from models import registry

    text = os.fspath(model)
    if Path(text).expanduser().is_dir() or text in registry.names() or registry.find_by_hf_id(text) is not None:
        return
    raise ExportError(
        f"{text!r} is neither a checkpoint folder (no such directory) nor a registry model; "
        f"known models: {', '.join(registry.names())}"
    )


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def refuse_pickled_weights(model: str | os.PathLike) -> None:
    """ExportError if the checkpoint has no safetensors weights but pickled ones (pytorch_model.bin, ...).

    Unpickling an untrusted file can run code; torch's weights_only loader narrows that, it does not remove it.
    """
    from models.load import CheckpointError, resolve_checkpoint

    try:
        folder = resolve_checkpoint(model)
    except CheckpointError:
        return  # load_model says what is missing
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted({p.name for pattern in PICKLED_WEIGHTS for p in folder.glob(pattern)})
    if pickled:
        raise ExportError(
            f"{folder} holds its weights only as pickled PyTorch files ({', '.join(pickled[:3])}), which hired-edge "
            "never loads (unpickling an untrusted file can run code); convert them to safetensors on a trusted "
            "machine (model.save_pretrained(dir, safe_serialization=True)) or pass --random-weights"
        )


def load_for_export(model: str | os.PathLike, *, random_weights: bool, dtype: str, seed: int = 0):
    """(torch model, tokenizer or None, BundleMeta) via models.load; its errors become one-line ExportErrors."""
    import torch

    from models.load import CheckpointError, load_model

    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    if not random_weights:
        refuse_pickled_weights(model)
    try:
        loaded, tokenizer, info = load_model(model, random_weights=random_weights, dtype=torch_dtype, seed=seed)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    except (OSError, ValueError) as e:  # unreadable weights, a config transformers refuses
        raise ExportError(f"cannot load {os.fspath(model)}: {e}") from None
    folder = info.checkpoint
    if folder is None and Path(os.fspath(model)).expanduser().is_dir():
        folder = Path(os.fspath(model)).expanduser()  # random weights with a folder's config
    if tokenizer is None and not (folder is not None and (folder / "tokenizer.json").is_file()):
        raise ExportError(
            f"{os.fspath(model)} has no tokenizer (tokenizer.json or tokenizer.model); copy the checkpoint's "
            "tokenizer files into it, or pass --random-weights to use the offline Mistral stand-in"
        )
    meta = BundleMeta(
        name=info.name,
        source=info.source,
        random_weights=info.random_weights,
        tokenizer_kind=info.tokenizer,
        prompt_template=info.prompt_template,
        add_bos=info.add_bos,
        checkpoint=folder,
    )
    return loaded, tokenizer, meta


def export_model(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    random_weights: bool = False,
    dtype: str = "fp32",
    opset: int = DEFAULT_OPSET,
    verify: bool = False,
    force: bool = False,
    seed: int = 0,
    log: Callable[[str], None] = stderr_log,
    quant: str = "none",
    block_size: int = 32,
) -> Path:
    """Export registry name or checkpoint folder `model` to the bundle folder `out`; returns `out`.

    `quant` "int8"/"int4": the decoder's linear layers become MatMulNBits (export.quantize) after --verify has
    checked the float graphs against PyTorch.

    Raises ExportError (bad input; nothing written) or VerificationError (`out` untouched, the bundle is
    kept as `<out>.unverified`).
    """
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if opset not in OPSETS:
        raise ExportError(f"--opset must be one of {', '.join(map(str, OPSETS))}, got {opset}")
    if quant not in ("none", "int8", "int4"):
        raise ExportError(f"--quant must be one of none, int8, int4, got {quant!r}")
    if quant != "none" and (isinstance(block_size, bool) or block_size < 16 or block_size & (block_size - 1)):
        raise ExportError(f"--block-size must be a power of 2 >= 16 (16, 32, 64, 128, ...), got {block_size!r}")
    out = Path(out)
    check_model_arg(model)
    check_out(out, force=force)
    if random_weights:
        from export.large import check_bundle, export_large, model_config, needs_streaming

        if needs_streaming(model_config(model)[0]):  # float32 weights > RAM / 3: meta model + streamed weights
            log(f"{model} is too large to build in memory here; streaming seeded random weights (export.large)")
            export_large(model, out, dtype=dtype, opset=opset, seed=seed, force=force, log=log)
            if verify:  # torch cannot hold the model on this machine: structural checks + one vision run
                check_bundle(out, log=log)
            return out
    t_start = time.perf_counter()
    with Staging(out, force=force) as stage:
        t0 = time.perf_counter()
        loaded, tokenizer, meta = load_for_export(model, random_weights=random_weights, dtype=dtype, seed=seed)
        load_s = round(time.perf_counter() - t0, 2)
        params = sum(p.numel() for p in loaded.parameters())
        log(f"loaded {meta.name} ({meta.source}): {params / 1e6:,.1f} M parameters, {dtype}, in {load_s:.1f} s")
        export_bundle(loaded, tokenizer, meta, stage.path, dtype=dtype, opset=opset, log=log, timings={"load": load_s})
        if verify:
            from export.verify import verify_bundle

            t0 = time.perf_counter()
            try:
                verify_bundle(stage.path, loaded, log=log)
            except VerificationError:
                kept = stage.keep_as(out.with_name(out.name + ".unverified"))
                log(f"verification failed; the bundle is kept at {kept} for inspection, {out} is unchanged")
                raise
            log(f"verified against PyTorch in {time.perf_counter() - t0:.1f} s")
        if quant != "none":
            from export.quantize import quantize_bundle

            quantize_bundle(stage.path, quant, block_size, log=log)
        stage.commit()
    log(f"wrote {out} in {time.perf_counter() - t_start:.1f} s")
    return out
