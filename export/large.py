"""Random-weight bundles of 7B-class models on a 24 GiB machine: meta-device graphs, streamed initialisers.

    from export.large import export_large
    export_large("llava-next-7b", "artifacts/llava-next-7b-random", dtype="fp16")       # -> Path
    python -m export.large --model llava-next-7b --out artifacts/llava-next-7b-random --dtype fp16 [--check]
    check_bundle("artifacts/llava-next-7b-random")     # onnx.checker, hashes, graph I/O, 1 crop in onnxruntime

A 7B LLaVA-NeXT is ~14 GB of fp16 weights; `from_config` would first build it in fp32 (28 GB) and the exporter
can hold copies of its initialisers. This route never materialises the model:

 1. build    the model with every parameter on the meta device (buffers such as rotary inv_freq and CLIP
             position_ids are computed for real on the CPU and kept aside), then move it wholly to meta
 2. trace    the very wrappers export/ uses (VisionWrapper, ProjectorWrapper, DecoderWrapper) with meta example
             inputs through torch.onnx.export(dynamo=True, optimize=False); every parameter becomes an
             initialiser without data, buffers get their real values, then the onnxscript optimiser runs
             (constant folding never touches the data-less weights)
 3. stream   each initialiser's values are drawn (seeded, per tensor: normal(0, initializer_range) for weights,
             ones for norm weights, zeros for biases) or taken from a given state dict, written into one
             `<graph>.onnx.data` per graph and hashed (sha256) as they are written; the graph then references
             them as ONNX external data. embed_tokens.npy and image_newline.npy are streamed the same way
 4. bundle   tokenizer.json and manifest.json through export/bundle.py, in a staging folder moved into place
             at the end (an abort leaves the old bundle or none)

A watchdog thread samples resident memory and aborts the export with a clear message once it passes
`memory_limit_gib` (default 20 GiB). The values of a tensor depend only on (seed, tensor name), so the same
seed gives byte-identical files, whatever the order of writing.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import logging
import os
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.bundle import (
    DTYPES,
    Staging,
    build_manifest,
    describe_tokenizer,
    human_size,
    read_processor_config,
    write_tokenizer,
)
from export.errors import ExportError
from export.spec import GRAPH_FILES, OTHER_FILES
from runtime.manifest import MANIFEST_NAME, Manifest, ModelInfo, sha256_file

DEFAULT_MEMORY_LIMIT_GIB = 20.0
ALIGNMENT = 4096  # external-data offsets of tensors >= ALIGN_THRESHOLD are page aligned (mmap-friendly)
ALIGN_THRESHOLD = 1 << 20
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
EMBED_NAME = "model.language_model.embed_tokens.weight"
NEWLINE_NAME = "model.image_newline"


def stderr_log(msg: str) -> None:
    print(f"[export.large] {msg}", file=sys.stderr, flush=True)


Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    """Resident set size of this process."""
    import psutil

    return int(psutil.Process().memory_info().rss)


class MemoryWatchdog:
    """Samples this process's resident memory every `interval` s; past `limit_bytes` it calls `on_abort`,
    prints why and ends the process (exit code 3), since no Python exception can interrupt a long C call.

    `.peak` is the highest sample; `.stage` names the current step for the message.
    """

    def __init__(
        self, limit_bytes: int, *, on_abort: Callable[[], None] | None = None, interval: float = 0.2
    ):
        self.limit = int(limit_bytes)
        self.on_abort = on_abort
        self.interval = interval
        self.peak = rss_bytes()
        self.stage = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="memory-watchdog", daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            rss = rss_bytes()
            self.peak = max(self.peak, rss)
            if rss > self.limit:
                self._abort(rss)

    def _abort(self, rss: int) -> None:
        print(
            f"[export.large] error: resident memory {rss / 2**30:.1f} GiB passed the "
            f"{self.limit / 2**30:.1f} GiB limit during '{self.stage}'; aborted, nothing was written. "
            "Free memory (close other programs) or raise memory_limit_gib if the machine has more RAM.",
            file=sys.stderr,
            flush=True,
        )
        if self.on_abort is not None:
            with contextlib.suppress(Exception):
                self.on_abort()
        os._exit(3)

    def __enter__(self) -> MemoryWatchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


# ---------------------------------------------------------------------------------------------- meta model
@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Within this block every nn.Parameter is created on the meta device; buffers stay real (CPU)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def meta_model(config, dtype: torch.dtype) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(LlavaNextForConditionalGeneration wholly on meta in `dtype`, {buffer name: real CPU value}).

    Buffers (rotary inv_freq, CLIP position_ids) are computed by the modules' own constructors on the CPU,
    kept aside, then the model moves to meta so export sees one device.
    """
    from transformers import LlavaNextForConditionalGeneration

    with params_on_meta():
        model = LlavaNextForConditionalGeneration._from_config(config, dtype=dtype)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    return model.to("meta").eval(), buffers


@dataclass(frozen=True)
class TensorSpec:
    """One weight to write: its model-wide name (the seed key), shape, numpy dtype and how to initialise it."""

    name: str  # parameter name in the whole LlavaNextForConditionalGeneration (tied ones: the first name)
    shape: tuple[int, ...]
    dtype: np.dtype
    kind: str  # "normal" | "ones" | "zeros"
    std: float


def init_kind(module: nn.Module, param_name: str) -> str:
    """'zeros' for biases, 'ones' for LayerNorm/RMSNorm weights, else 'normal'."""
    if param_name == "bias":
        return "zeros"
    if param_name == "weight" and (
        isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
    ):
        return "ones"
    return "normal"


def param_specs(model: nn.Module) -> dict[int, tuple[str, str, float]]:
    """id(parameter) -> (model-wide name, init kind, std); std = the part's config initializer_range."""
    cfg = model.config
    vision_std = float(getattr(cfg.vision_config, "initializer_range", 0.02))
    text_std = float(getattr(cfg.text_config, "initializer_range", 0.02))
    out: dict[int, tuple[str, str, float]] = {}
    for module_name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in out:
                continue  # tied: keep the first name, so both uses get the same values
            full = f"{module_name}.{pname}" if module_name else pname
            std = vision_std if full.startswith("model.vision_tower.") else text_std
            out[id(param)] = (full, init_kind(module, pname), std)
    return out


# ---------------------------------------------------------------------------------------------- weights
class RandomWeights:
    """Seeded random values per tensor name: normal(0, std) weights, ones for norms, zeros for biases.

    The generator is seeded by (seed, crc32(name)), so a tensor's values do not depend on writing order.
    """

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def __call__(self, spec: TensorSpec) -> np.ndarray:
        if spec.kind == "zeros":
            return np.zeros(spec.shape, dtype=spec.dtype)
        if spec.kind == "ones":
            return np.ones(spec.shape, dtype=spec.dtype)
        rng = np.random.default_rng([self.seed, zlib.crc32(spec.name.encode("utf-8"))])
        values = rng.standard_normal(spec.shape, dtype=np.float32)
        values *= np.float32(spec.std)
        return values.astype(spec.dtype, copy=False)


class StateDictWeights:
    """The real values of a loaded model (by model-wide name), cast to each tensor's dtype: for tests."""

    def __init__(self, model: nn.Module):
        self.tensors = {name: p.detach() for name, p in model.named_parameters(remove_duplicate=False)}

    def __call__(self, spec: TensorSpec) -> np.ndarray:
        if spec.name not in self.tensors:
            raise ExportError(f"the state dict has no tensor {spec.name!r}")
        return self.tensors[spec.name].float().cpu().numpy().astype(spec.dtype)


Weights = Callable[[TensorSpec], np.ndarray]


def materialize(
    config, weights: Weights, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> nn.Module:
    """A real LlavaNextForConditionalGeneration on `device` whose parameters are `weights`' values.

    With RandomWeights(seed) this is the torch twin of an export_large bundle of the same seed (for verification
    and the torch reference); it allocates only the model itself, in `dtype`, never an fp32 copy.
    """
    model, buffers = meta_model(config, dtype)
    model = model.to_empty(device=device)
    model.tie_weights()  # to_empty gives each module its own tensor; re-tie shared ones (if the config ties any)
    np_dtype = np.dtype(torch.empty((), dtype=dtype).numpy().dtype)
    params = {id(p): p for p in model.parameters()}
    with torch.no_grad():
        for name, value in buffers.items():
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, value.to(device))  # keeps the buffer's persistence
        for pid, (full, kind, std) in param_specs(model).items():
            param = params[pid]
            spec = TensorSpec(full, tuple(param.shape), np_dtype, kind, std)
            param.copy_(torch.from_numpy(_checked(weights(spec), spec)).to(device))
    return model.eval()


# ---------------------------------------------------------------------------------------------- graphs
class _Traced(BaseException):
    """Raised by the intercepted torch.onnx.export once it has traced a graph (so nothing is saved)."""

    def __init__(self, module: nn.Module, program):
        super().__init__("traced")
        self.module = module
        self.program = program


@contextlib.contextmanager
def _trace_only() -> Iterator[None]:
    """Within this block torch.onnx.export traces with meta example inputs and optimize=False, then raises _Traced.

    This lets export_vision / export_projector / export_decoder (export/) build their wrappers, example inputs,
    names and dynamic shapes exactly as for a real model, without this module repeating any of it.
    """
    real = torch.onnx.export

    def trace(model, args=(), f=None, **kwargs):
        kwargs["optimize"] = False
        kwargs.pop("f", None)
        meta_args = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
        raise _Traced(model, real(model, meta_args, **kwargs))

    torch.onnx.export = trace
    try:
        yield
    finally:
        torch.onnx.export = real


def _exporters() -> dict[str, Callable]:
    from export.decoder import export_decoder
    from export.projector import export_projector
    from export.vision import export_vision

    return {"vision": export_vision, "projector": export_projector, "decoder": export_decoder}


@contextlib.contextmanager
def _quiet_onnx_logs() -> Iterator[None]:
    """The optimiser warns once per data-less initialiser ('Skipped deduplication ...'); keep stderr readable."""
    loggers = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "onnxscript.optimizer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def trace_graph(
    model: nn.Module, graph: str, buffers: dict[str, torch.Tensor], opset: int
) -> tuple[Any, list[tuple[Any, TensorSpec]]]:
    """Export graph `graph` of the meta `model`: (optimised onnx_ir.Model, [(initialiser value, spec)]).

    Parameter initialisers are left without data (their specs say what to write); buffers get their real values.
    """
    import onnx_ir as ir

    try:
        with torch.no_grad(), _quiet_onnx_logs(), _trace_only():
            _exporters()[graph](model, Path(os.devnull) / GRAPH_FILES[graph], opset=opset)
    except _Traced as traced:
        wrapper, program = traced.module, traced.program
    else:
        raise ExportError(
            f"export/{graph}.py saved a graph without calling torch.onnx.export; export.large cannot trace it"
        )
    specs_by_id = param_specs(model)
    model_buffers = {id(b): name for name, b in model.named_buffers(remove_duplicate=False)}
    by_name: dict[str, tuple[str, Any]] = {}
    for name, p in wrapper.named_parameters(remove_duplicate=False):
        by_name[name] = ("param", specs_by_id[id(p)])
    for name, b in wrapper.named_buffers(remove_duplicate=False):
        by_name[name] = ("buffer", model_buffers[id(b)])

    with torch.no_grad(), _quiet_onnx_logs():
        onnx_model = program.model
        pending: list[tuple[Any, tuple[str, str, float]]] = []
        for value in list(onnx_model.graph.initializers.values()):
            raw = getattr(value.const_value, "raw", None)
            on_meta = isinstance(raw, torch.Tensor) and raw.device.type == "meta"
            kind, what = by_name.get(value.name, (None, None))
            if kind == "buffer":
                value.const_value = ir.tensor(buffers[what].numpy(), name=value.name)
            elif kind == "param":
                value.const_value = None
                pending.append((value, what))
            elif on_meta:
                raise ExportError(
                    f"{graph}: initialiser {value.name!r} is a meta tensor that is neither a parameter nor a buffer "
                    "of the model; export/large.py cannot give it values"
                )
        program.optimize()
    onnx_model = program.model
    alive = {id(v) for v in onnx_model.graph.initializers.values()}
    specs = []
    for value, (full, kind, std) in pending:
        if id(value) not in alive:
            continue  # pruned by the optimiser (e.g. embed_tokens, unused by a decoder fed inputs_embeds)
        shape = tuple(int(d) for d in value.shape)
        specs.append((value, TensorSpec(full, shape, np.dtype(value.dtype.numpy()), kind, std)))
    return onnx_model, specs


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


def _checked(values: np.ndarray, spec: TensorSpec) -> np.ndarray:
    if values.shape != spec.shape or values.dtype != spec.dtype:
        raise ExportError(
            f"weights for {spec.name} have shape {values.shape} {values.dtype}, the graph needs {spec.shape} "
            f"{spec.dtype}"
        )
    return np.ascontiguousarray(values)


def write_graph(
    onnx_model, specs: list[tuple[Any, TensorSpec]], folder: Path, graph: str, weights: Weights
) -> dict[str, str]:
    """Stream every pending initialiser into `<graph>.onnx.data`, then save `<graph>.onnx` referencing it.

    Returns {logical file name: sha256} for the graph and its data file.
    """
    import onnx_ir as ir

    onnx_name = GRAPH_FILES[graph]
    data_name = onnx_name + ".data"
    writer = HashingWriter(folder / data_name)
    try:
        for value, spec in specs:
            values = _checked(weights(spec), spec)
            if values.nbytes >= ALIGN_THRESHOLD:
                writer.pad_to(ALIGNMENT)
            offset = writer.size
            writer.write(values.reshape(-1).view(np.uint8))
            value.const_value = ir.ExternalTensor(
                data_name,
                offset,
                values.nbytes,
                value.dtype,
                shape=ir.Shape(spec.shape),
                name=value.name,
                base_dir=folder,
            )
            del values
    finally:
        data_sha = writer.close()
    ir.save(onnx_model, folder / onnx_name)
    return {graph: sha256_file(folder / onnx_name), f"{graph}_data": data_sha}


def write_npy(path: Path, spec: TensorSpec, weights: Weights) -> str:
    """`spec`'s values as a .npy file (format 1.0, C order), hashed while written; returns the sha256.

    One tensor is in memory at a time (the embedding table: 263 MB in fp16 for a 32064 x 4096 vocabulary).
    """
    values = _checked(weights(spec), spec)
    head = io.BytesIO()
    header = {
        "descr": np.lib.format.dtype_to_descr(values.dtype),
        "fortran_order": False,
        "shape": values.shape,
    }
    np.lib.format.write_array_header_1_0(head, header)
    writer = HashingWriter(path)
    try:
        writer.write(head.getvalue())
        writer.write(values.reshape(-1).view(np.uint8))
    finally:
        sha = writer.close()
    return sha


# ---------------------------------------------------------------------------------------------- the route
def model_config(name: str | os.PathLike):
    """(LlavaNextConfig, registry entry or None, checkpoint folder or None) of a registry name or a folder."""
    from transformers import LlavaNextConfig

    from models import registry
    from models.load import CheckpointError, read_config, resolve_checkpoint

    text = os.fspath(name)
    path = Path(text).expanduser()
    try:
        if text not in registry.names() and path.is_dir():  # a registry name wins over a same-named folder
            config = read_config(path)
            return LlavaNextConfig.from_pretrained(str(path)), registry.match_config(config), path
        entry = registry.get(text)
    except (CheckpointError, ValueError) as e:
        raise ExportError(str(e)) from None
    try:
        folder = resolve_checkpoint(entry.name)
    except CheckpointError:
        folder = None
    return entry.llava_config(), entry, folder


def fp32_bytes(config) -> int:
    """Bytes of the model's parameters in float32 (counted on the meta device)."""
    from transformers import LlavaNextForConditionalGeneration

    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration._from_config(config)
    return 4 * sum(p.numel() for p in model.parameters())


def needs_streaming(config, ram_bytes: int | None = None) -> bool:
    """True when the model's float32 weights exceed a third of this machine's RAM (then use export_large)."""
    if ram_bytes is None:
        import psutil

        ram_bytes = int(psutil.virtual_memory().total)
    return fp32_bytes(config) > ram_bytes // 3


def _tokenizer(folder: Path | None):
    """(tokenizer object or None, checkpoint folder to copy tokenizer.json from or None, kind)."""
    from models.tokenizer import build_offline_tokenizer

    if folder is not None and (folder / "tokenizer.json").is_file():
        return None, folder, "checkpoint"
    return build_offline_tokenizer(), None, "offline-mistral-sp"


def export_large(
    name: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str = "fp16",
    opset: int = 23,
    seed: int = 0,
    *,
    force: bool = False,
    memory_limit_gib: float = DEFAULT_MEMORY_LIMIT_GIB,
    weights: Weights | None = None,
    log: Log | None = stderr_log,
) -> Path:
    """Write the bundle of registry model (or config folder) `name` with seeded random weights to `out`.

    dtype:  "fp16" or "fp32" weights (scores and logits stay float32)
    seed:   the random weights' seed (RandomWeights); `weights` overrides it with any TensorSpec -> array
            function (StateDictWeights(model) exports a loaded model's real weights through this route)
    Raises ExportError for bad input; exits the process (code 3) when memory passes `memory_limit_gib`.
    """
    from export.pipeline import export_info

    say = log or (lambda _msg: None)
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    fill = weights if weights is not None else RandomWeights(seed)
    config, entry, folder = model_config(name)
    label = entry.name if entry is not None else Path(os.fspath(name)).name
    t_start = time.perf_counter()
    times: dict[str, float] = {}
    with Staging(out, force=force) as stage:
        watchdog = MemoryWatchdog(int(memory_limit_gib * 2**30), on_abort=stage.discard)
        with watchdog:
            watchdog.stage = "build"
            t0 = time.perf_counter()
            model, buffers = meta_model(config, TORCH_DTYPES[dtype])
            n_params = sum(p.numel() for p in model.parameters())
            times["build"] = round(time.perf_counter() - t0, 2)
            say(
                f"{label}: {n_params / 1e9:.2f} B parameters on the meta device ({dtype}) in {times['build']:.1f} s"
            )

            sha256: dict[str, str] = {}
            files: dict[str, str] = {}
            for graph in ("vision", "projector", "decoder"):
                watchdog.stage = f"trace {graph}"
                t0 = time.perf_counter()
                onnx_model, specs = trace_graph(model, graph, buffers, opset)
                t1 = time.perf_counter()
                watchdog.stage = f"write {graph}"
                sha256.update(write_graph(onnx_model, specs, stage.path, graph, fill))
                del onnx_model, specs
                files[graph] = GRAPH_FILES[graph]
                files[f"{graph}_data"] = GRAPH_FILES[graph] + ".data"
                times[f"trace_{graph}"] = round(t1 - t0, 2)
                times[f"write_{graph}"] = round(time.perf_counter() - t1, 2)
                size = sum((stage.path / f).stat().st_size for f in (files[graph], files[f"{graph}_data"]))
                say(
                    f"{GRAPH_FILES[graph]} + .data: {human_size(size)}; traced in {times[f'trace_{graph}']:.1f} s, "
                    f"weights streamed in {times[f'write_{graph}']:.1f} s; peak RSS so far "
                    f"{watchdog.peak / 2**30:.2f} GiB"
                )

            watchdog.stage = "embeddings"
            t0 = time.perf_counter()
            specs_by_id = param_specs(model)
            for logical, param in (
                ("embed_tokens", model.get_input_embeddings().weight),
                ("image_newline", model.model.image_newline),
            ):
                full, kind, std = specs_by_id[id(param)]
                spec = TensorSpec(
                    full,
                    tuple(param.shape),
                    np.dtype(np.float16 if dtype == "fp16" else np.float32),
                    kind,
                    std,
                )
                sha256[logical] = write_npy(stage.path / OTHER_FILES[logical], spec, fill)
                files[logical] = OTHER_FILES[logical]
            times["embeddings"] = round(time.perf_counter() - t0, 2)

            watchdog.stage = "tokenizer and manifest"
            tokenizer, tok_folder, tok_kind = _tokenizer(folder)
            tokenizer_json = write_tokenizer(tokenizer, tok_folder, stage.path)
            files["tokenizer"] = tokenizer_json.name
            sha256["tokenizer"] = sha256_file(tokenizer_json)
            template, add_bos = _prompt(entry, folder)
            info = ModelInfo(
                name=label,
                source=f"random weights (seed {seed}, streamed by export.large) with the config of {label}"
                if weights is None
                else f"weights of a loaded model streamed by export.large with the config of {label}",
                dtype=dtype,
                random_weights=weights is None,
                tokenizer=describe_tokenizer(tok_kind),
            )
            times["total"] = round(time.perf_counter() - t_start, 2)
            extra = export_info(opset, times)
            extra.update(
                route="export.large: meta-device graphs, streamed initialisers",
                seed=seed,
                peak_rss_bytes=int(watchdog.peak),
                init="normal(0, initializer_range) weights, ones for norm weights, zeros for biases; "
                "per-tensor generator seeded by (seed, crc32(name))",
            )
            manifest = build_manifest(
                config=config,
                model_info=info,
                processor=read_processor_config(folder),
                prompt_template=template,
                add_bos=add_bos,
                files=files,
                sha256=sha256,
                tokenizer_json=tokenizer_json,
                export_info=extra,
            )
            manifest.to_file(stage.path / MANIFEST_NAME)
            Manifest.from_file(
                stage.path, verify=False
            )  # keys and types; the hashes were computed while writing
        stage.commit()
    total = sum((Path(out) / f).stat().st_size for f in files.values())
    say(
        f"wrote {out}: {len(files)} files, {human_size(total)} in {time.perf_counter() - t_start:.1f} s; "
        f"peak resident memory {watchdog.peak / 2**30:.2f} GiB"
    )
    return Path(out)


# ---------------------------------------------------------------------------------------------- checking
def expected_io(manifest: Manifest) -> dict[str, dict[str, tuple[list, str]]]:
    """graph -> tensor name -> (dims, element type) the runtime expects; str dims are dynamic (any name)."""
    v, t, g = manifest.vision, manifest.text, manifest.graphs
    weights = "float16" if manifest.model.dtype == "fp16" else "float"
    p = v.tokens_per_image
    io = {
        "vision": {
            g["vision"].inputs["pixel_values"]: (["n", 3, v.image_size, v.image_size], weights),
            g["vision"].outputs["features"]: (["n", p, v.hidden_size], weights),
            g["vision"].outputs["early_scores"]: (["n", p], "float"),
            g["vision"].outputs["late_scores"]: (["n", p], "float"),
        },
        "projector": {
            g["projector"].inputs["features"]: (["k", v.hidden_size], weights),
            g["projector"].outputs["projected"]: (["k", t.hidden_size], weights),
        },
        "decoder": {
            g["decoder"].inputs["inputs_embeds"]: (["b", "s", t.hidden_size], weights),
            g["decoder"].inputs["attention_mask"]: (["b", "total"], "int64"),
            g["decoder"].inputs["position_ids"]: (["b", "s"], "int64"),
            g["decoder"].outputs["logits"]: (["b", 1, t.vocab_size], "float"),
        },
    }
    kv = ["b", t.num_kv_heads, "p", t.head_dim]
    for i in range(t.num_layers):
        for key in ("past_key", "past_value"):
            io["decoder"][g["decoder"].inputs[key].format(i=i)] = (kv, weights)
        for key in ("present_key", "present_value"):
            io["decoder"][g["decoder"].outputs[key].format(i=i)] = (kv, weights)
    return io


def graph_io(path: Path) -> dict[str, tuple[list, str]]:
    """name -> (dims, element type name) of a graph's inputs and outputs; dynamic dims as their names."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    out = {}
    for vi in [*graph.input, *graph.output]:
        tt = vi.type.tensor_type
        dims = [d.dim_param if d.dim_param else int(d.dim_value) for d in tt.shape.dim]
        out[vi.name] = (
            dims,
            onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name.replace("float32", "float"),
        )
    return out


def check_bundle(
    folder: str | os.PathLike, *, run_vision: bool = True, log: Log | None = stderr_log
) -> list[str]:
    """Structural checks of a (large) bundle without loading its weights into torch; returns report lines.

    onnx.checker on every graph (by path, so > 2 GB works), Manifest.from_file with the sha256 of every file,
    each graph's input/output names, ranks, static sizes and element types against the manifest, and
    (run_vision) one crop through vision.onnx + its kept tokens through projector.onnx in onnxruntime.
    Raises ExportError on the first mismatch.
    """
    import onnx

    say = log or (lambda _msg: None)
    folder = Path(folder)
    lines: list[str] = []

    def note(line: str) -> None:
        lines.append(line)
        say(line)

    t0 = time.perf_counter()
    manifest = Manifest.from_file(folder)
    note(f"manifest: {len(manifest.files)} files, sha256 all match ({time.perf_counter() - t0:.1f} s)")
    for graph, wanted in expected_io(manifest).items():
        path = manifest.path(graph)
        t0 = time.perf_counter()
        onnx.checker.check_model(str(path))
        got = graph_io(path)
        for name, (dims, elem) in wanted.items():
            if name not in got:
                raise ExportError(f"{path.name} has no input/output {name!r}; re-export the bundle")
            gdims, gelem = got[name]
            same = len(gdims) == len(dims) and all(
                isinstance(w, str) and isinstance(h, str) or w == h for w, h in zip(dims, gdims, strict=True)
            )
            if not same or gelem != elem:
                raise ExportError(
                    f"{path.name}: {name} is {gdims} {gelem}, expected {dims} {elem}; re-export"
                )
        note(
            f"{path.name}: onnx.checker ok, {len(wanted)} inputs/outputs as the manifest says "
            f"({time.perf_counter() - t0:.1f} s)"
        )
    if run_vision:
        import onnxruntime as ort

        v, g = manifest.vision, manifest.graphs
        np_dtype = np.float16 if manifest.model.dtype == "fp16" else np.float32
        t0 = time.perf_counter()
        session = ort.InferenceSession(str(manifest.path("vision")), providers=["CPUExecutionProvider"])
        t1 = time.perf_counter()
        pixels = np.random.default_rng(0).standard_normal((1, 3, v.image_size, v.image_size)).astype(np_dtype)
        feats, early, late = session.run(
            [g["vision"].outputs[k] for k in ("features", "early_scores", "late_scores")],
            {g["vision"].inputs["pixel_values"]: pixels},
        )
        t2 = time.perf_counter()
        del session
        heads = v.heads
        for label, s in (("early", early), ("late", late)):
            if (
                s.shape != (1, v.tokens_per_image)
                or not np.isfinite(s).all()
                or s.min() < 0
                or s.sum() > heads
            ):
                raise ExportError(
                    f"vision.onnx {label} scores are not a CLS attention row ({s.shape}, sum {s.sum()})"
                )
        if feats.shape != (1, v.tokens_per_image, v.hidden_size) or not np.isfinite(feats).all():
            raise ExportError(f"vision.onnx features have shape {feats.shape} or non-finite values")
        projector = ort.InferenceSession(str(manifest.path("projector")), providers=["CPUExecutionProvider"])
        (projected,) = projector.run(
            [g["projector"].outputs["projected"]], {g["projector"].inputs["features"]: feats[0, :115]}
        )
        if projected.shape != (115, manifest.text.hidden_size) or not np.isfinite(projected).all():
            raise ExportError(f"projector.onnx gave shape {projected.shape} or non-finite values")
        note(
            f"onnxruntime CPU: vision.onnx loaded in {t1 - t0:.1f} s, 1 crop in {t2 - t1:.1f} s "
            f"(scores sum {early.sum():.3f} / {late.sum():.3f} of {heads} heads); projector on 115 tokens "
            f"-> {projected.shape}; peak RSS {rss_bytes() / 2**30:.2f} GiB"
        )
    return lines


def _prompt(entry, folder: Path | None) -> tuple[str, bool]:
    from models.load import load_prompt

    if folder is not None:
        return load_prompt(folder)
    if entry is None:
        raise ExportError("no prompt template: the model is neither a registry entry nor a checkpoint folder")
    return entry.prompt_template, entry.add_bos


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m export.large",
        description="Random-weight bundle of a large (7B+) LLaVA-NeXT without holding its weights in memory.",
    )
    p.add_argument("--model", required=True, help="registry name (llava-next-7b, ...) or a checkpoint folder")
    p.add_argument("--out", required=True, help="bundle folder, e.g. artifacts/llava-next-7b-random")
    p.add_argument("--dtype", choices=DTYPES, default="fp16", help="weight dtype (default fp16)")
    p.add_argument("--opset", type=int, default=23, help="ONNX opset (default 23)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--memory-limit-gib",
        type=float,
        default=DEFAULT_MEMORY_LIMIT_GIB,
        help=f"abort when resident memory passes this (default {DEFAULT_MEMORY_LIMIT_GIB:g})",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="then check the bundle: onnx.checker, manifest hashes, graph inputs/outputs, 1 crop in onnxruntime",
    )
    args = p.parse_args(argv)
    try:
        out = export_large(
            args.model,
            args.out,
            dtype=args.dtype,
            opset=args.opset,
            seed=args.seed,
            force=args.force,
            memory_limit_gib=args.memory_limit_gib,
        )
        if args.check:
            check_bundle(out)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
