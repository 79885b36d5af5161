"""The streaming route: random-weight bundles of 7B-class models on a 24 GiB machine, weights written tensor by tensor.

    from export.stream import export_streaming
    export_streaming("llava-next-7b", "artifacts/llava-next-7b-random", dtype="fp16", seed=0)   # -> Path

`python -m export --random-weights` takes this route by itself when the model's float32 weights exceed a third
of the machine's RAM. A 7B LLaVA-NeXT is ~14 GB of fp16 weights; `from_config` would first build it in fp32
(28 GB) and the exporter can hold copies of its initialisers. This route never materialises the model:

 1. build    the model on the meta device (export.meta.meta_model), buffers' real values kept aside
 2. trace    each graph with data-less initialisers (export.meta.trace_graph)
 3. write    each initialiser's seeded values (export.meta.RandomWeights) into one `<graph>.onnx.data` per graph,
             sha256 computed while writing (`write_graph`); embed_tokens.npy and image_newline.npy the same way
 4. bundle   tokenizer.json and manifest.json (export.bundle) in a staging folder moved into place at the end

A watchdog (export.watchdog) aborts the export with a clear message once resident memory passes
`memory_limit_gib`. The same seed gives byte-identical files, whatever the order of writing.

Per-tensor hook: `write_graph(..., transform=f)` calls `f(spec, values)` on every weight after its values are
drawn and before they are written; the array it returns is written as the initialiser (its dtype and shape
become the initialiser's), so a per-tensor conversion (e.g. quantisation) plugs in there.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.bundle import (
    build_manifest,
    describe_tokenizer,
    export_info,
    human_size,
    read_processor_config,
    write_tokenizer,
)
from export.defaults import (
    BUNDLE_DTYPES,
    DEFAULT_MEMORY_LIMIT_GIB,
    DEFAULT_OPSET,
    DEFAULT_SEED,
    default_dtype,
)
from export.errors import ExportError
from export.meta import (
    RandomWeights,
    Weights,
    WeightSpec,
    checked,
    meta_model,
    model_config,
    param_inits,
    trace_graph,
)
from export.quiet import quiet_export, stderr_log
from export.spec import DATA_SUFFIX, GRAPH_FILES, OTHER_FILES
from export.staging import Staging
from export.watchdog import MemoryWatchdog
from runtime.manifest import MANIFEST_NAME, Manifest, ModelInfo, sha256_file

ALIGNMENT = 4096  # external-data offsets of tensors >= ALIGN_THRESHOLD are page aligned (mmap-friendly)
ALIGN_THRESHOLD = 1 << 20
AS_TORCH = {"fp32": torch.float32, "fp16": torch.float16}
AS_NUMPY = {"fp32": np.float32, "fp16": np.float16}
ROUTE = "streaming: meta-device graphs, weights streamed to external data"

Log = Callable[[str], None]
Transform = Callable[[WeightSpec, np.ndarray], np.ndarray]  # per-tensor hook: (spec, values) -> values to write


# ---------------------------------------------------------------------------------------------- writing
class HashingWriter:
    """A binary file written sequentially while its sha256 is computed."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "wb")  # noqa: SIM115 (closed in close())
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        self._file.write(view)
        self._hash.update(view)
        self.size += view.nbytes

    def pad_to(self, alignment: int) -> None:
        gap = (-self.size) % alignment
        if gap:
            self.write(bytes(gap))

    def close(self) -> str:
        """Close the file; return its sha256."""
        self._file.close()
        return self._hash.hexdigest()


def write_graph(
    onnx_model,
    specs: list[tuple[Any, WeightSpec]],
    folder: Path,
    graph: str,
    weights: Weights,
    *,
    transform: Transform | None = None,
) -> dict[str, str]:
    """Stream every pending initialiser into `<graph>.onnx.data`, then save `<graph>.onnx` referencing it.

    transform: the per-tensor hook, `transform(spec, values) -> array to write` (its dtype and shape become the
               initialiser's); None writes the values as drawn.
    Returns {logical file name: sha256} for the graph and its data file.
    """
    import onnx_ir as ir

    onnx_name = GRAPH_FILES[graph]
    data_name = onnx_name + DATA_SUFFIX
    writer = HashingWriter(folder / data_name)
    try:
        for value, spec in specs:
            values = checked(weights(spec), spec)
            if transform is not None:
                values = np.ascontiguousarray(transform(spec, values))
            dtype = ir.DataType.from_numpy(values.dtype)
            if values.nbytes >= ALIGN_THRESHOLD:
                writer.pad_to(ALIGNMENT)
            offset = writer.size
            writer.write(values.reshape(-1).view(np.uint8))
            if values.shape != spec.shape or dtype != value.dtype:
                value.shape, value.dtype = ir.Shape(values.shape), dtype
            value.const_value = ir.ExternalTensor(
                data_name, offset, values.nbytes, dtype, shape=ir.Shape(values.shape), name=value.name, base_dir=folder
            )
            del values
    finally:
        data_sha = writer.close()
    ir.save(onnx_model, folder / onnx_name)
    return {graph: sha256_file(folder / onnx_name), f"{graph}_data": data_sha}


def write_npy(path: Path, spec: WeightSpec, weights: Weights) -> str:
    """`spec`'s values as a .npy file (format 1.0, C order), hashed while written; returns the sha256.

    One tensor is in memory at a time (the embedding table: 263 MB in fp16 for a 32064 x 4096 vocabulary).
    """
    values = checked(weights(spec), spec)
    head = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(values.dtype), "fortran_order": False, "shape": values.shape}
    np.lib.format.write_array_header_1_0(head, header)
    writer = HashingWriter(path)
    try:
        writer.write(head.getvalue())
        writer.write(values.reshape(-1).view(np.uint8))
    finally:
        sha = writer.close()
    return sha


def write_traced(
    onnx_model,
    specs: list[tuple[Any, WeightSpec]],
    folder: Path,
    graph: str,
    weights: Weights,
    text_config,
    transform: Transform | None = None,
    quant: str = "none",
    block_size: int = 32,
) -> dict[str, str]:
    """`write_graph` of one traced graph, plus the decoder's own steps: {logical: sha256} of the files as saved.

    The decoder's linear weights are quantized one by one as they are written (`quant` "int8"/"int4",
    export.quantize.plan_streaming), then its saved graph gets the attention rewrite of the in-memory route
    (export.decoder.rewrite_attention: GroupQueryAttention on a shared KV buffer, rotary inside it, q/k/v packed
    into one projection whose weight is the byte range the three were written to, back to back; the data file
    is not rewritten, only appended to: float32 graphs' rotary caches) and is re-hashed.
    """
    hook = transform
    if graph == "decoder" and quant != "none":
        from export.quantize import plan_streaming

        specs, hook = plan_streaming(onnx_model, specs, quant, block_size)
    sha256 = write_graph(onnx_model, specs, folder, graph, weights, transform=hook)
    if graph == "decoder":
        from export.decoder import rewrite_attention

        data = folder / (GRAPH_FILES[graph] + DATA_SUFFIX)
        size = data.stat().st_size
        rewrite_attention(folder / GRAPH_FILES[graph], text_config)
        sha256[graph] = sha256_file(folder / GRAPH_FILES[graph])
        if data.stat().st_size != size:  # the rotary caches were appended to it
            sha256[f"{graph}_data"] = sha256_file(data)
    return sha256


# ---------------------------------------------------------------------------------------------- the route
def _tokenizer(folder: Path | None):
    """(tokenizer object or None, checkpoint folder to copy tokenizer.json from or None, tokenizer kind)."""
    from models import registry
    from models.tokenizer import build_offline_tokenizer

    if folder is not None and (folder / "tokenizer.json").is_file():
        return None, folder, registry.TOKENIZER_CHECKPOINT
    return build_offline_tokenizer(), None, registry.TOKENIZER_OFFLINE_MISTRAL


def _prompt(entry, folder: Path | None) -> tuple[str, bool]:
    from models.load import load_prompt

    if folder is not None:
        return load_prompt(folder)
    if entry is None:
        raise ExportError("no prompt template: the model is neither a registry entry nor a checkpoint folder")
    return entry.prompt_template, entry.add_bos


def export_streaming(
    name: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str | None = None,
    opset: int = DEFAULT_OPSET,
    seed: int = DEFAULT_SEED,
    *,
    force: bool = False,
    memory_limit_gib: float = DEFAULT_MEMORY_LIMIT_GIB,
    transform: Transform | None = None,
    log: Log | None = stderr_log,
) -> Path:
    """Write the bundle of registry model (or config folder) `name` with seeded random weights to `out`.

    dtype:     "fp16" (None: the streaming route's default) or "fp32"; scores and logits stay float32
    seed:      the random weights' seed (RandomWeights)
    transform: the per-tensor hook of `write_graph`
    Raises ExportError for bad input; exits the process (code 3) when memory passes `memory_limit_gib`.
    """
    say = log or (lambda _msg: None)
    t_start = time.perf_counter()
    with quiet_export(), Staging(out, force=force) as stage:
        files, peak = write_streaming(
            stage.path, name, dtype, opset, seed, memory_limit_gib=memory_limit_gib, transform=transform,
            log=log, on_abort=stage.discard,
        )  # fmt: skip
        stage.commit()
    total = sum((Path(out) / f).stat().st_size for f in files.values())
    say(
        f"wrote {out}: {len(files)} files, {human_size(total)} in {time.perf_counter() - t_start:.1f} s; "
        f"peak resident memory {peak / 2**30:.2f} GiB"
    )
    return Path(out)


def write_streaming(
    folder: Path,
    name: str | os.PathLike,
    dtype: str | None = None,
    opset: int = DEFAULT_OPSET,
    seed: int = DEFAULT_SEED,
    *,
    memory_limit_gib: float = DEFAULT_MEMORY_LIMIT_GIB,
    transform: Transform | None = None,
    log: Log | None = stderr_log,
    on_abort: Callable[[], None] | None = None,
    quant: str = "none",
    block_size: int = 32,
) -> tuple[dict[str, str], int]:
    """The streaming route's files, written into the empty (staging) `folder`: ({logical: file}, peak RSS bytes).

    `on_abort` runs when the memory watchdog ends the process (e.g. deleting the staging folder).
    `quant` "int8"/"int4": the decoder's linear weights are quantized one by one as they are written
    (export.quantize.plan_streaming), so the float decoder is never held.
    """
    say = log or (lambda _msg: None)
    dtype = default_dtype("streaming") if dtype is None else dtype
    if dtype not in BUNDLE_DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(BUNDLE_DTYPES)}, got {dtype!r}")
    fill = RandomWeights(seed)
    config, entry, source = model_config(name)
    label = entry.name if entry is not None else Path(os.fspath(name)).name
    t_start = time.perf_counter()
    times: dict[str, float] = {}
    with MemoryWatchdog(int(memory_limit_gib * 2**30), on_abort=on_abort) as watchdog:
        watchdog.stage = "build"
        t0 = time.perf_counter()
        model, buffers = meta_model(config, AS_TORCH[dtype])
        n_params = sum(p.numel() for p in model.parameters())
        times["build"] = round(time.perf_counter() - t0, 2)
        say(f"{label}: {n_params / 1e9:.2f} B parameters on the meta device ({dtype}) in {times['build']:.1f} s")

        sha256: dict[str, str] = {}
        files: dict[str, str] = {}
        for graph in ("vision", "projector", "decoder"):
            watchdog.stage = f"trace {graph}"
            t0 = time.perf_counter()
            onnx_model, specs = trace_graph(model, graph, buffers, opset)
            t1 = time.perf_counter()
            watchdog.stage = f"write {graph}"
            sha256.update(
                write_traced(onnx_model, specs, folder, graph, fill, config.text_config, transform, quant, block_size)
            )
            del onnx_model, specs
            files[graph] = GRAPH_FILES[graph]
            files[f"{graph}_data"] = GRAPH_FILES[graph] + DATA_SUFFIX
            times[f"trace_{graph}"] = round(t1 - t0, 2)
            times[f"write_{graph}"] = round(time.perf_counter() - t1, 2)
            size = sum((folder / f).stat().st_size for f in (files[graph], files[f"{graph}_data"]))
            say(
                f"{GRAPH_FILES[graph]} + {DATA_SUFFIX}: {human_size(size)}; traced in {times[f'trace_{graph}']:.1f} s, "
                f"weights streamed in {times[f'write_{graph}']:.1f} s; peak RSS so far {watchdog.peak / 2**30:.2f} GiB"
            )

        watchdog.stage = "embeddings"
        t0 = time.perf_counter()
        inits = param_inits(model)
        newline = getattr(model.model, "image_newline", None)
        if newline is None:  # LLaVA-1.5: no newline embedding and no newline slot; zeros keep the bundle's files
            zeros = np.zeros(int(config.text_config.hidden_size), dtype=AS_NUMPY[dtype])
            np.save(folder / OTHER_FILES["image_newline"], zeros, allow_pickle=False)
            sha256["image_newline"] = sha256_file(folder / OTHER_FILES["image_newline"])
            files["image_newline"] = OTHER_FILES["image_newline"]
        for logical, param in (("embed_tokens", model.get_input_embeddings().weight), ("image_newline", newline)):
            if param is None:
                continue
            init = inits[id(param)]
            spec = WeightSpec(init.name, tuple(param.shape), np.dtype(AS_NUMPY[dtype]), init.kind, init.std)
            sha256[logical] = write_npy(folder / OTHER_FILES[logical], spec, fill)
            files[logical] = OTHER_FILES[logical]
        times["embeddings"] = round(time.perf_counter() - t0, 2)

        watchdog.stage = "tokenizer and manifest"
        tokenizer, tok_folder, tok_kind = _tokenizer(source)
        tokenizer_json = write_tokenizer(tokenizer, tok_folder, folder)
        files["tokenizer"] = tokenizer_json.name
        sha256["tokenizer"] = sha256_file(tokenizer_json)
        template, add_bos = _prompt(entry, source)
        info = ModelInfo(
            name=label,
            source=f"random weights (seed {seed}, streamed from the meta device) with the config of {label}",
            dtype=dtype,
            random_weights=True,
            tokenizer=describe_tokenizer(tok_kind),
        )
        times["total"] = round(time.perf_counter() - t_start, 2)
        extra = export_info(opset, times)
        extra.update(
            route=ROUTE,
            seed=seed,
            peak_rss_bytes=int(watchdog.peak),
            init="normal(0, initializer_range) weights, ones for norm weights, zeros for biases; "
            "per-tensor generator seeded by (seed, crc32(name))",
        )
        manifest = build_manifest(
            config=config,
            model_info=info,
            processor=read_processor_config(source),
            prompt_template=template,
            add_bos=add_bos,
            files=files,
            sha256=sha256,
            tokenizer_json=tokenizer_json,
            export_info=extra,
        )
        if quant != "none":
            from export.quantize import with_quant

            manifest = with_quant(manifest, quant, block_size)
        manifest.to_file(folder / MANIFEST_NAME)
        Manifest.from_file(folder, verify=False)  # keys and types; the hashes were computed while writing
    return files, watchdog.peak
