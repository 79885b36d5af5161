"""Tampered or broken bundles are refused at Pipeline.load with a BundleError naming the file and the fix.

Bundles are copied between machines by hand, so every test copies the session's tiny bundle and breaks the
copy: the manifest (version, keys, types, paths that leave the folder, symlinks), the graphs (truncated,
swapped, edited after a verified load, inputs that do not match, weights read from outside the folder),
the arrays (a pickled .npy whose payload must never run) and the tokenizer. A last group checks that the
export side never unpickles untrusted checkpoint files nor runs a checkpoint's own code.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime.errors import BundleError, GenerationError
from runtime.manifest import sha256_file
from runtime.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
FIX = re.compile(r"re-?export|re-run|make export|python -m export|upgrade")


# ---- helpers ------------------------------------------------------------------------------------------------
@pytest.fixture
def bundle(tiny_bundle, tmp_path) -> Path:
    """A private copy of the tiny bundle (without the verified stamp) to break."""
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out, ignore=shutil.ignore_patterns(".verified.json"))
    return out


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def write_manifest(bundle: Path, data: dict) -> None:
    (bundle / "manifest.json").write_text(json.dumps(data, indent=1))


def rehash(bundle: Path, data: dict) -> dict:
    """Set every sha256 in `data` to the current file's (what a careful tamperer would do)."""
    data["sha256"] = {name: sha256_file(bundle / rel) for name, rel in data["files"].items()}
    return data


def refused(bundle: Path, *fragments: str) -> str:
    """Pipeline.load(bundle) must raise a one-line BundleError holding every fragment and saying what to do."""
    with pytest.raises(BundleError) as info:
        Pipeline.load(bundle)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert FIX.search(message), f"no fix in: {message}"
    return message


def tiny_graph(inputs, outputs, nodes, initializers=(), domains=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    opsets = [helper.make_opsetid("", 17), *(helper.make_opsetid(d, 1) for d in domains)]
    return helper.make_model(graph, opset_imports=opsets)


# ---- the manifest -------------------------------------------------------------------------------------------
def test_the_untouched_copy_loads(bundle):
    Pipeline.load(bundle).close()


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (lambda d: d.update(format_version=2), ["manifest version 2 is newer", "upgrade"]),
        (lambda d: d.update(format_version=0), ["manifest version 0 is older"]),
        (lambda d: d.update(format_version="1"), ["format_version"]),
        (lambda d: d.pop("format_version"), ["format_version"]),
        (lambda d: d.pop("tokens"), ["missing key 'tokens'"]),
        (lambda d: d["vision"].pop("late_layer"), ["vision is missing key 'late_layer'"]),
        (lambda d: d.update(surprise=True), ["unknown key(s) surprise"]),
        (lambda d: d["tokens"].update(eos="2"), ["tokens.eos must be an integer"]),
        (lambda d: d["vision"].update(early_layer=0.5), ["vision.early_layer must be an integer"]),
        (lambda d: d.update(files=list(d["files"].values())), ["files must be an object"]),
        (lambda d: d["hired"].update(rate="0.2"), ["hired.rate must be a number"]),
        (lambda d: d["prompt"].update(add_bos="yes"), ["prompt.add_bos must be true/false"]),
        (lambda d: d["graphs"]["decoder"].update(inputs=["inputs_embeds"]), ["graphs.decoder.inputs must be an object"]),
        (lambda d: d["files"].pop("decoder"), ["decoder"]),
        (lambda d: d["sha256"].pop("vision"), ["sha256", "vision"]),
        (lambda d: d["prompt"].update(template="no image here {prompt}"), ["template"]),
    ],
    ids=["newer-version", "older-version", "string-version", "no-version", "missing-section", "missing-key",
         "unknown-key", "string-int", "float-int", "list-for-object", "string-number", "string-bool",
         "graph-inputs-list", "missing-file-entry", "missing-hash", "template-without-image"],
)  # fmt: skip
def test_manifest_versions_keys_and_types_are_checked(bundle, edit, fragments):
    data = manifest_of(bundle)
    edit(data)
    write_manifest(bundle, data)
    refused(bundle, *fragments)


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", "null", "\xff\xfe"])
def test_unreadable_manifest_is_refused(bundle, content):
    (bundle / "manifest.json").write_bytes(content.encode("latin-1"))
    refused(bundle, "manifest.json")


def test_missing_manifest_and_missing_folder_are_refused(bundle, tmp_path):
    refused(tmp_path / "nowhere", "manifest.json is missing")
    (bundle / "manifest.json").unlink()
    refused(bundle, "manifest.json is missing")


@pytest.mark.parametrize("escape", ["../outside.onnx", "{outside}", "sub/../../outside.onnx", "/etc/passwd"])
def test_file_names_that_leave_the_bundle_are_refused_even_with_matching_hashes(bundle, escape):
    outside = bundle.parent / "outside.onnx"
    shutil.copy(bundle / "vision.onnx", outside)  # a real vision graph: only the path is wrong
    data = manifest_of(bundle)
    data["files"]["vision"] = escape.format(outside=outside)
    data["sha256"]["vision"] = sha256_file(outside)
    write_manifest(bundle, data)
    refused(bundle, "outside the bundle")


def test_symlinks_out_of_the_bundle_are_refused(bundle):
    outside = bundle.parent / "decoder-elsewhere.onnx"
    shutil.move(bundle / "decoder.onnx", outside)
    os.symlink(outside, bundle / "decoder.onnx")  # same bytes, same hash: only the location is wrong
    refused(bundle, "decoder.onnx", "outside the bundle")


def test_symlinks_inside_the_bundle_and_a_symlinked_bundle_folder_load(bundle, tmp_path):
    (bundle / "graphs").mkdir()
    shutil.move(bundle / "projector.onnx", bundle / "graphs" / "projector.onnx")
    os.symlink("graphs/projector.onnx", bundle / "projector.onnx")
    link = tmp_path / "linked-bundle"
    os.symlink(bundle, link)
    Pipeline.load(link).close()


# ---- the graphs ---------------------------------------------------------------------------------------------
def test_truncated_graph_is_a_hash_mismatch_naming_it(bundle):
    with open(bundle / "decoder.onnx", "r+b") as f:
        f.truncate(1000)
    refused(bundle, "decoder.onnx sha256 mismatch")


def test_swapped_graphs_with_old_hashes_are_a_hash_mismatch(bundle):
    os.replace(bundle / "vision.onnx", bundle / "tmp.onnx")
    os.replace(bundle / "projector.onnx", bundle / "vision.onnx")
    os.replace(bundle / "tmp.onnx", bundle / "projector.onnx")
    refused(bundle, "sha256 mismatch")


def test_swapped_graphs_with_updated_hashes_are_refused_by_their_inputs(bundle):
    os.replace(bundle / "vision.onnx", bundle / "tmp.onnx")
    os.replace(bundle / "projector.onnx", bundle / "vision.onnx")
    os.replace(bundle / "tmp.onnx", bundle / "projector.onnx")
    write_manifest(bundle, rehash(bundle, manifest_of(bundle)))
    refused(bundle, "vision.onnx has no input 'pixel_values'")


def test_a_graph_edited_after_a_verified_load_is_refused_even_with_size_and_mtime_restored(bundle):
    Pipeline.load(bundle).close()  # verifies every hash and writes the verified stamp
    path = bundle / "decoder.onnx"
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only the bytes changed
    refused(bundle, "decoder.onnx sha256 mismatch")


@pytest.mark.parametrize(
    "graph, direction, logical, tensor",
    [
        ("decoder", "inputs", "position_ids", "positions"),
        ("decoder", "inputs", "past_key", "past.{i}.k"),
        ("vision", "outputs", "late_scores", "late"),
        ("projector", "inputs", "features", "x"),
    ],
)
def test_graph_names_that_do_not_match_the_manifest_are_refused(bundle, graph, direction, logical, tensor):
    data = manifest_of(bundle)
    data["graphs"][graph][direction][logical] = tensor
    write_manifest(bundle, data)
    refused(bundle, f"{graph}.onnx has no {direction[:-1]} {tensor.format(i=0)!r}")


def test_a_graph_that_is_not_onnx_is_refused(bundle):
    (bundle / "projector.onnx").write_bytes(b"this is not a protobuf" * 100)
    write_manifest(bundle, rehash(bundle, manifest_of(bundle)))
    refused(bundle, "projector.onnx cannot be loaded by onnxruntime")


def projector_like(extra_nodes=(), initializers=(), domains=()) -> onnx.ModelProto:
    """A graph with the projector's tensor names: image_features [k, 128] -> projected_features [k, 128]."""
    x = helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["k", 128])
    y = helper.make_tensor_value_info("projected_features", TensorProto.FLOAT, ["k", 128])
    nodes = list(extra_nodes) or [helper.make_node("Identity", ["image_features"], ["projected_features"])]
    return tiny_graph([x], [y], nodes, initializers, domains)


@pytest.mark.parametrize("where", ["../secret.bin", "{secret}", "linked.bin"])
def test_graph_weights_read_from_outside_the_bundle_are_refused(bundle, where):
    secret = bundle.parent / "secret.bin"
    np.arange(128, dtype=np.float32).tofile(secret)
    if where == "linked.bin":
        os.symlink(secret, bundle / "linked.bin")
    w = numpy_helper.from_array(np.zeros(128, np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", where.format(secret=secret)), ("offset", "0"), ("length", "512")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    add = helper.make_node("Add", ["image_features", "w"], ["projected_features"])
    (bundle / "projector.onnx").write_bytes(projector_like([add], [w]).SerializeToString())
    write_manifest(bundle, rehash(bundle, manifest_of(bundle)))
    refused(bundle, "projector.onnx cannot be loaded by onnxruntime")


def test_a_graph_with_the_right_names_but_wrong_shapes_fails_its_first_request_in_one_line(bundle):
    # The manifest names tensors but not their ranks, so this loads; the first request must then fail cleanly.
    x = helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["k"])
    y = helper.make_tensor_value_info("projected_features", TensorProto.FLOAT, ["k"])
    graph = tiny_graph([x], [y], [helper.make_node("Identity", ["image_features"], ["projected_features"])])
    (bundle / "projector.onnx").write_bytes(graph.SerializeToString())
    write_manifest(bundle, rehash(bundle, manifest_of(bundle)))
    with Pipeline.load(bundle) as pipe:
        with pytest.raises(GenerationError, match="projector") as info:
            pipe.generate(np.zeros((20, 30, 3), np.uint8), "What is it?", max_new_tokens=1)
    assert "\n" not in str(info.value)


def test_graph_with_an_unknown_custom_op_is_refused(bundle):
    node = helper.make_node("RunShell", ["image_features"], ["projected_features"], domain="com.example.evil")
    (bundle / "projector.onnx").write_bytes(projector_like([node], domains=["com.example.evil"]).SerializeToString())
    write_manifest(bundle, rehash(bundle, manifest_of(bundle)))
    refused(bundle, "projector.onnx cannot be loaded by onnxruntime")


# ---- arrays and tokenizer -----------------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates a file: proof that code from the bundle ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_npy_is_refused_and_its_payload_never_runs(bundle, tmp_path):
    marker = tmp_path / "payload-ran"
    arr = np.empty(1, dtype=object)
    arr[0] = _Payload(marker)
    with open(bundle / "image_newline.npy", "wb") as f:
        np.save(f, arr, allow_pickle=True)
    pickle.loads(pickle.dumps(_Payload(tmp_path / "self-test")))  # the payload does work when unpickled
    assert (tmp_path / "self-test").exists()
    write_manifest(bundle, rehash(bundle, manifest_of(bundle)))
    refused(bundle, "image_newline.npy")
    assert not marker.exists(), "loading the bundle unpickled image_newline.npy"


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("embed_tokens", lambda: np.zeros((3, 4), np.float32), "embed_tokens.npy has shape (3, 4)"),
        ("image_newline", lambda: b"\x93NUMPY garbage", "image_newline.npy is not a numpy array file"),
        ("tokenizer", lambda: b"{}", "tokenizer.json"),
        ("tokenizer", lambda: b"\x00" * 64, "tokenizer.json"),
    ],
)
def test_arrays_and_tokenizer_of_the_wrong_kind_are_refused(bundle, name, content, fragment):
    data = manifest_of(bundle)
    path = bundle / data["files"][name]
    value = content()
    if isinstance(value, np.ndarray):
        np.save(path, value)
    else:
        path.write_bytes(value)
    write_manifest(bundle, rehash(bundle, data))
    refused(bundle, fragment)


# ---- the code never unpickles, evals or trusts remote code --------------------------------------------------
def _calls(folder: str):
    """(file, ast.Call) for every call in the Python files of `folder`."""
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call):
                yield path.relative_to(ROOT), node


def _name(func: ast.expr) -> str:
    return ast.unparse(func)


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def test_code_never_unpickles_untrusted_files_nor_trusts_remote_code():
    problems = []
    for folder in ("export", "models", "runtime", "hired", "bench"):
        for path, call in _calls(folder):
            name = _name(call.func)
            if name.endswith("torch.load"):
                weights_only = _keyword(call, "weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    problems.append(f"{path}:{call.lineno} {name}(...) without weights_only=True")
            if name.startswith(("pickle.", "cPickle.", "dill.", "joblib.", "marshal.")) and "load" in name:
                problems.append(f"{path}:{call.lineno} {name}(...) unpickles")
            remote = _keyword(call, "trust_remote_code")
            if isinstance(remote, ast.Constant) and remote.value is True:
                problems.append(f"{path}:{call.lineno} trust_remote_code=True")
            if name in ("eval", "exec") and folder in ("runtime", "hired"):
                problems.append(f"{path}:{call.lineno} {name}(...)")
    assert not problems, problems


def test_runtime_loads_numpy_files_with_pickles_disallowed():
    loads = [(path, call) for path, call in _calls("runtime") if _name(call.func) in ("np.load", "numpy.load")]
    assert loads, "runtime/ no longer calls np.load: update this test"
    for path, call in loads:
        allow = _keyword(call, "allow_pickle")
        assert isinstance(allow, ast.Constant) and allow.value is False, f"{path}:{call.lineno} np.load without allow_pickle=False"


def _checkpoint_copy(tiny_checkpoint: Path, dest: Path) -> Path:
    shutil.copytree(tiny_checkpoint, dest)
    return dest


@pytest.mark.parametrize("payload", ["malicious", "plain tensors"])
def test_export_refuses_pickled_checkpoint_weights_without_unpickling_them(tiny_checkpoint, tmp_path, payload):
    import torch

    from export.errors import ExportError
    from export.pipeline import load_for_export

    ckpt = _checkpoint_copy(tiny_checkpoint, tmp_path / "ckpt")
    (ckpt / "model.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    if payload == "malicious":
        with open(ckpt / "pytorch_model.bin", "wb") as f:
            pickle.dump({"lm_head.weight": _Payload(marker)}, f)
    else:  # even a harmless-looking pickle is refused: safetensors only
        torch.save({"lm_head.weight": torch.zeros(2)}, ckpt / "pytorch_model.bin")
    with pytest.raises(ExportError, match="pytorch_model.bin.*never loads.*safetensors") as info:
        load_for_export(ckpt, random_weights=False, dtype="fp32")
    assert "\n" not in str(info.value)
    assert not marker.exists(), "exporting unpickled pytorch_model.bin and ran its payload"


def test_export_never_runs_code_shipped_in_a_checkpoint(tiny_checkpoint, tmp_path):
    from export.pipeline import load_for_export

    ckpt = _checkpoint_copy(tiny_checkpoint, tmp_path / "ckpt")
    marker = tmp_path / "remote-code-ran"
    (ckpt / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    for name, auto in (
        ("config.json", {"AutoConfig": "evil.EvilConfig", "AutoModelForImageTextToText": "evil.EvilModel"}),
        ("tokenizer_config.json", {"AutoTokenizer": ["evil.EvilTokenizer", None]}),
        ("processor_config.json", {"AutoProcessor": "evil.EvilProcessor"}),
    ):
        data = json.loads((ckpt / name).read_text())
        data["auto_map"] = auto
        (ckpt / name).write_text(json.dumps(data))
    try:
        load_for_export(ckpt, random_weights=False, dtype="fp32")
    except Exception:  # refusing the checkpoint is fine too; running its code is not
        pass
    assert not marker.exists(), "loading the checkpoint imported its evil.py"
