"""Models too large for RAM, on the meta device: build, name every weight, trace the graphs without data.

    from export.meta import meta_model, param_inits, trace_graph, RandomWeights, torch_twin, needs_streaming
    model, buffers = meta_model(config, torch.float16)     # parameters on meta, buffers' real values aside
    onnx_model, pending = trace_graph(model, "decoder", buffers, opset=23)  # initialisers without data
    twin = torch_twin(config, RandomWeights(seed=0))       # a real model holding the same seeded weights
    needs_streaming(config)                                # True when float32 weights > RAM / 3

`trace_graph` runs the very wrappers export/ uses (export_vision, export_projector, export_decoder) with meta
example inputs through torch.onnx.export(dynamo=True, optimize=False): every parameter becomes an initialiser
without data (a WeightSpec says what to write), buffers (rotary inv_freq, CLIP position_ids) get their real
values, then the onnxscript optimiser runs (constant folding never touches the data-less weights).
`export.stream` writes the values. A weight's values depend only on (seed, its model-wide name).
"""

from __future__ import annotations

import contextlib
import logging
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from export.errors import ExportError
from export.spec import GRAPH_FILES


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
    from models.arch import model_for

    with params_on_meta():
        model = model_for(config)._from_config(config, dtype=dtype)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    return model.to("meta").eval(), buffers


class ParamInit(NamedTuple):
    """How one parameter is initialised: its model-wide name (the seed key), kind and std."""

    name: str  # name in the whole LlavaNextForConditionalGeneration (tied ones: the first name)
    kind: str  # "normal" | "ones" | "zeros"
    std: float  # the part's config initializer_range


@dataclass(frozen=True)
class WeightSpec:
    """One weight to write: its model-wide name (the seed key), shape, numpy dtype and how to initialise it."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    kind: str  # "normal" | "ones" | "zeros"
    std: float


Weights = Callable[[WeightSpec], np.ndarray]  # the values of one weight, in its spec's shape and dtype


def init_kind(module: nn.Module, param_name: str) -> str:
    """'zeros' for biases, 'ones' for LayerNorm/RMSNorm weights, else 'normal'."""
    if param_name == "bias":
        return "zeros"
    if param_name == "weight" and (isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")):
        return "ones"
    return "normal"


def param_inits(model: nn.Module) -> dict[int, ParamInit]:
    """id(parameter) -> ParamInit(model-wide name, init kind, std); std = the part's config initializer_range."""
    cfg = model.config
    vision_std = float(getattr(cfg.vision_config, "initializer_range", 0.02))
    text_std = float(getattr(cfg.text_config, "initializer_range", 0.02))
    out: dict[int, ParamInit] = {}
    for module_name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in out:
                continue  # tied: keep the first name, so both uses get the same values
            full = f"{module_name}.{pname}" if module_name else pname
            std = vision_std if full.startswith("model.vision_tower.") else text_std
            out[id(param)] = ParamInit(full, init_kind(module, pname), std)
    return out


class RandomWeights:
    """Seeded random values per weight name: normal(0, std) weights, ones for norms, zeros for biases.

    The generator is seeded by (seed, crc32(name)), so a weight's values do not depend on writing order.
    """

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def __call__(self, spec: WeightSpec) -> np.ndarray:
        if spec.kind == "zeros":
            return np.zeros(spec.shape, dtype=spec.dtype)
        if spec.kind == "ones":
            return np.ones(spec.shape, dtype=spec.dtype)
        rng = np.random.default_rng([self.seed, zlib.crc32(spec.name.encode("utf-8"))])
        values = rng.standard_normal(spec.shape, dtype=np.float32)
        values *= np.float32(spec.std)
        return values.astype(spec.dtype, copy=False)


def checked(values: np.ndarray, spec: WeightSpec) -> np.ndarray:
    """`values` as a C-contiguous array; ExportError unless its shape and dtype are the spec's."""
    if values.shape != spec.shape or values.dtype != spec.dtype:
        raise ExportError(
            f"weights for {spec.name} have shape {values.shape} {values.dtype}, the graph needs {spec.shape} "
            f"{spec.dtype}"
        )
    return np.ascontiguousarray(values)


def torch_twin(
    config, weights: Weights, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> nn.Module:
    """A real LlavaNextForConditionalGeneration on `device` whose parameters are `weights`' values.

    With RandomWeights(seed) this is the torch twin of a streamed bundle of the same seed (for verification
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
        for pid, init in param_inits(model).items():
            param = params[pid]
            spec = WeightSpec(init.name, tuple(param.shape), np_dtype, init.kind, init.std)
            param.copy_(torch.from_numpy(checked(weights(spec), spec)).to(device))
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

    This lets export_vision / export_projector / export_decoder build their wrappers, example inputs,
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


def _graph_writers() -> dict[str, Callable]:
    from export.decoder import export_decoder
    from export.projector import export_projector
    from export.vision import export_vision

    return {"vision": export_vision, "projector": export_projector, "decoder": export_decoder}


@contextlib.contextmanager
def _quiet_optimizer_logs() -> Iterator[None]:
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
) -> tuple[Any, list[tuple[Any, WeightSpec]]]:
    """Export graph `graph` of the meta `model`: (optimised onnx_ir.Model, [(initialiser value, WeightSpec)]).

    Parameter initialisers are left without data (their specs say what to write); buffers get their real values.
    """
    import onnx_ir as ir

    try:
        with torch.no_grad(), _quiet_optimizer_logs(), _trace_only():
            _graph_writers()[graph](model, Path(os.devnull) / GRAPH_FILES[graph], opset=opset)
    except _Traced as traced:
        wrapper, program = traced.module, traced.program
    else:
        raise ExportError(
            f"export/{graph}.py saved a graph without calling torch.onnx.export; the streaming route cannot trace it"
        )
    inits = param_inits(model)
    model_buffers = {id(b): name for name, b in model.named_buffers(remove_duplicate=False)}
    by_name: dict[str, tuple[str, Any]] = {}
    for name, p in wrapper.named_parameters(remove_duplicate=False):
        by_name[name] = ("param", inits[id(p)])
    for name, b in wrapper.named_buffers(remove_duplicate=False):
        by_name[name] = ("buffer", model_buffers[id(b)])

    with torch.no_grad(), _quiet_optimizer_logs():
        onnx_model = program.model
        pending: list[tuple[Any, ParamInit]] = []
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
                    "of the model; the streaming route cannot give it values"
                )
        program.optimize()
    onnx_model = program.model
    alive = {id(v) for v in onnx_model.graph.initializers.values()}
    specs = []
    for value, init in pending:
        if id(value) not in alive:
            continue  # pruned by the optimiser (e.g. embed_tokens, unused by a decoder fed inputs_embeds)
        shape = tuple(int(d) for d in value.shape)
        specs.append((value, WeightSpec(init.name, shape, np.dtype(value.dtype.numpy()), init.kind, init.std)))
    return onnx_model, specs


# ---------------------------------------------------------------------------------------------- sizing
def model_config(name: str | os.PathLike):
    """(LlavaNextConfig, registry entry or None, checkpoint folder or None) of a registry name or a folder."""
    from models import registry
    from models.arch import config_class
    from models.load import CheckpointError, read_config, resolve_checkpoint

    text = os.fspath(name)
    path = Path(text).expanduser()
    try:
        if text not in registry.names() and path.is_dir():  # a registry name wins over a same-named folder
            config = read_config(path)
            cls = config_class(config["model_type"])
            return cls.from_pretrained(str(path)), registry.match_config(config), path
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
    from models.arch import model_for

    with torch.device("meta"):
        model = model_for(config)._from_config(config)
    return 4 * sum(p.numel() for p in model.parameters())


def needs_streaming(config, ram_bytes: int | None = None) -> bool:
    """True when the model's float32 weights exceed a third of this machine's RAM (then stream its weights)."""
    if ram_bytes is None:
        import psutil

        ram_bytes = int(psutil.virtual_memory().total)
    return fp32_bytes(config) > ram_bytes // 3
