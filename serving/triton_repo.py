"""Bundle -> a standard Triton model repository for NVIDIA's Triton containers (GPU servers, SBSA, Jetson).

    python -m serving.triton_repo --artifacts artifacts/tiny --out triton-repo

Writes, from the bundle (checked against its manifest first):
    vision/     backend onnxruntime; the crop axis is Triton's batch dim, so dynamic batching merges the crops
                of concurrent requests (TensorRT FP16 accelerator)
    projector/  backend onnxruntime; kept tokens only (TensorRT FP16 accelerator)
    hired/      backend python, the entry point: preprocessing + HiRED selection + the generate loop
                (runtime.Pipeline with vision/projector swapped for BLS calls to the models above);
                serving.protocol's tensors, as `python -m serving`, so RemotePipeline works against it unchanged;
                the project modules it imports (hired/, runtime/, serving.protocol) are copied beside it, the
                decoder graph into hired/1/bundle/: the BLS runs it in its own onnxruntime session (CUDA EP,
                --decoder-accelerator tensorrt, cpu in the stand-in), KV cache bound in place. No separate
                decoder model: per-step calls would carry the cache through Triton at every token.
Each model is `<name>/config.pbtxt` + `<name>/1/...`; the graphs become `<name>/1/model.onnx` (hard links by
default, so a 14 GB decoder is not copied; --files copy for another filesystem, symlink for local use only:
links out of the folder break inside `docker -v`; the decoder is copied then). Ensembles cannot loop, hence
the Python (BLS) model.
The graphs' tensors are read by onnxruntime (a CPU session) and their external-data files come from the manifest,
so the writer needs only the runtime's packages.

`--stand-in` writes `vision` and `projector` as Python-backend models running onnxruntime on CPU
instead, for tritonservers with the Python backend only (PyTriton's bundled one): the same wiring, testable
without NVIDIA's container. It prints the `docker run` line that serves the repository.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import HiredError
from runtime.image import DEFAULT_MAX_PIXELS
from runtime.manifest import Manifest
from serving.protocol import INPUTS as WIRE_INPUTS
from serving.protocol import MODEL_NAME
from serving.protocol import OUTPUTS as WIRE_OUTPUTS

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = Path(__file__).resolve().parent / "triton_templates"
GRAPHS = ("vision", "projector")  # Triton graph models; the decoder runs inside the hired model
LOCAL_FILES = ("decoder", "embed_tokens", "image_newline", "tokenizer")  # what the hired model reads itself
ENTRY_POINT = TEMPLATES / "hired_model.py"
DEFAULT_TRITON_TAG = "25.12"
# onnxruntime's tensor type names -> (Triton config type, numpy dtype name)
ORT_TYPES = {
    "tensor(float)": ("TYPE_FP32", "float32"),
    "tensor(uint8)": ("TYPE_UINT8", "uint8"),
    "tensor(int8)": ("TYPE_INT8", "int8"),
    "tensor(int32)": ("TYPE_INT32", "int32"),
    "tensor(int64)": ("TYPE_INT64", "int64"),
    "tensor(bool)": ("TYPE_BOOL", "bool"),
    "tensor(float16)": ("TYPE_FP16", "float16"),
    "tensor(double)": ("TYPE_FP64", "float64"),
    "tensor(bfloat16)": ("TYPE_BF16", "bfloat16"),
}
WIRE_TYPES = {"UINT8": "TYPE_UINT8", "BYTES": "TYPE_STRING", "FP64": "TYPE_FP64", "INT32": "TYPE_INT32",
               "INT64": "TYPE_INT64"}  # fmt: skip
REQUIREMENTS = """\
# Python packages the `hired` model needs in the Triton container (its -py3 images ship numpy only):
#   pip install -r /models/hired/requirements.txt
tokenizers>=0.15
pillow>=10
# the decoder runs in the hired model's own onnxruntime session: onnxruntime-gpu on a GPU Triton
{onnxruntime}>={min_onnxruntime}
"""


class RepoError(HiredError):
    """The repository cannot be written (bundle, output folder or options)."""


@dataclass(frozen=True)
class TensorIO:
    """One graph input or output: its Triton type and dims (-1 for a symbolic dim)."""

    name: str
    triton_type: str
    numpy_dtype: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class RepoOptions:
    max_batch: int = 8  # hired: dynamic batching of whole requests
    queue_delay_us: int = 1000
    hired_instances: int = 2  # Python-backend instances of hired (each runs its requests in order)
    gpu_instances: int = 1  # instances of each graph model
    vision_max_batch: int | None = None  # crops per vision batch; default 4 requests' worth
    precision: str = "FP16"
    workspace_bytes: int = 1 << 30
    decoder_accelerator: str = "cuda"  # provider of the hired model's decoder session: "cuda" or "tensorrt"
    files: str = "hardlink"  # hardlink | copy | symlink
    stand_in: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS


# ---- reading the graphs --------------------------------------------------------------------------------------
def graph_tensors(path: Path) -> tuple[list[TensorIO], list[TensorIO]]:
    """Inputs and outputs of an ONNX graph, as onnxruntime reads them (a CPU session, no graph optimisation)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def io(arg) -> TensorIO:
        if arg.type not in ORT_TYPES:
            raise RepoError(f"{path.name}: tensor {arg.name!r} has type {arg.type}, which has no Triton type")
        dims = tuple(d if isinstance(d, int) and d > 0 else -1 for d in arg.shape)
        return TensorIO(arg.name, *ORT_TYPES[arg.type], dims)

    return [io(a) for a in session.get_inputs()], [io(a) for a in session.get_outputs()]


def external_data_files(manifest: Manifest, name: str) -> list[str]:
    """The external-data file of graph `name` (copied beside model.onnx), as the manifest lists it: `<name>_data`."""
    data = manifest.files.get(f"{name}_data")
    return [data] if data else []


def max_images(manifest: Manifest) -> int:
    """Images (base + crops) of the largest anyres grid: the most one request sends through `vision`."""
    crop = manifest.image_processor.crop_size
    return 1 + max((h // crop) * (w // crop) for h, w in manifest.image_processor.grid_pinpoints)


# ---- config.pbtxt text -----------------------------------------------------------------------------------------
def _dims(dims: Sequence[int]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def render_tensors(kind: str, tensors: Sequence[tuple[str, str, Sequence[int], bool]]) -> str:
    """`input [ ... ]` / `output [ ... ]` blocks; each tensor is (name, triton type, dims, optional)."""
    items = []
    for name, triton_type, dims, optional in tensors:
        lines = [f'    name: "{name}"', f"    data_type: {triton_type}", f"    dims: {_dims(dims)}"]
        if optional:
            lines.append("    optional: true")
        items.append("  {\n" + "\n".join(lines) + "\n  }")
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def tensorrt_block(precision: str, workspace_bytes: int, cache_dir: str) -> str:
    return (
        "optimization {\n"
        "  execution_accelerators {\n"
        "    gpu_execution_accelerator: [\n"
        "      {\n"
        '        name: "tensorrt"\n'
        f'        parameters {{ key: "precision_mode" value: "{precision}" }}\n'
        f'        parameters {{ key: "max_workspace_size_bytes" value: "{workspace_bytes}" }}\n'
        '        parameters { key: "trt_engine_cache_enable" value: "1" }\n'
        f'        parameters {{ key: "trt_engine_cache_path" value: "{cache_dir}" }}\n'
        "      }\n"
        "    ]\n"
        "  }\n"
        "}\n"
    )


def onnx_model_config(
    name: str,
    inputs: Sequence[TensorIO],
    outputs: Sequence[TensorIO],
    *,
    max_batch_size: int,
    opts: RepoOptions,
    accelerator: str | None,
    note: str,
) -> str:
    """config.pbtxt of a graph model; with max_batch_size > 0 the graphs' first dim is Triton's batch dim."""
    strip = 1 if max_batch_size > 0 else 0
    backend = "python" if opts.stand_in else "onnxruntime"
    kind = "KIND_CPU" if opts.stand_in else "KIND_GPU"
    text = f"# {note}\n" + f'name: "{name}"\nbackend: "{backend}"\nmax_batch_size: {max_batch_size}\n'
    text += render_tensors("input", [(t.name, t.triton_type, t.dims[strip:], False) for t in inputs])
    text += render_tensors("output", [(t.name, t.triton_type, t.dims[strip:], False) for t in outputs])
    text += f"instance_group [ {{ count: {opts.gpu_instances} kind: {kind} }} ]\n"
    if max_batch_size > 0:
        text += f"dynamic_batching {{ max_queue_delay_microseconds: {opts.queue_delay_us} }}\n"
    if accelerator == "tensorrt" and not opts.stand_in:
        text += tensorrt_block(opts.precision, opts.workspace_bytes, f"/tmp/hired-trt-cache/{name}")
    return text


def hired_model_config(opts: RepoOptions) -> str:
    """config.pbtxt of the entry point: serving.protocol's tensors, dynamic batching of whole requests."""
    text = (
        "# HiRED LLaVA-NeXT entry point (Python backend, BLS to vision/projector; the decoder in its own\n"
        "# onnxruntime session); the tensors of `python -m serving`. Each request is its own generate().\n"
        f'name: "{MODEL_NAME}"\nbackend: "python"\nmax_batch_size: {opts.max_batch}\n'
    )
    text += render_tensors("input", [(s.name, WIRE_TYPES[s.dtype], s.dims, s.optional) for s in WIRE_INPUTS])
    text += render_tensors("output", [(s.name, WIRE_TYPES[s.dtype], s.dims, False) for s in WIRE_OUTPUTS])
    text += f"instance_group [ {{ count: {opts.hired_instances} kind: KIND_CPU }} ]\n"
    text += f"dynamic_batching {{ max_queue_delay_microseconds: {opts.queue_delay_us} }}\n"
    text += f'parameters {{ key: "max_pixels" value: {{ string_value: "{opts.max_pixels}" }} }}\n'
    provider = "cpu" if opts.stand_in else opts.decoder_accelerator
    text += f'parameters {{ key: "decoder_provider" value: {{ string_value: "{provider}" }} }}\n'
    return text


# ---- writing ---------------------------------------------------------------------------------------------------
def place_file(src: Path, dst: Path, how: str) -> None:
    """Put `src` at `dst` as a hard link (copy when across filesystems), a copy or an absolute symlink."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if how == "symlink":
        dst.symlink_to(src.resolve())
        return
    if how == "hardlink":
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another filesystem, or links not allowed: copy
    shutil.copy2(src, dst)


def code_modules(entry: Path = ENTRY_POINT) -> list[Path]:
    """The project's .py files that `entry` imports, directly or through each other, with their packages'
    __init__.py: every import statement counts, in functions too (read with ast, nothing is imported)."""
    found: set[Path] = set()
    todo = [entry]
    while todo:
        tree = ast.parse(todo.pop().read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                for path in _project_files(name):
                    if path not in found:
                        found.add(path)
                        todo.append(path)
    return sorted(found)


def _project_files(dotted: str) -> list[Path]:
    """The project files of `a.b.c` (a module, or a name in module a.b) and of its packages' __init__.py."""
    parts = dotted.split(".")
    if not (REPO_ROOT / parts[0] / "__init__.py").is_file():
        return []  # numpy, triton_python_backend_utils, ...: not the project's
    files = []
    for i in range(1, len(parts) + 1):
        base = REPO_ROOT.joinpath(*parts[:i])
        if (base / "__init__.py").is_file():
            files.append(base / "__init__.py")
        elif base.with_suffix(".py").is_file():
            files.append(base.with_suffix(".py"))
            break
        else:
            break
    return files


def copy_code(dst: Path) -> list[str]:
    """Copy the project modules the hired model imports into `dst` (plain .py files, no caches); their paths."""
    copied = []
    for path in code_modules():
        rel = path.relative_to(REPO_ROOT)
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dst / rel)
        copied.append(rel.as_posix())
    return copied


def write_repo(
    artifacts: str | os.PathLike,
    out: str | os.PathLike,
    opts: RepoOptions = RepoOptions(),
    *,
    force: bool = False,
    log: Callable[[str], None] = lambda msg: print(f"[triton_repo] {msg}", file=sys.stderr),
) -> Path:
    """Write the model repository for bundle `artifacts` to `out` (staged beside it, then moved into place)."""
    check_options(opts)
    manifest = Manifest.from_file(artifacts)  # refuses a tampered or unknown-version bundle
    out = Path(out).resolve()
    if out.exists() and not force:
        raise RepoError(f"{out} exists; pass --force to replace it")
    stage = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    try:
        _write(manifest, stage, opts, log)
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log(
        f"wrote {out}: models {', '.join([*GRAPHS, MODEL_NAME])} (the decoder inside {MODEL_NAME})"
        + (" (stand-in graphs)" if opts.stand_in else "")
    )
    return out


def _write(manifest: Manifest, stage: Path, opts: RepoOptions, log: Callable[[str], None]) -> None:
    wiring = {}
    n_images = max_images(manifest)
    for name in GRAPHS:
        src = manifest.path(name)
        inputs, outputs = graph_tensors(src)
        version = stage / name / "1"
        place_file(src, version / "model.onnx", opts.files)
        for rel in external_data_files(manifest, name):
            place_file(src.parent / rel, version / rel, opts.files)
        if opts.stand_in:
            shutil.copy2(TEMPLATES / "ort_stand_in.py", version / "model.py")
        batched = name == "vision" and all(t.dims and t.dims[0] == -1 for t in [*inputs, *outputs])
        max_batch = (opts.vision_max_batch or 4 * n_images) if batched else 0
        if batched and max_batch < n_images:
            raise RepoError(
                f"--vision-max-batch {max_batch} is under the {n_images} images one request can send"
            )
        note = {
            "vision": f"vision tower (features + CLS attention); batch dim = images (crops), <= {n_images} a request",
            "projector": "projector on the kept visual tokens only (k varies per request: no batching)",
        }[name]
        config = onnx_model_config(
            name, inputs, outputs, max_batch_size=max_batch, opts=opts, accelerator="tensorrt", note=note
        )
        (stage / name / "config.pbtxt").write_text(config)
        wiring[name] = {"model": name, "input_dtypes": {t.name: t.numpy_dtype for t in inputs}}
        log(f"{name}: {src.name} -> {name}/1/model.onnx ({opts.files}), max_batch_size {max_batch}")

    version = stage / MODEL_NAME / "1"
    version.mkdir(parents=True)
    shutil.copy2(TEMPLATES / "hired_model.py", version / "model.py")
    code = copy_code(version)
    log(
        f"{MODEL_NAME}: model.py + {len(code)} project modules ({', '.join(sorted({c.split('/')[0] for c in code}))})"
    )
    bundle = version / "bundle"
    bundle.mkdir()
    shutil.copy2(manifest.root / "manifest.json", bundle / "manifest.json")
    how = "copy" if opts.files == "symlink" else opts.files  # the BLS refuses files that resolve outside it
    for name in LOCAL_FILES:
        src = manifest.path(name)
        place_file(src, bundle / manifest.files[name], how)
        if name == "decoder":
            for rel in external_data_files(manifest, name):
                place_file(src.parent / rel, bundle / rel, how)
    (version / "graphs.json").write_text(json.dumps(wiring, indent=2) + "\n")
    (stage / MODEL_NAME / "config.pbtxt").write_text(hired_model_config(opts))
    min_ort = manifest.export_info.get("min_onnxruntime") if isinstance(manifest.export_info, dict) else None
    ort_package = "onnxruntime" if opts.stand_in else "onnxruntime-gpu"
    (stage / MODEL_NAME / "requirements.txt").write_text(
        REQUIREMENTS.format(onnxruntime=ort_package, min_onnxruntime=min_ort or "1.17")
    )
    (stage / "README.md").write_text(readme(manifest, opts))


def check_options(opts: RepoOptions) -> None:
    if opts.files not in ("hardlink", "copy", "symlink"):
        raise RepoError(f"--files must be hardlink, copy or symlink, got {opts.files!r}")
    if opts.decoder_accelerator not in ("cuda", "tensorrt"):
        raise RepoError(f"--decoder-accelerator must be cuda or tensorrt, got {opts.decoder_accelerator!r}")
    if opts.precision not in ("FP16", "FP32"):
        raise RepoError(f"--precision must be FP16 or FP32, got {opts.precision!r}")
    for flag, value in (("--max-batch", opts.max_batch), ("--hired-instances", opts.hired_instances),
                        ("--gpu-instances", opts.gpu_instances)):  # fmt: skip
        if value < 1:
            raise RepoError(f"{flag} must be >= 1, got {value}")


def docker_command(out: Path, tag: str = DEFAULT_TRITON_TAG) -> str:
    """The one line that serves the repository in NVIDIA's Triton container (GPU, ports 8000-8002)."""
    return (
        f"docker run --gpus all --shm-size=1g -p8000:8000 -p8001:8001 -p8002:8002 -v {out}:/models "
        f'nvcr.io/nvidia/tritonserver:{tag}-py3 bash -c "pip install -q -r /models/{MODEL_NAME}/requirements.txt '
        '&& tritonserver --model-repository=/models"'
    )


def readme(manifest: Manifest, opts: RepoOptions) -> str:
    opset = manifest.export_info.get("opset", "?") if isinstance(manifest.export_info, dict) else "?"
    graphs = "CPU stand-ins in the Python backend" if opts.stand_in else "onnxruntime backend"
    return f"""# Triton model repository for {manifest.model.name} (HiRED LLaVA-NeXT)

Written by `python -m serving.triton_repo`. Models: `vision`, `projector` ({graphs}) and `{MODEL_NAME}`
(Python backend, the entry point: preprocessing, HiRED selection through BLS calls, and the generate loop with
the decoder in its own onnxruntime session, `{MODEL_NAME}/1/bundle/`, the KV cache bound in place).

Serve it (the `{MODEL_NAME}` model needs tokenizers, pillow and onnxruntime-gpu in the container's Python):

    {docker_command(Path("$PWD/<this folder>"))}

Then, from any machine with `pip install tritonclient[grpc]` and this project's runtime:

    from serving import RemotePipeline
    RemotePipeline("<server>:8001").generate("photo.jpg", "What is this?", budget=0.2)

The graphs were exported at ONNX opset {opset}: the container's onnxruntime backend must support it (opset 23
needs onnxruntime >= 1.23; each Triton container release names the onnxruntime it ships), or
re-export with `python -m export --opset 18`. Give the container a large /dev/shm (`--shm-size=1g` or
`--ipc=host`): Python-backend tensors (images, vision features) pass through it. onnxruntime's TensorRT
provider has no kernels for GroupQueryAttention or MatMulNBits: with `--decoder-accelerator tensorrt` those
nodes run on the CUDA provider.
"""


# ---- command line ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving.triton_repo",
        description="Write a Triton model repository (onnxruntime graphs + a Python BLS entry point) for a bundle.",
    )
    p.add_argument(
        "--artifacts", required=True, metavar="DIR", help="bundle folder written by `python -m export`"
    )
    p.add_argument("--out", required=True, metavar="REPO", help="the model repository folder to write")
    p.add_argument("--force", action="store_true", help="replace REPO if it exists")
    p.add_argument(
        "--files",
        choices=("hardlink", "copy", "symlink"),
        default="hardlink",
        help="how the graphs get into REPO (default hardlink; copy across filesystems)",
    )
    p.add_argument("--max-batch", type=int, default=8, help="hired: dynamic batch of requests (default 8)")
    p.add_argument("--queue-delay-us", type=int, default=1000, help="dynamic batching queue delay (default 1000)")
    p.add_argument("--hired-instances", type=int, default=2,
                   help="Python-backend instances of hired, each with its own decoder session (default 2)")
    p.add_argument("--gpu-instances", type=int, default=1, help="instances of each graph model per GPU (default 1)")
    p.add_argument(
        "--vision-max-batch", type=int, help="images per vision batch (default: 4 requests' worth)"
    )
    p.add_argument(
        "--precision", choices=("FP16", "FP32"), default="FP16", help="TensorRT precision (default FP16)"
    )
    p.add_argument(
        "--decoder-accelerator",
        choices=("cuda", "tensorrt"),
        default="cuda",
        help="provider of the decoder session inside hired: cuda (default) or tensorrt (GroupQueryAttention and "
        "MatMulNBits still run on CUDA)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="hired: refuse larger images (default 64 Mpx)",
    )
    p.add_argument(
        "--stand-in",
        action="store_true",
        help="graphs as Python-backend onnxruntime models (CPU; for a tritonserver without onnxruntime)",
    )
    p.add_argument(
        "--triton-tag",
        default=DEFAULT_TRITON_TAG,
        help=f"container tag to print (default {DEFAULT_TRITON_TAG})",
    )
    return p  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    opts = RepoOptions(
        max_batch=a.max_batch, queue_delay_us=a.queue_delay_us, hired_instances=a.hired_instances,
        gpu_instances=a.gpu_instances, vision_max_batch=a.vision_max_batch, precision=a.precision,
        decoder_accelerator=a.decoder_accelerator, files=a.files, stand_in=a.stand_in, max_pixels=a.max_pixels,
    )  # fmt: skip
    try:
        out = write_repo(a.artifacts, a.out, opts, force=a.force)
    except HiredError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("serve it with:")
    print(docker_command(out, a.triton_tag))
    return 0


if __name__ == "__main__":
    sys.exit(main())
