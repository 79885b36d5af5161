"""serving.triton_repo: every config.pbtxt is a valid Triton ModelConfig whose tensors match the tiny bundle's ONNX
graphs; the entry point speaks serving.protocol's tensors, carries every project module it imports and the decoder
graph it runs itself; and the repository, with CPU stand-ins for the onnxruntime backend, really serves the local
Pipeline's tokens on PyTriton's bundled tritonserver, its decoder on the shared-buffer KV cache (a `slow` test)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as tritonclient_grpc
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from runtime.errors import ImageError, RemoteError
from runtime.manifest import Manifest, sha256_file
from runtime.pipeline import Pipeline
from serving import RemotePipeline
from serving.protocol import INPUTS, OUTPUTS
from serving.triton_repo import RepoError, RepoOptions, code_modules, external_data_files, main, write_repo
from tests.serving_helpers import ROOT, free_ports, serving_venv_or_skip

GRAPHS = ("vision", "projector")  # Triton graph models; the decoder runs inside `hired`
TRITON_TYPE = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.INT32: "TYPE_INT32",
}
SERVE_TYPE = {"UINT8": "TYPE_UINT8", "BYTES": "TYPE_STRING", "FP64": "TYPE_FP64", "INT32": "TYPE_INT32",
              "INT64": "TYPE_INT64"}  # fmt: skip


def load_config(path: Path) -> model_config_pb2.ModelConfig:
    """Triton's own schema check: text_format refuses unknown fields, wrong types and bad enum values."""
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def onnx_io(path: Path) -> tuple[list, list]:
    """[(name, Triton type, dims with -1 for symbolic)] of a graph's inputs and outputs."""
    model = onnx.load(str(path), load_external_data=False)

    def rows(values):
        return [
            (
                v.name,
                TRITON_TYPE[v.type.tensor_type.elem_type],
                [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim],
            )
            for v in values
        ]

    return rows(model.graph.input), rows(model.graph.output)


def config_io(config: model_config_pb2.ModelConfig, batch: bool) -> tuple[list, list]:
    """The same rows from a config, with Triton's implicit batch dim put back in front."""

    def rows(tensors):
        return [
            (t.name, model_config_pb2.DataType.Name(t.data_type), ([-1] if batch else []) + list(t.dims))
            for t in tensors
        ]

    return rows(config.input), rows(config.output)


@pytest.fixture(scope="module")
def repo(tiny_bundle, tmp_path_factory) -> Path:
    return write_repo(tiny_bundle, tmp_path_factory.mktemp("triton") / "repo", log=lambda _: None)


@pytest.fixture(scope="module")
def configs(repo) -> dict[str, model_config_pb2.ModelConfig]:
    return {d.name: load_config(d / "config.pbtxt") for d in sorted(repo.iterdir()) if d.is_dir()}


def test_repository_holds_two_graph_models_and_the_entry_point_with_the_decoder(configs, repo, tiny_bundle):
    assert sorted(configs) == ["hired", "projector", "vision"]  # no per-step decoder model
    params = {k: v.string_value for k, v in configs["hired"].parameters.items()}
    assert params["decoder_provider"] == "cuda"  # the BLS's own decoder session, on the GPU
    manifest = Manifest.from_file(tiny_bundle)
    assert sha256_file(repo / "hired" / "1" / "bundle" / "decoder.onnx") == manifest.sha256["decoder"]
    requirements = (repo / "hired" / "requirements.txt").read_text()
    assert f"onnxruntime-gpu>={manifest.export_info['min_onnxruntime']}" in requirements
    for name, config in configs.items():
        assert config.name == name
        assert config.backend == ("python" if name == "hired" else "onnxruntime")


@pytest.mark.parametrize("name", GRAPHS)
def test_graph_configs_match_the_onnx_graphs(name, configs, tiny_bundle):
    config = configs[name]
    manifest = Manifest.from_file(tiny_bundle)
    want_in, want_out = onnx_io(manifest.path(name))
    got_in, got_out = config_io(config, batch=config.max_batch_size > 0)
    assert got_in == want_in
    assert got_out == want_out


def test_vision_batches_crops_while_the_projector_does_not(configs, tiny_bundle):
    manifest = Manifest.from_file(tiny_bundle)
    crop = manifest.image_processor.crop_size
    most_images = 1 + max((h // crop) * (w // crop) for h, w in manifest.image_processor.grid_pinpoints)
    assert configs["vision"].max_batch_size >= most_images  # one request's base image + crops fit a batch
    assert configs["vision"].HasField("dynamic_batching")
    assert configs["projector"].max_batch_size == 0
    assert not configs["projector"].HasField("dynamic_batching")


def _accelerators(config) -> list:
    return list(config.optimization.execution_accelerators.gpu_execution_accelerator)


def test_tensorrt_fp16_accelerates_vision_and_projector(configs):
    for name in ("vision", "projector"):
        (trt,) = _accelerators(configs[name])
        assert trt.name == "tensorrt"
        assert trt.parameters["precision_mode"] == "FP16"
        assert int(trt.parameters["max_workspace_size_bytes"]) == 1 << 30


def test_decoder_can_opt_into_tensorrt_and_the_stand_in_runs_it_on_cpu(tiny_bundle, tmp_path):
    for opts, provider, package in ((RepoOptions(decoder_accelerator="tensorrt"), "tensorrt", "onnxruntime-gpu>="),
                                    (RepoOptions(stand_in=True), "cpu", "onnxruntime>=")):  # fmt: skip
        out = write_repo(tiny_bundle, tmp_path / provider, opts, log=lambda _: None)
        params = load_config(out / "hired" / "config.pbtxt").parameters
        assert params["decoder_provider"].string_value == provider
        assert package in (out / "hired" / "requirements.txt").read_text()
        assert not (out / "decoder").exists()


def test_instances_run_graphs_on_gpu_and_the_entry_point_on_cpu(configs):
    for name in GRAPHS:
        (group,) = configs[name].instance_group
        assert model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind) == "KIND_GPU"
    (group,) = configs["hired"].instance_group
    assert (model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind), group.count) == ("KIND_CPU", 2)


def test_entry_point_speaks_the_serve_protocol(configs):
    hired = configs["hired"]
    assert hired.max_batch_size == 8 and hired.HasField("dynamic_batching")
    got = [
        (t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims), t.optional) for t in hired.input
    ]
    assert got == [(s.name, SERVE_TYPE[s.dtype], list(s.dims), s.optional) for s in INPUTS]
    got = [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in hired.output]
    assert got == [(s.name, SERVE_TYPE[s.dtype], list(s.dims)) for s in OUTPUTS]


def test_model_files_are_the_bundles_own(repo, tiny_bundle):
    manifest = Manifest.from_file(tiny_bundle)
    for name in GRAPHS:
        assert sha256_file(repo / name / "1" / "model.onnx") == manifest.sha256[name]
    bundle = repo / "hired" / "1" / "bundle"
    for name in ("embed_tokens", "image_newline", "tokenizer"):
        assert sha256_file(bundle / manifest.files[name]) == manifest.sha256[name]
    assert Manifest.from_file(bundle, verify=False) == manifest
    wiring = json.loads((repo / "hired" / "1" / "graphs.json").read_text())
    assert wiring["vision"] == {"model": "vision", "input_dtypes": {"pixel_values": "float32"}}
    for module in ("model.py", "runtime/pipeline.py", "serving/protocol.py", "hired/__init__.py"):
        assert (repo / "hired" / "1" / module).is_file(), module
    assert "tokenizers" in (repo / "hired" / "requirements.txt").read_text()


def test_the_entry_point_carries_every_project_module_it_imports(repo):
    version = repo / "hired" / "1"
    copied = {p.relative_to(version).as_posix() for p in version.rglob("*.py")} - {"model.py"}
    assert copied == {p.relative_to(ROOT).as_posix() for p in code_modules()}
    assert {"serving/__init__.py", "serving/protocol.py", "runtime/options.py", "hired/__init__.py"} <= copied
    assert not {c for c in copied if c.startswith(("serving/triton", "export/", "models/", "bench/"))}
    # what model.py imports, imported from the copy alone (triton_python_backend_utils exists only in Triton)
    code = (
        "import sys; sys.path[:] = [p for p in sys.path if p not in ('', sys.argv[1])]; sys.path.insert(0, sys.argv[2])\n"
        "import runtime.pipeline, runtime.manifest, serving.protocol\n"
        "assert serving.protocol.__file__.startswith(sys.argv[2]), serving.protocol.__file__\n"
        "print(sorted(m.split('.')[0] for m in sys.modules if m.split('.')[0] in ('export', 'models', 'bench')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), str(version)], cwd=version, capture_output=True,
                         text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_external_weights_travel_beside_model_onnx(tiny_bundle):
    import dataclasses

    manifest = Manifest.from_file(tiny_bundle)
    assert external_data_files(manifest, "decoder") == []  # the tiny graphs hold their weights inline
    big = dataclasses.replace(manifest, files={**manifest.files, "decoder_data": "decoder.onnx.data"})
    assert external_data_files(big, "decoder") == ["decoder.onnx.data"]


def test_existing_output_needs_force(repo, tiny_bundle):
    with pytest.raises(RepoError, match="--force"):
        write_repo(tiny_bundle, repo, log=lambda _: None)


def test_cli_prints_the_docker_run_line(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "repo"
    assert main(["--artifacts", str(tiny_bundle), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        f"docker run --gpus all --shm-size=1g -p8000:8000 -p8001:8001 -p8002:8002 -v {out}:/models "
        "nvcr.io/nvidia/tritonserver:"
    ) in printed
    assert "tritonserver --model-repository=/models" in printed
    assert main(["--artifacts", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r2")]) == 2


# ---- the repository served for real (graphs as CPU stand-ins), on PyTriton's bundled tritonserver ---------------
def _tritonserver(env_dir: Path, work: Path) -> tuple[Path, Path, dict]:
    """PyTriton's tritonserver binary, a Python-backend folder with the stub for this Python, and the env."""
    from serving import venv as serve_env

    (site,) = env_dir.glob("lib/python3*/site-packages")
    dist = site / "pytriton" / "tritonserver"
    backends = work / "backends"
    shutil.copytree(dist / "backends" / "python", backends / "python")
    version = next(p.name for p in (env_dir / "lib").glob("python3*"))[len("python") :]
    shutil.copy2(dist / "python_backend_stubs" / version / "triton_python_backend_stub", backends / "python")
    env = serve_env.serving_environ(env_dir)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        filter(None, [env.get("LD_LIBRARY_PATH"), str(site / "nvidia_pytriton.libs")])
    )
    return dist / "bin" / "tritonserver", backends, env


@pytest.mark.slow
def test_stand_in_repository_serves_the_local_tokens(tiny_bundle, tmp_path):
    env_dir = serving_venv_or_skip()
    repo = write_repo(
        tiny_bundle, tmp_path / "repo", RepoOptions(stand_in=True, hired_instances=1), log=lambda _: None
    )
    binary, backends, env = _tritonserver(env_dir, tmp_path)
    http, grpc, metrics = free_ports(3)
    log_path = tmp_path / "tritonserver.log"
    cmd = [str(binary), "--model-repository", str(repo), "--backend-directory", str(backends),
           "--http-address", "127.0.0.1", "--http-port", str(http), "--grpc-address", "127.0.0.1",
           "--grpc-port", str(grpc), "--metrics-address", "127.0.0.1", "--metrics-port", str(metrics),
           "--allow-gpu-metrics", "false", "--exit-timeout-secs", "5", "--log-verbose", "0"]  # fmt: skip
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"tritonserver exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                remote = RemotePipeline(f"127.0.0.1:{grpc}", timeout_s=60)
                break
            except RemoteError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the repository did not load in 90 s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.3)
        rgb = np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8)
        with Pipeline.load(tiny_bundle) as pipe, remote:
            want = pipe.generate(rgb, "What is in this picture?", budget=0.3, max_new_tokens=6)
            got = remote.generate(rgb, "What is in this picture?", budget=0.3, max_new_tokens=6)
            assert got.token_ids == want.token_ids and got.text == want.text
            assert dict(got.visual_tokens) == dict(want.visual_tokens)
            # vision and projector ran as Triton models through BLS, the decoder in the BLS's own session ...
            assert got.provider == "CPUExecutionProvider,triton"
            # ... with one KV buffer per request written in place (runtime.decoder's shared-buffer path)
            assert "hired: decoder on CPUExecutionProvider, KV cache shared-buffer" in log_path.read_text()
            with pytest.raises(ImageError) as served:
                remote.generate(b"\x89PNG but not really", "What is it?")
            with pytest.raises(ImageError) as local:
                pipe.generate(b"\x89PNG but not really", "What is it?")
            assert str(served.value) == str(local.value)
            for empty in (
                np.zeros((0, 6, 3), np.uint8),
                np.zeros((4, 0, 3), np.uint8),
            ):  # plain-client shapes
                image = tritonclient_grpc.InferInput("image", [1, *empty.shape], "UINT8")
                image.set_data_from_numpy(empty[None])
                prompt = tritonclient_grpc.InferInput("prompt", [1, 1], "BYTES")
                prompt.set_data_from_numpy(np.array([[b"What is it?"]], dtype=object))
                client = tritonclient_grpc.InferenceServerClient(f"127.0.0.1:{grpc}")
                try:
                    error = client.infer("hired", [image, prompt]).as_numpy("error")[0, 0].decode()
                finally:
                    client.close()
                with pytest.raises(ImageError) as local:
                    pipe.generate(empty, "What is it?")
                assert error == f"ImageError: {local.value}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log_path.read_text()[-2000:]
