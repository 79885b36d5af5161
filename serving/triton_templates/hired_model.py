"""Triton Python-backend model `hired`: image + prompt -> HiRED-pruned LLaVA-NeXT answer, with BLS calls.

Written into a model repository by `python -m serving.triton_repo`. Preprocessing, HiRED selection, packing,
embedding and the decode loop are the project's own `runtime.Pipeline` (its code, and every project module this
file imports, sits beside it). The vision tower and the projector are BLS calls to the repository's `vision` and
`projector` models (onnxruntime backend, TensorRT FP16 on GPUs). The decoder runs here, in this model's own
onnxruntime session (`bundle/decoder.onnx`, provider from the `decoder_provider` parameter: cuda on a GPU
Triton, cpu in the stand-in repository): its KV cache is one buffer per request, allocated once on the session's
device and written in place through IO binding (runtime.decoder's shared-buffer path), which a per-step call to
a separate Triton model cannot do. The request/response tensors are serving.protocol's, as `python -m serving`
serves them, so `serving.RemotePipeline` and plain tritonclient code work against both.

Each request of a dynamic batch is its own generate() call, in order; run more instances (instance_group count)
for concurrency: each instance loads its own decoder session (its weights once per instance).
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # the copied project modules: hired/, runtime/, serving/protocol.py

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

import runtime.pipeline as pipeline_module  # noqa: E402
from runtime.errors import BundleError, GenerationError  # noqa: E402
from runtime.image import DEFAULT_MAX_PIXELS  # noqa: E402
from runtime.manifest import Manifest, sha256_file  # noqa: E402
from runtime.quant import check_onnxruntime  # noqa: E402
from runtime.session import OrtSession  # noqa: E402
from serving.protocol import INPUTS, answer_requests  # noqa: E402

LOCAL_FILES = (
    "decoder",
    "embed_tokens",
    "image_newline",
    "tokenizer",
)  # vision and projector live in their own graph models


class TritonGraph:
    """The surface of runtime.session.OrtSession (inputs, outputs, run, dtype, provider) over BLS calls."""

    def __init__(self, model: str, graph, input_dtypes: dict):
        self.name = model
        self.inputs = dict(graph.inputs)  # logical -> tensor name
        self.outputs = dict(graph.outputs)
        self.input_types = {tensor: np.dtype(dtype).type for tensor, dtype in input_dtypes.items()}
        self.provider = "triton"

    def dtype(self, tensor: str):
        return self.input_types[tensor]

    def run(self, feeds: dict, outputs: list) -> list:
        tensors = []
        for tensor, value in feeds.items():
            if tensor not in self.input_types:
                raise GenerationError(f"{self.name} model has no input {tensor!r}; regenerate the repository")
            tensors.append(
                pb_utils.Tensor(tensor, np.ascontiguousarray(value, dtype=self.input_types[tensor]))
            )
        request = pb_utils.InferenceRequest(
            model_name=self.name, requested_output_names=list(outputs), inputs=tensors
        )
        response = request.exec()
        if response.has_error():
            raise GenerationError(f"{self.name} model failed in Triton: {response.error().message()}")
        return [pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs]


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        bundle = os.path.join(HERE, "bundle")
        manifest = Manifest.from_file(bundle, verify=False)  # vision, projector: in their models' folders
        for name in LOCAL_FILES:
            digest = sha256_file(manifest.path(name))
            if digest != manifest.sha256[name]:
                raise BundleError(
                    f"{manifest.files[name]} sha256 mismatch in {bundle}; regenerate the repository"
                )
        min_ort = str(manifest.export_info.get("min_onnxruntime", ""))
        check_onnxruntime(manifest.quant.method, opset_min=min_ort)
        with open(os.path.join(HERE, "graphs.json"), encoding="utf-8") as f:
            wiring = json.load(f)
        graphs = {
            name: TritonGraph(w["model"], manifest.graphs[name], w["input_dtypes"])
            for name, w in wiring.items()
        }
        decoder = OrtSession.from_manifest(manifest, "decoder", params.get("decoder_provider") or "cuda")
        self.pipe = pipeline_module.Pipeline.from_sessions(
            manifest, **graphs, decoder=decoder, max_pixels=int(params.get("max_pixels", DEFAULT_MAX_PIXELS))
        )
        # one line in the server log: where the decoder runs and how it keeps its cache (tests read it)
        print(
            f"hired: decoder on {decoder.provider}, KV cache {self.pipe.decoder.kv_cache} "
            f"(device {self.pipe.decoder.device[0]})",
            file=sys.stderr,
            flush=True,
        )

    def execute(self, requests):
        batch = []
        for request in requests:
            data = {}
            for spec in INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
                if tensor is not None:
                    data[spec.name] = tensor.as_numpy()
            batch.append(data)
        answers = answer_requests(self.pipe.generate, batch)
        return [
            pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, value) for name, value in out.items()]
            )
            for out in answers
        ]

    def finalize(self):
        self.pipe.close()
