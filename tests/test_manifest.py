"""The manifest contract: versions, keys, types, paths and hashes are checked before anything runs."""

from __future__ import annotations

import json
import os
import re

import pytest

from runtime.errors import BundleError
from runtime.manifest import FORMAT_VERSION, Manifest, sha256_file

FILES = {
    "vision": "vision.onnx",
    "projector": "projector.onnx",
    "decoder": "decoder.onnx",
    "embed_tokens": "embed_tokens.npy",
    "image_newline": "image_newline.npy",
    "tokenizer": "tokenizer.json",
}


def make_bundle(root, **override):
    for name, rel in FILES.items():
        (root / rel).write_bytes(f"content of {name}".encode())
    data = {
        "format_version": FORMAT_VERSION,
        "model": {"name": "t", "source": "random", "dtype": "fp32", "random_weights": True, "tokenizer": "checkpoint"},
        "files": dict(FILES),
        "sha256": {n: sha256_file(root / r) for n, r in FILES.items()},
        "image_processor": {
            "crop_size": 336, "shortest_edge": 336, "grid_pinpoints": [[336, 672], [672, 336]],
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255,
            "resample": "bicubic",
        },
        "vision": {"num_layers": 6, "heads": 4, "hidden_size": 128, "image_size": 336, "patch_size": 14,
                   "tokens_per_image": 576, "feature_layer": -2, "early_layer": 0, "late_layer": 4},
        "text": {"hidden_size": 128, "num_layers": 2, "num_kv_heads": 2, "head_dim": 32, "vocab_size": 32064,
                 "max_position_embeddings": 4096},
        "tokens": {"image": 32000, "bos": 1, "eos": 2, "pad": 0},
        "prompt": {"template": "[INST] <image>\n{prompt} [/INST]", "add_bos": True, "image_placeholder": "<image>"},
        "graphs": {
            "vision": {"inputs": {"pixel_values": "px"}, "outputs": {"features": "f", "early_scores": "e", "late_scores": "l"}},
            "projector": {"inputs": {"features": "f"}, "outputs": {"projected": "p"}},
            "decoder": {"inputs": {"inputs_embeds": "x", "past_key": "k.{i}", "past_value": "v.{i}"}, "outputs": {"logits": "y"}},
        },
        "hired": {"rate": 0.2, "alpha": 0.5, "distribution": "spatial", "newlines": "none"},
    }  # fmt: skip
    data.update(override)
    (root / "manifest.json").write_text(json.dumps(data))
    return data


def test_valid_bundle_loads_with_every_number(tmp_path):
    make_bundle(tmp_path)
    m = Manifest.from_file(tmp_path)
    assert m.vision.late_layer == 4 and m.image_processor.grid_pinpoints == ((336, 672), (672, 336))
    assert m.path("vision") == (tmp_path / "vision.onnx").resolve()
    assert Manifest.from_dict(m.to_dict()).to_dict() == m.to_dict()


@pytest.mark.parametrize(
    "version, message",
    [
        (FORMAT_VERSION + 1, f"manifest version {FORMAT_VERSION + 1} is newer than this runtime \\({FORMAT_VERSION}\\)"),
        (0, "manifest version 0 is older"),
        ("1", "no integer format_version"),
    ],
)
def test_unknown_versions_are_refused(tmp_path, version, message):
    make_bundle(tmp_path, format_version=version)
    with pytest.raises(BundleError, match=message):
        Manifest.from_file(tmp_path)


def test_unknown_missing_and_mistyped_keys_are_named(tmp_path):
    data = make_bundle(tmp_path)
    data["surprise"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="unknown key\\(s\\) surprise"):
        Manifest.from_file(tmp_path)
    del data["surprise"], data["tokens"]["eos"]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="manifest tokens is missing key 'eos'"):
        Manifest.from_file(tmp_path)
    data["tokens"]["eos"] = "2"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="tokens.eos must be an integer, got '2'"):
        Manifest.from_file(tmp_path)


@pytest.mark.parametrize("bad", ["../outside.onnx", "/etc/passwd", "sub/../../x.onnx"])
def test_file_names_that_leave_the_bundle_are_refused(tmp_path, bad):
    bundle = tmp_path / "b"
    bundle.mkdir()
    data = make_bundle(bundle)
    data["files"]["vision"] = bad
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="outside the bundle"):
        Manifest.from_file(bundle)


def test_symlink_out_of_the_bundle_is_refused(tmp_path):
    bundle = tmp_path / "b"
    bundle.mkdir()
    make_bundle(bundle)
    outside = tmp_path / "evil.onnx"
    outside.write_bytes(b"content of vision")
    (bundle / "vision.onnx").unlink()
    os.symlink(outside, bundle / "vision.onnx")
    with pytest.raises(BundleError, match="resolves outside the bundle folder"):
        Manifest.from_file(bundle)


def test_changed_or_truncated_file_is_a_hash_mismatch_naming_it(tmp_path):
    make_bundle(tmp_path)
    Manifest.from_file(tmp_path)  # writes the verified stamp
    with open(tmp_path / "decoder.onnx", "r+b") as f:
        f.truncate(3)
    with pytest.raises(BundleError, match=re.escape("decoder.onnx sha256 mismatch")):
        Manifest.from_file(tmp_path)


def test_missing_file_is_named(tmp_path):
    make_bundle(tmp_path)
    (tmp_path / "projector.onnx").unlink()
    with pytest.raises(BundleError, match="projector.onnx is missing from the bundle"):
        Manifest.from_file(tmp_path)


def test_no_bundle_and_bad_json_say_what_to_do(tmp_path):
    with pytest.raises(BundleError, match="manifest.json is missing; re-run `make export"):
        Manifest.from_file(tmp_path / "nowhere")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="is not readable JSON"):
        Manifest.from_file(tmp_path)


def test_numbers_are_range_checked_naming_the_key(tmp_path):
    data = make_bundle(tmp_path)
    for section, key, value, message in [
        ("hired", "rate", float("nan"), "hired.rate = nan"),
        ("hired", "rate", 10**400, "hired.rate = an integer of about 401 digits is too large for a number"),
        ("vision", "heads", 0, "vision.heads = 0 is outside"),
        ("text", "vocab_size", 31000, "tokens.image = 32000 is outside \\[0, 30999\\]"),
        ("vision", "patch_size", 15, "vision.image_size 336 is not a multiple of vision.patch_size 15"),
    ]:
        broken = json.loads(json.dumps(data))
        broken[section][key] = value
        with pytest.raises(BundleError, match=message):
            Manifest.from_dict(broken)  # a Python dict: no JSON parser in between


def test_a_dict_nested_too_deep_is_refused_by_from_dict_too(tmp_path):
    data = make_bundle(tmp_path)
    deep: dict = {}
    node = deep
    for _ in range(200):
        node["x"] = {}
        node = node["x"]
    data["export_info"] = {"deep": deep}
    with pytest.raises(BundleError, match="nests more than 32 levels deep at export_info.deep.x.x"):
        Manifest.from_dict(data)


def test_the_verified_stamp_holds_the_manifest_hash_and_keeps_it_when_verified_without_it(tmp_path):
    make_bundle(tmp_path)
    m = Manifest.from_file(tmp_path)
    stamp = json.loads((tmp_path / ".verified.json").read_text())
    assert stamp["manifest"] == sha256_file(tmp_path / "manifest.json")
    assert set(stamp["files"]) == set(FILES.values())
    m.verify_files()  # no manifest hash given: the stamp keeps the one it has
    assert json.loads((tmp_path / ".verified.json").read_text())["manifest"] == stamp["manifest"]
    (tmp_path / "manifest.json").write_text((tmp_path / "manifest.json").read_text() + "\n")
    with pytest.raises(BundleError, match="manifest.json was changed after the bundle was verified"):
        Manifest.from_file(tmp_path)
    Manifest.from_file(tmp_path, verify=False)  # keys and types only: no stamp involved
