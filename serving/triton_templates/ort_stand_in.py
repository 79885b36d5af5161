"""A CPU stand-in for `backend: "onnxruntime"`: runs `model.onnx` beside this file with onnxruntime in Triton's
Python backend. Written only by `python -m serving.triton_repo --stand-in` (for tritonservers that ship the
Python backend alone, such as PyTriton's); the real repository uses Triton's onnxruntime backend instead.
"""

import json
import os

import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_names = [i["name"] for i in config["input"]]
        self.output_names = [o["name"] for o in config["output"]]
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model.onnx")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        responses = []
        for request in requests:  # the Python backend never concatenates requests: one run each
            feeds = {}
            for name in self.input_names:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    feeds[name] = tensor.as_numpy()
            try:
                outputs = self.session.run(self.output_names, feeds)
            except Exception as e:
                error = pb_utils.TritonError(f"onnxruntime: {str(e).strip().splitlines()[0]}")
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            tensors = [pb_utils.Tensor(n, v) for n, v in zip(self.output_names, outputs)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
