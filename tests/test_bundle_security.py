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
import subprocess
import sys
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


def test_a_graph_with_the_right_names_but_wrong_ranks_is_refused_at_load(bundle):
    # Issue 16.5: ranks, element types and fixed sizes are checked when the session is created.
    x = helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["k"])
    y = helper.make_tensor_value_info("projected_features", TensorProto.FLOAT, ["k"])
    graph = tiny_graph([x], [y], [helper.make_node("Identity", ["image_features"], ["projected_features"])])
    (bundle / "projector.onnx").write_bytes(graph.SerializeToString())
    write_manifest(bundle, rehash(bundle, manifest_of(bundle)))
    refused(bundle, "projector.onnx input 'image_features'", "rank 1", "rank 2")


def test_a_graph_that_passes_the_load_checks_but_fails_at_run_time_fails_its_first_request_in_one_line(bundle):
    # Declared [k, 128] -> [1, 128] as the checks want; the Gather reads row 100000, which no request has.
    x = helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["k", 128])
    y = helper.make_tensor_value_info("projected_features", TensorProto.FLOAT, ["k", 128])
    row = numpy_helper.from_array(np.array([100_000], np.int64), "row")
    gather = helper.make_node("Gather", ["image_features", "row"], ["projected_features"], axis=0)
    (bundle / "projector.onnx").write_bytes(tiny_graph([x], [y], [gather], [row]).SerializeToString())
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


# ---- the manifest's values (issue 16.4): every number in its range, every choice known, nothing absurd -----
def write_raw(bundle: Path, data: dict, **raw: str) -> None:
    """manifest.json with `data`, where each string value "@key@" is replaced by the JSON text raw[key]
    (numbers json.dumps cannot write: 9999...9 with thousands of digits, NaN spelled otherwise, ...)."""
    text = json.dumps(data, indent=1)
    for key, value in raw.items():
        assert f'"@{key}@"' in text
        text = text.replace(f'"@{key}@"', value)
    (bundle / "manifest.json").write_text(text)


def nested(depth: int, leaf=0):
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


@pytest.mark.parametrize(
    "edit, fragments",
    [
        # HiRED defaults: NaN, infinities, out of range, unknown choices
        (lambda d: d["hired"].update(alpha=float("nan")), ["hired.alpha", "nan"]),
        (lambda d: d["hired"].update(rate=float("-inf")), ["hired.rate"]),
        (lambda d: d["hired"].update(rate=0.0), ["hired.rate = 0.0", "(0.0, 1.0]"]),
        (lambda d: d["hired"].update(rate=1.25), ["hired.rate = 1.25"]),
        (lambda d: d["hired"].update(alpha=-0.125), ["hired.alpha = -0.125", "[0.0, 1.0]"]),
        (lambda d: d["hired"].update(rate=1e300), ["hired.rate"]),
        (lambda d: d["hired"].update(distribution="Spatial"), ["hired.distribution = 'Spatial'", "spatial, official"]),
        (lambda d: d["hired"].update(distribution=""), ["hired.distribution"]),
        (lambda d: d["hired"].update(newlines="row"), ["hired.newlines = 'row'", "none, rows"]),
        # sizes: negative, zero, bools and floats where integers belong, absurdly large
        (lambda d: d["vision"].update(hidden_size=-128), ["vision.hidden_size = -128"]),
        (lambda d: d["vision"].update(heads=0), ["vision.heads = 0"]),
        (lambda d: d["text"].update(num_kv_heads=0), ["text.num_kv_heads = 0"]),
        (lambda d: d["text"].update(head_dim=-32), ["text.head_dim = -32"]),
        (lambda d: d["text"].update(num_layers=True), ["text.num_layers must be an integer, got True"]),
        (lambda d: d["vision"].update(tokens_per_image=576.0), ["vision.tokens_per_image must be an integer"]),
        (lambda d: d["text"].update(vocab_size=2**40), ["text.vocab_size = 1099511627776"]),
        (lambda d: d["text"].update(max_position_embeddings=0), ["text.max_position_embeddings = 0"]),
        (lambda d: d["text"].update(num_layers=10**30), ["text.num_layers"]),
        (lambda d: d["vision"].update(num_layers=-6), ["vision.num_layers = -6"]),
        # image processor numbers
        (lambda d: d["image_processor"].update(image_std=[0.27, 0.0, 0.28]), ["image_processor.image_std[1] = 0.0"]),
        (lambda d: d["image_processor"].update(image_mean=[0.5, float("inf"), 0.4]), ["image_processor.image_mean[1]"]),
        (lambda d: d["image_processor"].update(rescale_factor=-1 / 255), ["image_processor.rescale_factor"]),
        (lambda d: d["image_processor"].update(image_std=[1e308, 0.5, 0.5]), ["image_processor.image_std[0]"]),
        (lambda d: d["image_processor"].update(resample="cubic"), ["image_processor.resample = 'cubic'", "bicubic"]),
        (lambda d: d["image_processor"].update(grid_pinpoints=[[336, 500]]), ["grid_pinpoints[0] = [336, 500]", "crop_size 336"]),
        (lambda d: d["image_processor"].update(grid_pinpoints=[[336, 336 * 200]]), ["grid_pinpoints[0] = 67200"]),
        (lambda d: d["image_processor"].update(grid_pinpoints=[[0, 336]]), ["grid_pinpoints[0] = 0"]),
        (lambda d: d["image_processor"].update(shortest_edge=-336), ["image_processor.shortest_edge = -336"]),
        # layers the vision graph does not run
        (lambda d: d["vision"].update(feature_layer=9), ["vision.feature_layer = 9"]),
        (lambda d: d["vision"].update(late_layer=5), ["vision.late_layer = 5", "vision.feature_layer -2"]),
        (lambda d: d["vision"].update(early_layer=-1), ["vision.early_layer = -1"]),
        # choices, hashes, tensor names
        (lambda d: d["model"].update(dtype="bf8"), ["model.dtype = 'bf8'", "fp32, fp16"]),
        (lambda d: d["sha256"].update(vision="abc123"), ["sha256.vision = 'abc123'", "not a sha256"]),
        (lambda d: d["sha256"].update(ghost="0" * 64), ["sha256.ghost has no entry in files"]),
        (lambda d: d["graphs"]["decoder"]["inputs"].update(past_key="past.{layer}.key"), ["graphs.decoder.inputs.past_key"]),
        (lambda d: d["graphs"]["decoder"]["outputs"].update(present_value="present.{}.value"), ["graphs.decoder.outputs.present_value"]),
        (lambda d: d["graphs"]["vision"]["outputs"].update(features=""), ["graphs.vision.outputs.features"]),
        (lambda d: d["graphs"]["decoder"]["inputs"].pop("inputs_embeds"), ["graphs.decoder.inputs has no inputs_embeds"]),
        (lambda d: d["graphs"]["vision"]["outputs"].pop("late_scores"), ["graphs.vision.outputs has no late_scores"]),
        (lambda d: d["prompt"].update(image_placeholder=" "), ["prompt"]),
        # file names no file system holds
        (lambda d: d["files"].update(projector="projector\x00.onnx"), ["files.projector", "control character"]),
        (lambda d: d["files"].update(tokenizer="tok\nenizer.json"), ["files.tokenizer", "control character"]),
        (lambda d: d["files"].update(vision="v" * 256 + ".onnx"), ["files.vision", "longer than a file system allows"]),
        (lambda d: d["files"].update(decoder="deep/" * 900 + "decoder.onnx"), ["files.decoder", "longer than a file system allows"]),
        (lambda d: d["files"].update(embed_tokens="\ud834.npy"), ["files.embed_tokens", "cannot be encoded"]),
        (lambda d: d["files"].update(image_newline=""), ["files.image_newline", "not a file name"]),
        # absurd nesting that json.loads still parses
        (lambda d: d["export_info"].update(deep=nested(40)), ["nests more than 32 levels", "export_info.deep"]),
    ],
    ids=["alpha-nan", "rate-minus-inf", "rate-zero", "rate-above-1", "alpha-negative", "rate-huge-float",
         "distribution-case", "distribution-empty", "newlines-unknown", "negative-width", "zero-heads",
         "zero-kv-heads", "negative-head-dim", "bool-for-int", "float-for-int", "huge-vocab", "zero-context",
         "30-digit-layers", "negative-layers", "zero-std", "infinite-mean", "negative-rescale", "huge-std",
         "unknown-resample", "pinpoint-not-crops", "pinpoint-too-many-crops", "pinpoint-zero",
         "negative-edge", "feature-layer-past-tower", "late-layer-not-run", "early-layer-negative", "unknown-dtype",
         "short-hash", "hash-without-file", "tensor-name-unknown-field", "tensor-name-empty-field",
         "tensor-name-empty", "missing-logical-input", "missing-logical-output", "blank-placeholder",
         "nul-in-file-name", "newline-in-file-name", "file-name-too-long", "path-too-long", "unencodable-file-name",
         "empty-file-name", "nesting-40"],
)  # fmt: skip
def test_manifest_values_out_of_range_or_unknown_are_refused_naming_the_key(bundle, edit, fragments):
    data = manifest_of(bundle)
    edit(data)
    write_manifest(bundle, data)
    refused(bundle, *fragments)


@pytest.mark.parametrize(
    "where, raw, fragments",
    [
        (("text", "vocab_size"), "9" * 4400, ["text.vocab_size is an integer of 4400 digits"]),
        (("tokens", "eos"), "-" + "1" * 12000, ["tokens.eos is an integer of 12000 digits"]),
        (("hired", "alpha"), "7" * 4301, ["hired.alpha is an integer of 4301 digits"]),
        (("export_info", "seed"), "3" * 6000, ["export_info.seed is an integer of 6000 digits"]),
        (("format_version",), "1" + "0" * 5000, ["format_version", "5001 digits"]),
        (("hired", "rate"), "-Infinity", ["hired.rate = -inf"]),
        (("image_processor", "rescale_factor"), "1e999", ["image_processor.rescale_factor = inf"]),
        (("vision", "heads"), "NaN", ["vision.heads must be an integer, got nan"]),
        (("hired", "rate"), "1" + "0" * 400, ["hired.rate is an integer of 401 digits"]),
        (("export_info", "deep"), "[" * 3000 + "]" * 3000, ["nests more than 32 levels", "export_info.deep"]),
        (("export_info", "deep"), '{"a": ' * 2500 + "1" + "}" * 2500, ["nests more than 32 levels", "export_info.deep.a.a"]),
    ],
    ids=["4400-digit-int", "12000-digit-negative", "4301-digit-float-field", "huge-int-in-free-form",
         "huge-version", "minus-infinity", "overflowing-float", "nan-for-int", "400-digit-float", "3000-deep-lists",
         "2500-deep-objects"],
)  # fmt: skip
def test_numbers_and_nesting_json_cannot_hold_are_refused_naming_the_key(bundle, where, raw, fragments):
    data = manifest_of(bundle)
    target = data
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = "@value@"
    write_raw(bundle, data, value=raw)
    refused(bundle, *fragments)


def test_an_oversized_manifest_is_refused_without_parsing_it(bundle):
    data = manifest_of(bundle)
    data["export_info"]["notes"] = "x" * (2 << 20)
    write_manifest(bundle, data)
    refused(bundle, "manifest.json is", "bytes, more than any manifest needs")


@pytest.mark.parametrize(
    "raw, fragments",
    [
        ("9" * 4500, ["manifest.json must hold a JSON object"]),
        ("[" * 100_000, ["nests more than 32 levels", "[0][0][0]"]),
        ('{"format_version": ' * 200 + "1" + "}" * 200, ["nests more than 32 levels", "format_version.format_version"]),
    ],
    ids=["huge-int-alone", "100k-brackets", "deep-top-level-key"],
)
def test_manifest_files_that_are_one_absurd_value_are_refused(bundle, raw, fragments):
    (bundle / "manifest.json").write_text(raw)
    refused(bundle, *fragments)


@pytest.mark.parametrize(
    "key, raw",
    [(("text", "hidden_size"), "8" * 7000), (("files", "vision"), '"vision\\u0000.onnx"'), (("hired", "newlines"), '"cols"')],
    ids=["7000-digit-int", "nul-file-name", "unknown-newlines"],
)
def test_the_cli_refuses_a_bad_manifest_in_one_line_with_exit_2(bundle, tmp_path, key, raw):
    data = manifest_of(bundle)
    data[key[0]][key[1]] = "@value@"
    write_raw(bundle, data, value=raw)
    image = tmp_path / "img.png"
    from PIL import Image

    Image.new("RGB", (24, 16), (120, 30, 200)).save(image)
    cmd = [sys.executable, "-m", "runtime.infer", "--artifacts", str(bundle), "--image", str(image), "--prompt", "Hi"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert f"{key[0]}.{key[1]}" in lines[0] and FIX.search(lines[0]), lines[0]


# ---- consistent but wrong (issue 16.5): hashes updated, the parts disagree --------------------------------------
def projector_graph(in_width=128, out_width=128, in_type=TensorProto.FLOAT, out_type=TensorProto.FLOAT):
    """image_features [k, in_width] -> projected_features [k, out_width] of the given element types."""
    x = helper.make_tensor_value_info("image_features", in_type, ["k", in_width])
    y = helper.make_tensor_value_info("projected_features", out_type, ["k", out_width])
    w = numpy_helper.from_array(np.zeros((in_width, out_width), np.float32), "w")
    nodes = [helper.make_node("Cast", ["image_features"], ["xf"], to=TensorProto.FLOAT)]
    nodes.append(helper.make_node("MatMul", ["xf", "w"], ["yf"]))
    nodes.append(helper.make_node("Cast", ["yf"], ["projected_features"], to=out_type))
    return tiny_graph([x], [y], nodes, [w])


def swap_projector(bundle: Path, model: onnx.ModelProto) -> None:
    (bundle / "projector.onnx").write_bytes(model.SerializeToString())
    write_manifest(bundle, rehash(bundle, manifest_of(bundle)))


@pytest.mark.parametrize(
    "model, fragments",
    [
        (lambda: projector_graph(out_width=96), ["projector.onnx output 'projected_features'", "96", "text.hidden_size", "128"]),
        (lambda: projector_graph(out_width=4096), ["projector.onnx output 'projected_features'", "4096", "text.hidden_size"]),
        (lambda: projector_graph(in_width=64), ["projector.onnx input 'image_features'", "64", "vision.hidden_size", "128"]),
        (lambda: projector_graph(in_type=TensorProto.INT64), ["projector.onnx input 'image_features'", "tensor(int64)", "tensor(float)"]),
        (lambda: projector_graph(in_type=TensorProto.BFLOAT16), ["projector.onnx input 'image_features'", "tensor(bfloat16)"]),
        (lambda: projector_graph(out_type=TensorProto.DOUBLE), ["projector.onnx output 'projected_features'", "tensor(double)"]),
        (lambda: projector_graph(out_type=TensorProto.INT32), ["projector.onnx output 'projected_features'", "tensor(int32)"]),
    ],
    ids=["narrower-output", "wider-output", "narrower-input", "int-input", "bfloat16-input", "double-output", "int-output"],
)  # fmt: skip
def test_a_projector_that_disagrees_with_the_manifest_is_refused_naming_both(bundle, model, fragments):
    swap_projector(bundle, model())
    refused(bundle, *fragments)


@pytest.mark.parametrize(
    "edit, fragments",
    [
        # manifest numbers against the graphs
        (lambda d: d["text"].update(num_kv_heads=4), ["decoder.onnx input 'past_key_values.0.key'", "text.num_kv_heads is 4"]),
        (lambda d: d["text"].update(head_dim=16), ["decoder.onnx input 'past_key_values.0.key'", "text.head_dim is 16"]),
        (lambda d: d["text"].update(hidden_size=256), ["projector.onnx output 'projected_features'", "text.hidden_size (the decoder's width) is 256"]),
        (lambda d: d["vision"].update(hidden_size=64), ["vision.onnx output 'image_features'", "vision.hidden_size is 64"]),
        (lambda d: d["vision"].update(patch_size=12, tokens_per_image=784),
         ["vision.onnx output 'image_features'", "576", "vision.tokens_per_image is 784"]),
        (lambda d: (d["vision"].update(image_size=448, tokens_per_image=1024),
                    d["image_processor"].update(crop_size=448, shortest_edge=448, grid_pinpoints=[[448, 896]])),
         ["vision.onnx input 'pixel_values'", "336", "vision.image_size is 448"]),
        # manifest numbers against each other
        (lambda d: d["vision"].update(patch_size=13), ["vision.image_size 336 is not a multiple of vision.patch_size 13"]),
        (lambda d: d["vision"].update(patch_size=16), ["vision.tokens_per_image 576", "(vision.image_size 336 / vision.patch_size 16)"]),
        (lambda d: d["vision"].update(patch_size=400), ["vision.patch_size = 400", "at most vision.image_size"]),
        (lambda d: d["vision"].update(tokens_per_image=575), ["vision.tokens_per_image 575", "= 576"]),
        (lambda d: d["vision"].update(heads=5), ["vision.hidden_size 128 is not a multiple of vision.heads 5"]),
        (lambda d: d["image_processor"].update(crop_size=168, grid_pinpoints=[[336, 672]]),
         ["image_processor.crop_size 168 is not vision.image_size 336"]),
        (lambda d: d["tokens"].update(bos=32064), ["tokens.bos = 32064", "text.vocab_size is 32064"]),
        (lambda d: d["tokens"].update(eos=-3), ["tokens.eos = -3"]),
        (lambda d: d["tokens"].update(image=70000), ["tokens.image = 70000"]),
        (lambda d: d["tokens"].update(pad=-1), ["tokens.pad = -1"]),
    ],
    ids=["kv-heads", "head-dim", "text-width", "vision-width", "tokens-per-image-vs-graph", "image-size-vs-graph",
         "patch-does-not-divide", "tokens-per-image-vs-patch", "patch-larger-than-image", "tokens-per-image-off-by-one",
         "heads-do-not-divide", "crop-size-vs-image-size", "bos-past-vocab", "negative-eos", "image-id-past-vocab",
         "negative-pad"],
)  # fmt: skip
def test_manifest_numbers_that_disagree_with_the_graphs_or_each_other_are_refused(bundle, edit, fragments):
    data = manifest_of(bundle)
    edit(data)
    write_manifest(bundle, data)
    refused(bundle, *fragments)


def test_a_decoder_vocabulary_larger_than_the_embedding_table_is_refused(bundle):
    # The table shrunk to 32050 rows and the manifest to match: the decoder still scores 32064 tokens.
    table = np.load(bundle / "embed_tokens.npy")
    np.save(bundle / "embed_tokens.npy", table[:32050])
    data = manifest_of(bundle)
    data["text"]["vocab_size"] = 32050
    write_manifest(bundle, rehash(bundle, data))
    refused(bundle, "decoder.onnx output 'logits'", "32064", "text.vocab_size (the embedding table's rows) is 32050")


@pytest.mark.parametrize(
    "name, make, fragments",
    [
        ("embed_tokens", lambda a: a.astype(np.int32), ["embed_tokens.npy holds int32", "float32 or float16"]),
        ("embed_tokens", lambda a: a.astype(np.float64), ["embed_tokens.npy holds float64"]),
        ("embed_tokens", lambda a: a.T.copy(), ["embed_tokens.npy has shape (128, 32064)"]),
        ("embed_tokens", lambda a: a[:, :64].copy(), ["embed_tokens.npy has shape (32064, 64)"]),
        ("image_newline", lambda a: a.astype(np.complex64), ["image_newline.npy holds complex64"]),
        ("image_newline", lambda a: (a > 0), ["image_newline.npy holds bool"]),
        ("image_newline", lambda a: a[None], ["image_newline.npy has shape (1, 128)"]),
    ],
    ids=["int-table", "float64-table", "transposed-table", "narrow-table", "complex-newline", "bool-newline",
         "2d-newline"],
)  # fmt: skip
def test_arrays_of_the_wrong_dtype_or_shape_are_refused_naming_them(bundle, name, make, fragments):
    data = manifest_of(bundle)
    path = bundle / data["files"][name]
    np.save(path, make(np.load(path)))
    write_manifest(bundle, rehash(bundle, data))
    refused(bundle, *fragments)


def test_a_tokenizer_with_ids_past_the_embedding_table_is_refused(bundle):
    data = manifest_of(bundle)
    path = bundle / data["files"]["tokenizer"]
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    piece = next(p for p, i in vocab.items() if i == 31_999)
    vocab[piece] = 40_000  # the same pieces, one renumbered past the embedding table's rows
    path.write_text(json.dumps(tok))
    write_manifest(bundle, rehash(bundle, data))
    refused(bundle, "tokenizer.json has token id 40000", "text.vocab_size (the embedding table's rows) is 32064")


# ---- the verified stamp covers manifest.json too ----------------------------------------------------------------
@pytest.mark.parametrize(
    "edit",
    [lambda d: d["hired"].update(alpha=0.25), lambda d: d["model"].update(name="renamed"), lambda d: None],
    ids=["valid-number", "free-text", "reformatted"],
)
def test_a_manifest_edited_after_a_verified_load_is_refused_until_the_stamp_is_removed(bundle, edit):
    Pipeline.load(bundle).close()  # writes .verified.json with the manifest's sha256
    data = manifest_of(bundle)
    edit(data)
    (bundle / "manifest.json").write_text(json.dumps(data, indent=3))  # even a change of layout only is noticed
    refused(bundle, "manifest.json was changed after the bundle was verified", ".verified.json")
    (bundle / ".verified.json").unlink()  # what the message offers for an edit on purpose
    Pipeline.load(bundle).close()
    Pipeline.load(bundle).close()  # stamped again: the edited manifest is now the verified one


def test_a_stamp_from_an_older_runtime_or_a_broken_stamp_only_means_hashing_again(bundle):
    data = manifest_of(bundle)
    old = {rel: [1, 2, 3, 4, data["sha256"][name]] for name, rel in data["files"].items()}  # the flat old layout
    for stamp in (json.dumps(old), "[" * 50_000, "9" * 5000, '{"manifest": 5, "files": []}'):
        (bundle / ".verified.json").write_text(stamp)
        Pipeline.load(bundle).close()
    assert json.loads((bundle / ".verified.json").read_text())["manifest"] == sha256_file(bundle / "manifest.json")


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
