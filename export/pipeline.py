"""Checkpoint -> verified artifact bundle, stage by stage, written atomically.

    from export.pipeline import export_model, export_bundle
    export_model("checkpoints/tiny", "artifacts/tiny", force=True, verify=True)   # what the CLI runs
    export_bundle(model, tokenizer, meta, folder, dtype="fp32", opset=23)        # a loaded model -> files

`export_model` chooses the route: in memory, or streaming (export.stream) for random-weight models too large
for this machine's RAM. In memory it resolves and loads the model (models.load), stages the bundle in a temp
folder beside `out` (export.staging), writes vision/projector/decoder graphs, the embedding table, the newline
vector, tokenizer.json and manifest.json, optionally verifies it against PyTorch, and only then moves it into
place. A bundle that fails verification is kept beside `out` as `<out>.unverified` for inspection; `out` is left
untouched. Library warnings nobody can act on are filtered for the export's duration (export.quiet).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from export.bundle import (
    build_manifest,
    describe_tokenizer,
    export_info,
    file_table,
    folder_bytes,
    human_size,
    read_processor_config,
    write_arrays,
    write_manifest,
    write_tokenizer,
)
from export.defaults import (
    BUNDLE_DTYPES,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_MEMORY_LIMIT_GIB,
    DEFAULT_OPSET,
    DEFAULT_SEED,
    OPSETS,
    default_dtype,
)
from export.errors import ExportError, ExportInterrupted, VerificationError
from export.quiet import quiet_export, stderr_log
from export.spec import GRAPH_FILES, vision_layers
from export.staging import Staging, check_out
from runtime.manifest import Manifest, ModelInfo

QUANTS = ("none", "int8", "int4")


@dataclass(frozen=True)
class BundleMeta:
    """What the manifest needs beyond the model object: where it came from and how to prompt it."""

    name: str
    source: str
    random_weights: bool
    tokenizer_kind: str  # one of models.registry.TOKENIZER_KINDS
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

    if dtype not in BUNDLE_DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(BUNDLE_DTYPES)}, got {dtype!r}")
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
    dtype: str | None = None,
    opset: int = DEFAULT_OPSET,
    verify: bool = False,
    force: bool = False,
    seed: int = DEFAULT_SEED,
    log: Callable[[str], None] = stderr_log,
    memory_limit_gib: float = DEFAULT_MEMORY_LIMIT_GIB,
    quant: str = "none",
    block_size: int = DEFAULT_BLOCK_SIZE,
    download_dir: str | os.PathLike | None = None,
) -> Path:
    """Export registry name or checkpoint folder `model` to the bundle folder `out`; returns `out`.

    A registry model with a hub id and no complete copy on this machine is downloaded first (models.download:
    into the HF cache, or `download_dir`); never with `random_weights`.

    The route is chosen here: in memory (the model is loaded, exported and verified against PyTorch), or, for
    --random-weights models whose float32 weights exceed a third of the RAM, streaming (export.stream: meta
    device, seeded weights written tensor by tensor; --verify runs export.check's structural checks).
    dtype None takes the route's default (fp32 in memory, fp16 streaming); the choice is logged first.
    `quant` "int8"/"int4": the decoder's linear layers become MatMulNBits (export.quantize) after --verify has
    checked the float graphs against PyTorch.

    Raises ExportError (bad input; nothing written), VerificationError (`out` untouched, the bundle is kept as
    `<out>.unverified`) or ExportInterrupted (Ctrl-C/SIGTERM; its message says what is on disk).
    """
    if dtype is not None and dtype not in BUNDLE_DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(BUNDLE_DTYPES)}, got {dtype!r}")
    if opset not in OPSETS:
        raise ExportError(f"--opset must be one of {', '.join(map(str, OPSETS))}, got {opset}")
    if quant not in QUANTS:
        raise ExportError(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    if quant != "none" and (isinstance(block_size, bool) or block_size < 16 or block_size & (block_size - 1)):
        raise ExportError(f"--block-size must be a power of 2 >= 16 (16, 32, 64, 128, ...), got {block_size!r}")
    out = Path(out)
    stage = None
    t_start = time.perf_counter()
    try:
        check_model_arg(model)
        if not random_weights:  # before quiet_export, which turns the download's progress bars off
            model = _fetch_if_missing(model, out, force=force, download_dir=download_dir, log=log)
        with quiet_export():
            keep = model_folders(model)
            check_out(out, force=force, keep=keep)
            route = "in-memory"
            if random_weights:
                from export.meta import model_config, needs_streaming

                if needs_streaming(model_config(model)[0]):  # float32 weights > RAM / 3
                    route = "streaming"
            chosen = default_dtype(route) if dtype is None else dtype
            log = _first_line(
                log,
                f"{route} route ({ROUTE_WHY[route]}), dtype {chosen}"
                + (" (the route's default)" if dtype is None else "")
                + f", opset {opset}",
            )
            stage = Staging(out, force=force, keep=keep)
            with stage:
                if route == "streaming":
                    _export_streaming(model, stage, dtype=chosen, opset=opset, seed=seed, verify=verify,
                                      memory_limit_gib=memory_limit_gib, log=log, quant=quant,
                                      block_size=block_size)  # fmt: skip
                else:
                    _export_in_memory(model, stage, random_weights=random_weights, dtype=chosen, opset=opset,
                                      seed=seed, verify=verify, quant=quant, block_size=block_size, log=log)  # fmt: skip
                stage.commit()
            log(f"wrote {out} in {time.perf_counter() - t_start:.1f} s")
    except ExportInterrupted:
        raise
    except KeyboardInterrupt as e:
        where = stage.on_disk() if stage is not None else f"nothing was written to {out}"
        raise ExportInterrupted(f"interrupted; {where}") from e
    return out


def _fetch_if_missing(model, out: Path, *, force: bool, download_dir, log: Callable[[str], None]):
    """`model`, or the folder models.download found or downloaded it into; --out is checked before any download."""
    from models.download import DownloadError, ensure_checkpoint

    keep = model_folders(model) + ([Path(download_dir)] if download_dir is not None else [])
    check_out(out, force=force, keep=keep)
    try:
        return ensure_checkpoint(model, download_dir=download_dir, log=log)
    except DownloadError as e:
        raise ExportError(str(e)) from None
    except KeyboardInterrupt as e:
        raise ExportInterrupted(
            f"interrupted while downloading {os.fspath(model)}; nothing was written to {out}; the files already "
            "downloaded are kept and the next run fetches the rest"
        ) from e


ROUTE_WHY = {
    "in-memory": "the model is loaded and exported as it is",
    "streaming": "too large to build in memory here: meta-device graphs, seeded weights streamed to disk",
}


def _first_line(log: Callable[[str], None], header: str) -> Callable[[str], None]:
    """`log` that prints `header` before its first line, so bad input stays a one-line error."""
    pending = [header]

    def say(msg: str) -> None:
        while pending:
            log(pending.pop())
        log(msg)

    return say


def _export_in_memory(model, stage: Staging, *, random_weights, dtype, opset, seed, verify, quant, block_size, log):
    """Load the model, write the bundle into `stage.path`, verify it against PyTorch, quantise it if asked."""
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
            kept = stage.keep_as(stage.out.with_name(stage.out.name + ".unverified"))
            log(f"verification failed; the bundle is kept at {kept} for inspection, {stage.out} is unchanged")
            raise
        log(f"verified against PyTorch in {time.perf_counter() - t0:.1f} s")
    if quant != "none":
        from export.quantize import quantize_bundle

        quantize_bundle(stage.path, quant, block_size, log=log)


def _export_streaming(model, stage: Staging, *, dtype, opset, seed, verify, memory_limit_gib, log, quant="none",
                      block_size=DEFAULT_BLOCK_SIZE):
    """Write a seeded random-weight bundle from the meta device into `stage.path` (its decoder quantized while
    written when `quant` asks); check it if asked."""
    from export.stream import write_streaming

    write_streaming(
        stage.path, model, dtype, opset, seed, memory_limit_gib=memory_limit_gib, log=log, on_abort=stage.discard,
        quant=quant, block_size=block_size,
    )
    if verify:  # torch cannot hold the model on this machine: structural checks + one vision run
        from export.check import check_bundle

        check_bundle(stage.path, log=log)


def model_folders(model: str | os.PathLike) -> list[Path]:
    """The folders `--model` names on disk (its path, or the checkpoint a registry name resolves to): an --out
    that is or holds one of them is refused."""
    from models.load import CheckpointError, resolve_checkpoint

    text = os.fspath(model)
    found = []
    path = Path(text).expanduser()
    if path.exists():
        found.append(path)
    try:
        found.append(resolve_checkpoint(text))
    except CheckpointError:
        pass
    return found
