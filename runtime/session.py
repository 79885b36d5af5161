"""One checked onnxruntime session per graph of the bundle, with provider choice and an honest fallback.

    s = OrtSession.from_manifest(manifest, "vision", provider="cuda")
    feats, = s.run({s.inputs["pixel_values"]: px}, [s.outputs["features"]])   # tensor names, via the manifest's maps
    s.provider                              # the execution provider that actually runs it

Providers: "cpu"; "cuda" (CUDAExecutionProvider, then CPU); "tensorrt" (TensorRT EP with fp16 and an engine
cache folder, then CUDA, then CPU). A provider that cannot be had falls back with one warning line that says why.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from runtime.errors import BundleError, GenerationError, ProviderError
from runtime.manifest import Manifest

log = logging.getLogger("hired_edge")

PROVIDERS = ("cpu", "cuda", "tensorrt")
_ORT_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_NP_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}
_KINDS = {  # what the runtime feeds or reads, by kind of tensor
    "float": ("tensor(float)", "tensor(float16)"),
    "int": ("tensor(int64)", "tensor(int32)"),
}


def _expected_io(manifest: Manifest, graph: str) -> dict[tuple[str, str], tuple[str, int | None, dict]]:
    """(direction, logical name) -> (kind, rank or None, {axis: (size, the manifest number it is)}) for `graph`.

    Only what any graph of its kind must satisfy: dynamic axes (crops, kept tokens, batch, sequence, cache
    length) are not pinned, and the decoder is checked by its widths, vocabulary and KV heads only."""
    v, t = manifest.vision, manifest.text
    tokens = (v.tokens_per_image, "vision.tokens_per_image")
    kv = {1: (t.num_kv_heads, "text.num_kv_heads"), 3: (t.head_dim, "text.head_dim")}
    table = {
        "vision": {
            ("input", "pixel_values"): ("float", 4, {1: (3, "RGB channel count"), 2: (v.image_size, "vision.image_size"),
                                                     3: (v.image_size, "vision.image_size")}),
            ("output", "features"): ("float", 3, {1: tokens, 2: (v.hidden_size, "vision.hidden_size")}),
            ("output", "early_scores"): ("float", 2, {1: tokens}),
            ("output", "late_scores"): ("float", 2, {1: tokens}),
        },
        "projector": {
            ("input", "features"): ("float", 2, {1: (v.hidden_size, "vision.hidden_size (the vision features' width)")}),
            ("output", "projected"): ("float", 2, {1: (t.hidden_size, "text.hidden_size (the decoder's width)")}),
        },
        "decoder": {
            ("input", "inputs_embeds"): ("float", 3, {2: (t.hidden_size, "text.hidden_size")}),
            ("input", "attention_mask"): ("int", None, {}),
            ("input", "position_ids"): ("int", None, {}),
            ("input", "past_key"): ("float", 4, kv),
            ("input", "past_value"): ("float", 4, kv),
            ("output", "logits"): ("float", None, {-1: (t.vocab_size, "text.vocab_size (the embedding table's rows)")}),
            ("output", "present_key"): ("float", 4, kv),
            ("output", "present_value"): ("float", 4, kv),
        },
    }  # fmt: skip
    return table.get(graph, {})


def provider_chain(provider: str, cache_dir: str | os.PathLike | None = None) -> tuple[list, list[str]]:
    """ORT provider list for `provider`, plus at most one warning line for what this onnxruntime build lacks."""
    if provider not in PROVIDERS:
        raise ProviderError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    available = set(ort.get_available_providers())
    wanted = {"cpu": ["cpu"], "cuda": ["cuda", "cpu"], "tensorrt": ["tensorrt", "cuda", "cpu"]}[provider]
    chain, missing = [], []
    for p in wanted:
        name = _ORT_NAMES[p]
        if name not in available:
            missing.append(name)
            continue
        if p == "tensorrt":
            cache = str(cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "hired-edge", "trt"))
            os.makedirs(cache, exist_ok=True)
            chain.append(
                (name, {"trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": cache})
            )
        else:
            chain.append(name)
    warnings = []
    if missing:
        fallback = chain[0][0] if isinstance(chain[0], tuple) else chain[0]
        warnings.append(
            f"{provider} requested but this onnxruntime build has no {' or '.join(missing)} "
            f"(install onnxruntime-gpu with its CUDA/TensorRT libraries); running on {fallback}"
        )
    return chain, warnings


@dataclass
class OrtSession:
    """A loaded graph with logical input/output names; checks feeds before running."""

    name: str
    session: ort.InferenceSession
    inputs: dict[str, str]  # logical -> tensor name
    outputs: dict[str, str]
    input_types: dict[str, type] = field(default_factory=dict)  # tensor name -> numpy dtype
    input_ranks: dict[str, int] = field(default_factory=dict)
    provider: str = "CPUExecutionProvider"

    @classmethod
    def from_manifest(
        cls,
        manifest: Manifest,
        name: str,
        provider: str = "cpu",
        *,
        threads: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        warn: bool = True,
    ) -> OrtSession:
        """`threads`: onnxruntime intra-op threads of this session; None = onnxruntime's default, one thread per
        physical core (2 on the 2-core CI box; set it to share a machine). `warn=False` leaves the missing-provider
        warning to the caller (one line per Pipeline, not per graph)."""
        graph = manifest.graphs[name]
        path = manifest.path(name)
        chain, warnings = provider_chain(provider, cache_dir)
        for w in warnings if warn else ():
            log.warning("%s: %s", name, w)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        try:
            sess = ort.InferenceSession(str(path), sess_options=opts, providers=chain or ["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... classes
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BundleError(f"{manifest.files[name]} cannot be loaded by onnxruntime ({msg}); re-export it") from None
        actual = sess.get_providers()[0]
        if chain and actual != (chain[0][0] if isinstance(chain[0], tuple) else chain[0]):
            log.warning("%s: %s could not be initialised; running on %s", name, chain[0], actual)
        s = cls(name=name, session=sess, inputs=dict(graph.inputs), outputs=dict(graph.outputs), provider=actual)
        s._check_graph(manifest)
        return s

    def _check_graph(self, manifest: Manifest) -> None:
        """Every tensor the manifest names exists, with the element type the runtime feeds or reads and, where
        the graph fixes them, the sizes the manifest's numbers imply (e.g. the projector's output width is
        text.hidden_size, the decoder's). Records each input's numpy dtype and rank for `run`."""
        have_in = {i.name: i for i in self.session.get_inputs()}
        have_out = {o.name: o for o in self.session.get_outputs()}
        fname = manifest.files[self.name]
        n_layers = manifest.text.num_layers
        expected = _expected_io(manifest, self.name)
        for direction, table, have in (("input", self.inputs, have_in), ("output", self.outputs, have_out)):
            for logical, tensor in table.items():
                names = [tensor.format(i=i) for i in range(n_layers)] if "{i}" in tensor else [tensor]
                for t in names:
                    if t not in have:
                        listing = f"; its inputs are {', '.join(sorted(have_in))}" if direction == "input" else ""
                        raise BundleError(
                            f"{fname} has no {direction} {t!r} (the manifest's {self.name}.{logical}){listing}; "
                            "re-export the bundle"
                        )
                    arg = have[t]
                    what = f"{fname} {direction} {t!r} ({self.name}.{logical})"
                    kind, rank, sizes = expected.get((direction, logical), (None, None, {}))
                    allowed = _KINDS.get(kind, tuple(_NP_TYPES))
                    if arg.type not in allowed:
                        raise BundleError(
                            f"{what} is {arg.type}, the runtime {'feeds' if direction == 'input' else 'reads'} "
                            f"{' or '.join(allowed)} there; re-export the bundle"
                        )
                    shape = list(arg.shape) if arg.shape is not None else None
                    if shape is not None and rank is not None and len(shape) != rank:
                        raise BundleError(
                            f"{what} has rank {len(shape)} {shape}, the runtime needs rank {rank}; re-export the bundle"
                        )
                    for axis, (size, meaning) in sizes.items():
                        if shape is None or not -len(shape) <= axis < len(shape):
                            continue
                        got = shape[axis]
                        if isinstance(got, int) and got >= 0 and got != size:
                            raise BundleError(
                                f"{what} has {got} at axis {axis % len(shape)} of {shape}, but the manifest's "
                                f"{meaning} is {size}; the graph and the manifest disagree: re-export the bundle"
                            )
                    if direction == "input":
                        self.input_types[t] = _NP_TYPES[arg.type]
                        self.input_ranks[t] = len(shape) if shape is not None else 0

    def dtype(self, tensor: str) -> type:
        return self.input_types[tensor]

    def metadata(self) -> dict[str, str]:
        """The graph's metadata_props (e.g. `hired_edge.kv_cache`, how the decoder treats its KV cache)."""
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def io_binding(self) -> ort.IOBinding:
        """A fresh onnxruntime IO binding for `run_with_binding` (inputs and outputs that stay on the device)."""
        return self.session.io_binding()

    def run_with_binding(self, binding: ort.IOBinding) -> None:
        """Run with bound inputs/outputs (runtime.decoder binds the KV cache in place); one-line GenerationError."""
        try:
            self.session.run_with_iobinding(binding)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GenerationError(f"{self.name} graph failed in onnxruntime: {first}") from None

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
        """Run the graph. feeds: tensor name -> array (the tensor names are the manifest's, looked up with
        `self.inputs[logical]`); outputs: tensor names (`self.outputs[logical]`), None for all, in that order.

        Every feed must be an input of the graph, of its rank and of exactly its dtype (`self.dtype(name)`):
        nothing is cast here, so a caller feeding float64 or float32 into a float16 graph hears about it
        (GenerationError naming the tensor, the expected and the given dtype) instead of paying a silent copy."""
        fixed = {}
        for t, v in feeds.items():
            if t not in self.input_types:
                raise GenerationError(
                    f"{self.name} graph has no input {t!r}; its inputs are {', '.join(sorted(self.input_types))}"
                )
            v = np.asarray(v)
            want = np.dtype(self.input_types[t])
            if v.dtype != want:
                raise GenerationError(
                    f"{self.name} input {t!r} must be {want.name}, got {v.dtype.name}; cast it with .astype(np.{want.name})"
                )
            if v.ndim != self.input_ranks[t]:
                raise GenerationError(f"{self.name} input {t!r} needs rank {self.input_ranks[t]}, got shape {v.shape}")
            fixed[t] = np.ascontiguousarray(v)
        try:
            return self.session.run(outputs, fixed)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GenerationError(f"{self.name} graph failed in onnxruntime: {first}") from None
