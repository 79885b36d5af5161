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
        """`warn=False` leaves the missing-provider warning to the caller (one line per Pipeline, not per graph)."""
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
        have_in = {i.name: i for i in self.session.get_inputs()}
        have_out = {o.name for o in self.session.get_outputs()}
        fname = manifest.files[self.name]
        n_layers = manifest.text.num_layers
        for logical, tensor in self.inputs.items():
            names = [tensor.format(i=i) for i in range(n_layers)] if "{i}" in tensor else [tensor]
            for t in names:
                if t not in have_in:
                    raise BundleError(
                        f"{fname} has no input {t!r} (the manifest's {self.name}.{logical}); "
                        f"its inputs are {', '.join(sorted(have_in))}; re-export the bundle"
                    )
                self.input_types[t] = _NP_TYPES.get(have_in[t].type, np.float32)
                self.input_ranks[t] = len(have_in[t].shape)
        for logical, tensor in self.outputs.items():
            names = [tensor.format(i=i) for i in range(n_layers)] if "{i}" in tensor else [tensor]
            for t in names:
                if t not in have_out:
                    raise BundleError(
                        f"{fname} has no output {t!r} (the manifest's {self.name}.{logical}); re-export the bundle"
                    )

    def dtype(self, tensor: str) -> type:
        return self.input_types[tensor]

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
