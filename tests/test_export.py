"""export/: the tiny checkpoint -> bundle: files and manifest, graph structure, parity with PyTorch, CLI errors, atomicity."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export import __main__ as cli
from export.bundle import file_table
from export.decoder import export_decoder
from export.errors import ExportError, VerificationError
from export.pipeline import export_model
from export.projector import export_projector
from export.verify import compare, verify_bundle
from models import registry
from runtime.manifest import MANIFEST_NAME, STAMP_NAME, Manifest

ROOT = Path(__file__).resolve().parents[1]
EXPECTED_FILES = {
    "vision": "vision.onnx",
    "projector": "projector.onnx",
    "decoder": "decoder.onnx",
    "embed_tokens": "embed_tokens.npy",
    "image_newline": "image_newline.npy",
    "tokenizer": "tokenizer.json",
}
TOKENS = 577  # CLS + 24 x 24 patches
# A manifest.json as this project writes it (the keys export.staging.is_bundle looks for), standing for an old bundle.
OLD_MANIFEST = json.dumps({"format_version": 1, "files": {}, "sha256": {}, "hired": {}, "note": "old bundle"})


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    from transformers import LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration.from_pretrained(str(tiny_checkpoint), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def vision_graph(tiny_bundle) -> onnx.ModelProto:
    return onnx.load(str(tiny_bundle / "vision.onnx"))


def shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Tensor name -> shape (ints and dim names) for every value the exporter annotated."""
    values = [*model.graph.value_info, *model.graph.input, *model.graph.output]
    return {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in values}


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def nearest_upstream(model: onnx.ModelProto, tensor: str, op_type: str) -> onnx.NodeProto:
    """The first node of `op_type` met walking back (breadth-first) from `tensor`."""
    made_by = producers(model)
    frontier, seen = [tensor], set()
    while frontier:
        name = frontier.pop(0)
        node = made_by.get(name)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == op_type:
            return node
        frontier.extend(node.input)
    raise AssertionError(f"no {op_type} upstream of {tensor}")


# ---------------------------------------------------------------------------------------------- bundle
def test_bundle_holds_exactly_the_listed_files_and_passes_the_hash_check(tiny_bundle):
    m = Manifest.from_file(tiny_bundle)  # checks keys, types and every sha256
    assert m.files == EXPECTED_FILES  # tiny graphs are far below 2 GB: no external data
    on_disk = {p.name for p in tiny_bundle.iterdir()} - {STAMP_NAME}
    assert on_disk == set(EXPECTED_FILES.values()) | {MANIFEST_NAME}


def test_manifest_numbers_come_from_the_checkpoint(tiny_bundle, tiny_checkpoint):
    m = Manifest.from_file(tiny_bundle)
    entry = registry.get("tiny")
    assert (m.model.name, m.model.dtype, m.model.random_weights) == ("tiny", "fp32", True)
    assert m.model.tokenizer.startswith("offline-mistral-sp")
    assert (m.vision.num_layers, m.vision.heads, m.vision.hidden_size) == (6, 4, 128)
    assert (m.vision.feature_layer, m.vision.early_layer, m.vision.late_layer) == (-2, 0, 4)
    assert m.vision.tokens_per_image == 576
    assert (m.text.num_layers, m.text.num_kv_heads, m.text.head_dim, m.text.vocab_size) == (2, 2, 32, 32064)
    assert m.text.max_position_embeddings == 32768
    assert (m.tokens.image, m.tokens.bos, m.tokens.eos, m.tokens.pad) == (32000, 1, 2, 0)
    assert m.image_processor.grid_pinpoints == ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    assert (m.image_processor.crop_size, m.image_processor.shortest_edge, m.image_processor.resample) == (
        336,
        336,
        "bicubic",
    )
    assert m.image_processor.rescale_factor == pytest.approx(1 / 255)
    assert m.image_processor.image_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert (m.prompt.template, m.prompt.add_bos) == (entry.prompt_template, True)
    assert (m.hired.rate, m.hired.alpha, m.hired.distribution, m.hired.newlines) == (0.2, 0.5, "spatial", "none")
    assert m.graphs["decoder"].inputs["past_key"] == "past_key_values.{i}.key"
    assert m.graphs["decoder"].outputs["present_value"] == "present.{i}.value"
    assert m.graphs["vision"].outputs == {
        "features": "image_features",
        "early_scores": "early_scores",
        "late_scores": "late_scores",
    }
    assert m.export_info["opset"] == 23 and m.export_info["min_onnxruntime"] == "1.23"
    assert set(m.export_info["versions"]) >= {"torch", "transformers", "onnx"}


def test_arrays_and_tokenizer_match_the_checkpoint(tiny_bundle, tiny_model):
    from tokenizers import Tokenizer

    embed = np.load(tiny_bundle / "embed_tokens.npy")
    newline = np.load(tiny_bundle / "image_newline.npy")
    assert embed.dtype == np.float32 and embed.shape == (32064, 128)
    np.testing.assert_array_equal(embed, tiny_model.get_input_embeddings().weight.detach().numpy())
    np.testing.assert_array_equal(newline, tiny_model.model.image_newline.detach().numpy())
    tok = Tokenizer.from_file(str(tiny_bundle / "tokenizer.json"))
    assert tok.token_to_id("<image>") == 32000


def test_every_graph_passes_the_onnx_checker_with_the_contract_tensor_names(tiny_bundle):
    io = {}
    for name in ("vision", "projector", "decoder"):
        path = tiny_bundle / f"{name}.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        io[name] = ([i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()])
    assert io["vision"] == (["pixel_values"], ["image_features", "early_scores", "late_scores"])
    assert io["projector"] == (["image_features"], ["projected_features"])
    kv_in = [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    kv_out = [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert io["decoder"] == (["inputs_embeds", "attention_mask", "position_ids", *kv_in], ["logits", *kv_out])


# ---------------------------------------------------------------------------------------------- vision graph
def test_vision_graph_stops_before_the_last_encoder_block(vision_graph, tiny_model):
    ops = [n.op_type for n in vision_graph.graph.node]
    assert ops.count("Attention") == 5  # blocks 0..4 of 6 run their (fused) attention; block 5 is absent
    tower = tiny_model.model.vision_tower
    weights = sum(int(np.prod(t.dims)) for t in vision_graph.graph.initializer)
    without_tail = sum(p.numel() for p in tower.parameters()) - sum(
        p.numel() for m in (tower.encoder.layers[5], tower.post_layernorm) for p in m.parameters()
    )
    assert weights <= without_tail


def test_scores_are_one_cls_query_row_not_a_full_attention_matrix(vision_graph):
    shape = shapes(vision_graph)
    for output in ("early_scores", "late_scores"):
        softmax = nearest_upstream(vision_graph, output, "Softmax")
        assert shape[softmax.input[0]] == ["crops", 4, 1, TOKENS]  # [crops, heads, 1 query, 577 keys]
        matmul = nearest_upstream(vision_graph, softmax.input[0], "MatMul")
        query, keys = (shape[i] for i in matmul.input)
        assert query[-2] == 1 and keys[-1] == TOKENS
    full = [n for n in vision_graph.graph.node if shape.get(n.output[0], [])[-2:] == [TOKENS, TOKENS]]
    assert full == []  # no [.., 577, 577] tensor anywhere in the graph


def test_vision_axes_are_dynamic_and_scores_float32(tiny_bundle):
    sess = ort.InferenceSession(str(tiny_bundle / "vision.onnx"), providers=["CPUExecutionProvider"])
    for crops in (1, 3, 6):
        features, early, late = sess.run(None, {"pixel_values": np.zeros((crops, 3, 336, 336), np.float32)})
        assert features.shape == (crops, 576, 128)
        assert early.shape == late.shape == (crops, 576) and early.dtype == late.dtype == np.float32
        assert np.all(early >= 0) and np.all(early.sum(axis=1) < 4.0)  # 4 heads, CLS column excluded


# ---------------------------------------------------------------------------------------------- parity
def test_verify_passes_with_tiny_errors_and_twenty_equal_greedy_tokens(tiny_bundle, tiny_model):
    lines = []
    report = verify_bundle(tiny_bundle, tiny_model, log=lines.append)
    assert report.ok
    assert report.ort_tokens == report.torch_tokens and len(report.torch_tokens) == 20
    names = [c.name for c in report.checks]
    assert sum("vision" in n for n in names) == 6 and any("projector" in n for n in names)
    assert all(c.rel < 1e-4 for c in report.checks)
    assert any("20/20 steps agree" in line for line in lines)


def test_verify_fails_loudly_when_the_graphs_come_from_other_weights(tiny_bundle, tiny_checkpoint):
    from transformers import LlavaNextForConditionalGeneration

    other = LlavaNextForConditionalGeneration.from_pretrained(str(tiny_checkpoint), dtype=torch.float32).eval()
    with torch.no_grad():
        other.model.multi_modal_projector.linear_2.bias.add_(0.5)
    with pytest.raises(VerificationError, match=r"projector \(123 kept tokens\)"):
        verify_bundle(tiny_bundle, other)


def test_compare_is_relative_to_the_reference_scale():
    ref = np.array([0.0, 2.0, -4.0])
    check = compare("x", ref + np.array([0.0, 0.0, 4e-4]), ref, tol=1e-4)
    assert check.max_abs == pytest.approx(4e-4) and check.rel == pytest.approx(1e-4) and check.ok
    assert not compare("x", ref + 1e-3, ref, tol=1e-4).ok
    assert not compare("x", np.array([np.nan, 2.0, -4.0]), ref, tol=1e-4).ok


def test_decoder_exports_at_opset_18_and_runs_with_an_empty_past(tmp_path):
    from models.build import random_model

    config = registry.get("tiny").llava_config()
    config.text_config.num_hidden_layers = 1  # one block keeps this second decoder export short
    model = random_model(config, seed=0)
    path = export_decoder(model, tmp_path / "decoder18.onnx", opset=18)
    graph = onnx.load(str(path))
    assert {o.domain: o.version for o in graph.opset_import}[""] == 18
    assert "Attention" not in {n.op_type for n in graph.graph.node}  # opset 18 has no Attention op
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    embeds = np.random.default_rng(0).normal(0, 0.02, (1, 31, 128)).astype(np.float32)

    def run(chunk, start, past):
        feeds = {
            "inputs_embeds": chunk,
            "attention_mask": np.ones((1, start + chunk.shape[1]), np.int64),
            "position_ids": np.arange(start, start + chunk.shape[1])[None],
            "past_key_values.0.key": past[0],
            "past_key_values.0.value": past[1],
        }
        return sess.run(None, feeds)

    empty = [np.zeros((1, 2, 0, 32), np.float32)] * 2
    logits, *present = run(embeds[:, :30], 0, empty)  # prefill
    step_logits, *step_present = run(embeds[:, 30:], 30, present)  # one decode step
    with torch.no_grad():
        hidden = model.model.language_model(inputs_embeds=torch.from_numpy(embeds)).last_hidden_state
        ref = model.lm_head(hidden).numpy()
    assert logits.shape == (1, 1, 32064) and present[0].shape == (1, 2, 30, 32) and step_present[0].shape == (1, 2, 31, 32)
    assert compare("prefill", logits[0, 0], ref[0, 29], 1e-4).ok
    assert compare("step", step_logits[0, 0], ref[0, 30], 1e-4).ok


def test_external_data_goes_to_one_file_beside_the_graph(tiny_model, tmp_path):
    path = export_projector(tiny_model, tmp_path / "projector.onnx", opset=23, external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["projector.onnx", "projector.onnx.data"]
    files, sha = file_table(tmp_path, {"projector": "projector.onnx"})
    assert files == {"projector": "projector.onnx", "projector_data": "projector.onnx.data"} and set(sha) == set(files)
    x = np.random.default_rng(0).normal(size=(9, 128)).astype(np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image_features": x})[0]
    with torch.no_grad():
        ref = tiny_model.model.multi_modal_projector(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- CLI errors
def run_main(capsys, *args) -> tuple[int, str]:
    code = cli.main(list(args))
    return code, capsys.readouterr().err


def leftovers(parent: Path) -> list[str]:
    """Staging or old-bundle folders left beside bundles in `parent`."""
    return sorted(p.name for p in parent.iterdir() if ".export-" in p.name or ".old-" in p.name)


def test_unknown_model_name_lists_the_known_ones_with_exit_code_2(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run(
        [sys.executable, "-m", "export", "--model", "llava-next-70b", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2
    error = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "llava-next-70b" in error[0]
    for name in registry.names():
        assert name in error[0]
    assert list(tmp_path.iterdir()) == []


def test_registry_model_not_on_disk_gets_the_download_hint(capsys, tmp_path, monkeypatch):
    from models.load import CheckpointNotFound, resolve_checkpoint

    try:
        resolve_checkpoint("llava-next-7b")
        pytest.skip("llava-next-7b is on this machine")
    except CheckpointNotFound:
        pass
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # online it downloads (test_download.py)
    code, err = run_main(capsys, "--model", "llava-next-7b", "--out", str(tmp_path / "out"))
    assert code == 2 and "download llava-hf/llava-v1.6-vicuna-7b-hf" in err and "--random-weights" in err
    assert "HF_HUB_OFFLINE" in err
    assert list(tmp_path.iterdir()) == []


def test_existing_out_without_force_is_refused_and_left_alone(capsys, tmp_path, tiny_checkpoint):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "manifest.json").write_text(OLD_MANIFEST)
    (out / "keep.txt").write_text("old")
    code, err = run_main(capsys, "--model", str(tiny_checkpoint), "--out", str(out))
    assert code == 2 and "already exists; pass --force" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "manifest.json"] and leftovers(tmp_path) == []


def test_folder_that_is_not_llava_next_is_refused(capsys, tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    code, err = run_main(capsys, "--model", str(folder), "--out", str(tmp_path / "out"))
    assert code == 2 and "is not a LLaVA-NeXT or LLaVA-1.5 checkpoint" in err and "'bert'" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_checkpoint_without_tokenizer_is_refused_unless_random_weights(capsys, tmp_path, tiny_checkpoint):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for f in ("config.json", "model.safetensors", "prompt_template.json"):
        shutil.copy(tiny_checkpoint / f, folder / f)
    code, err = run_main(capsys, "--model", str(folder), "--out", str(tmp_path / "out"))
    assert code == 2 and "has no tokenizer" in err and "--random-weights" in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_unwritable_out_is_refused(capsys, tmp_path, tiny_checkpoint):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, err = run_main(capsys, "--model", str(tiny_checkpoint), "--out", str(blocker / "bundle"))
    assert code == 2 and "cannot write to" in err
    code, err = run_main(capsys, "--model", str(tiny_checkpoint), "--out", str(blocker), "--force")
    assert code == 2 and "is not a folder" in err


def test_help_explains_every_flag_and_the_onnxruntime_versions(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--model", "--out", "--random-weights", "--dtype", "--opset", "--verify", "--force"):
        assert flag in text
    assert "onnxruntime >= 1.23" in text and "onnxruntime >= 1.14" in text


# ---------------------------------------------------------------------------------------------- atomicity
@pytest.fixture
def fake_graphs(monkeypatch):
    """Replace the three graph writers with instant ones; the decoder's can be told to fail half-way."""
    state = {"fail": None}

    def small(model, path, *, opset, external_data=None):
        Path(path).write_bytes(b"graph")
        return Path(path)

    def decoder(model, path, *, opset, external_data=None):
        Path(path).write_bytes(b"half a decod")
        if state["fail"] is not None:
            raise state["fail"]
        Path(path).write_bytes(b"decoder")
        return Path(path)

    monkeypatch.setattr("export.vision.export_vision", small)
    monkeypatch.setattr("export.projector.export_projector", small)
    monkeypatch.setattr("export.decoder.export_decoder", decoder)
    return state


@pytest.mark.parametrize("failure", [RuntimeError("exporter crashed"), KeyboardInterrupt()])
def test_a_failed_export_leaves_the_old_bundle_and_no_partial_one(tmp_path, tiny_checkpoint, fake_graphs, failure):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "manifest.json").write_text(OLD_MANIFEST)
    fake_graphs["fail"] = failure
    with pytest.raises(type(failure)) as raised:
        export_model(tiny_checkpoint, out, force=True, log=lambda _m: None)
    assert [p.name for p in out.iterdir()] == ["manifest.json"]
    assert (out / "manifest.json").read_text() == OLD_MANIFEST
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    if isinstance(failure, KeyboardInterrupt):  # the message says what is on disk
        assert f"nothing was written: {out} still holds the previous bundle" in str(raised.value)


def test_force_replaces_the_old_bundle_as_a_whole(tmp_path, tiny_checkpoint, fake_graphs):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "manifest.json").write_text(OLD_MANIFEST)
    (out / "stale.onnx").write_text("old")
    export_model(tiny_checkpoint, out, force=True, log=lambda _m: None)
    assert sorted(p.name for p in out.iterdir()) == sorted([*EXPECTED_FILES.values(), MANIFEST_NAME, STAMP_NAME])
    assert Manifest.from_file(out).files == EXPECTED_FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_bad_dtype_or_opset_is_an_export_error_before_anything_is_written(tmp_path, tiny_checkpoint):
    with pytest.raises(ExportError, match="--dtype must be one of fp32, fp16"):
        export_model(tiny_checkpoint, tmp_path / "a", dtype="bf16")
    with pytest.raises(ExportError, match="--opset must be one of 18"):
        export_model(tiny_checkpoint, tmp_path / "a", opset=17)
    assert list(tmp_path.iterdir()) == []


def test_failed_verification_exits_1_and_keeps_the_bundle_beside_out(capsys, tmp_path, tiny_checkpoint, fake_graphs, monkeypatch):
    def mismatch(folder, model, **_):
        assert Manifest.from_file(folder).files == EXPECTED_FILES  # verification sees the finished bundle
        raise VerificationError("bundle does not match PyTorch (fp32): projector rel 0.3 (tol 0.0001)")

    monkeypatch.setattr("export.verify.verify_bundle", mismatch)
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "manifest.json").write_text(OLD_MANIFEST)
    code, err = run_main(capsys, "--model", str(tiny_checkpoint), "--out", str(out), "--force", "--verify")
    assert code == 1 and "error: bundle does not match PyTorch" in err
    assert (out / "manifest.json").read_text() == OLD_MANIFEST
    kept = tmp_path / "bundle.unverified"
    assert Manifest.from_file(kept).files == EXPECTED_FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "bundle.unverified"]


def test_random_weights_without_a_checkpoint_use_the_offline_tokenizer_and_say_so(tmp_path, monkeypatch):
    from tokenizers import Tokenizer

    from export.bundle import describe_tokenizer, write_tokenizer
    from export.pipeline import load_for_export
    from models import load

    def nowhere(name):
        raise load.CheckpointNotFound(f"no {name} here")

    monkeypatch.setattr(load, "resolve_checkpoint", nowhere)  # as if checkpoints/tiny had never been built
    model, tokenizer, meta = load_for_export("tiny", random_weights=True, dtype="fp32")
    assert meta.random_weights and meta.checkpoint is None and meta.tokenizer_kind == "offline-mistral-sp"
    assert "stand-in" in describe_tokenizer(meta.tokenizer_kind)
    path = write_tokenizer(tokenizer, None, tmp_path)
    tok = Tokenizer.from_file(str(path))
    text = meta.prompt_template.format(prompt="What is in this picture?")
    assert tok.encode(text, add_special_tokens=False).ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tok.token_to_id("<image>") == 32000


def test_next_export_recovers_what_a_killed_export_left_behind(tmp_path):
    from export.staging import Staging

    out = tmp_path / "bundle"
    (tmp_path / ".bundle.old-abc_1234" / "bundle").mkdir(parents=True)  # killed between the two renames
    (tmp_path / ".bundle.old-abc_1234" / "bundle" / "manifest.json").write_text(OLD_MANIFEST)
    (tmp_path / ".bundle.export-def56789").mkdir()  # killed while staging
    with Staging(out, force=True) as stage:
        assert (out / "manifest.json").read_text() == OLD_MANIFEST  # the old bundle is back in place
        left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
        assert left == [stage.path.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes): what must survive a refused export unchanged."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "contents",
    [
        {"notes.txt": "mine", "photos/cat.png": "not really a png"},  # a folder of user files
        {"manifest.json": json.dumps({"name": "my web app", "icons": []}), "index.html": "<html>"},  # not our manifest
        {"manifest.json": "{ not json", "data.bin": "x"},
    ],
    ids=["user-files", "foreign-manifest", "broken-manifest"],
)
def test_force_never_replaces_a_folder_that_is_not_a_bundle(capsys, tmp_path, tiny_checkpoint, contents):
    out = tmp_path / "stuff"
    for name, text in contents.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = tree(tmp_path)
    for flags in (["--force"], []):
        code, err = run_main(capsys, "--model", str(tiny_checkpoint), "--out", str(out), *flags)
        assert code == 2 and "neither empty nor a bundle this tool wrote" in err, err
        assert len(err.strip().splitlines()) == 1
        assert tree(tmp_path) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["same", "parent", "grandparent", "bundle-grandparent"])
def test_out_that_is_or_holds_the_checkpoint_is_always_refused(capsys, tmp_path, tiny_checkpoint, where):
    """--out equal to the --model folder, or any folder above it (even one that looks like a bundle), is refused
    with --force and without, and nothing anywhere is deleted."""
    checkpoint = tmp_path / "models" / "llava" / "tiny-copy"
    shutil.copytree(tiny_checkpoint, checkpoint)
    (tmp_path / "models" / "unrelated.txt").write_text("keep me")
    out = {
        "same": checkpoint,
        "parent": checkpoint.parent,
        "grandparent": checkpoint.parent.parent,
        "bundle-grandparent": checkpoint.parent.parent,
    }[where]
    if where == "bundle-grandparent":
        (out / "manifest.json").write_text(OLD_MANIFEST)
    before = tree(tmp_path)
    for flags in (["--force"], ["--force", "--random-weights"], []):
        code, err = run_main(capsys, "--model", str(checkpoint), "--out", str(out), *flags)
        assert code == 2 and "the --model checkpoint" in err and "would delete it" in err, err
        assert tree(tmp_path) == before and leftovers(out.parent) == []


def test_a_registry_name_protects_the_checkpoint_it_resolves_to(capsys, tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `tiny` resolves to ./checkpoints/tiny first
    shutil.copytree(tiny_checkpoint, tmp_path / "checkpoints" / "tiny")
    before = tree(tmp_path)
    code, err = run_main(capsys, "--model", "tiny", "--out", "checkpoints", "--force")
    assert code == 2 and "holds the --model checkpoint" in err
    link = tmp_path / "link-to-checkpoint"
    link.symlink_to(tmp_path / "checkpoints" / "tiny", target_is_directory=True)
    code, err = run_main(capsys, "--model", "tiny", "--out", str(link), "--force")
    assert code == 2 and "is not a folder" in err
    link.unlink()
    assert tree(tmp_path) == before


def test_an_empty_out_folder_is_written_without_force(tmp_path, tiny_checkpoint, fake_graphs):
    out = tmp_path / "empty"
    out.mkdir()
    export_model(tiny_checkpoint, out, log=lambda _m: None)
    assert Manifest.from_file(out).files == EXPECTED_FILES


def test_an_unverified_bundle_never_replaces_a_users_folder(capsys, tmp_path, tiny_checkpoint, fake_graphs, monkeypatch):
    def mismatch(folder, model, **_):
        raise VerificationError("bundle does not match PyTorch (fp32): vision rel 0.2 (tol 0.0001)")

    monkeypatch.setattr("export.verify.verify_bundle", mismatch)
    mine = tmp_path / "bundle.unverified"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    code, err = run_main(capsys, "--model", str(tiny_checkpoint), "--out", str(tmp_path / "bundle"), "--verify")
    assert code == 1 and "bundle.unverified-2" in err
    assert tree(mine) == {"thesis.tex": b"years of work"}
    assert Manifest.from_file(tmp_path / "bundle.unverified-2").files == EXPECTED_FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.unverified", "bundle.unverified-2"]


def test_recovery_touches_only_the_folders_export_names_and_never_restores_a_half_deleted_bundle(tmp_path):
    from export.staging import recover_interrupted

    out = tmp_path / "bundle"  # absent: the user removed it after an interrupted commit
    half = tmp_path / ".bundle.old-k3j9x_2a" / "bundle.deleting"  # interrupted while deleting the old bundle
    half.mkdir(parents=True)
    (half / "vision.onnx").write_text("half of an old graph")
    for name in (".bundle.old-notes", ".bundle.export-mine", ".bundle.export-abcdefghij", "bundle.old-abcd1234"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text("user data")
    assert recover_interrupted(out) == [".bundle.old-k3j9x_2a"]
    assert not out.exists()  # a half-deleted bundle is never put back as `out`
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".bundle.old-notes", ".bundle.export-mine", ".bundle.export-abcdefghij", "bundle.old-abcd1234"]
    )


def test_an_interrupt_while_the_old_bundle_is_deleted_says_the_new_one_is_in_place(
    capsys, tmp_path, tiny_checkpoint, fake_graphs, monkeypatch
):
    """Ctrl-C (or SIGTERM) while the previous bundle is being deleted: exit 130 with a message that says the new
    bundle is complete at --out (never "nothing was written"); the next export removes the half-deleted rest."""
    import export.staging

    out = tmp_path / "bundle"
    out.mkdir()
    (out / "manifest.json").write_text(OLD_MANIFEST)
    for i in range(5):
        (out / f"old-{i}.onnx").write_text("an old graph")
    real_rmtree = shutil.rmtree

    def interrupted_rmtree(path, *args, **kwargs):
        path = Path(path)
        if path.name.startswith(".bundle.old-"):
            next(path.rglob("*.onnx")).unlink()  # part of the old bundle is gone, then Ctrl-C
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(export.staging.shutil, "rmtree", interrupted_rmtree)
    code, err = run_main(capsys, "--model", str(tiny_checkpoint), "--out", str(out), "--force")
    monkeypatch.undo()
    assert code == 130 and "nothing was written" not in err
    assert f"{out} holds the new, complete bundle" in err and "removed by the next export or load" in err
    assert Manifest.from_file(out).files == EXPECTED_FILES  # the new bundle, hash-checked
    left = leftovers(tmp_path)
    assert len(left) == 1 and left[0].startswith(".bundle.old-") and left[0] in err
    assert [p.name for p in (tmp_path / left[0]).iterdir()] == ["bundle.deleting"]  # never taken for a bundle
    export_model(tiny_checkpoint, out, force=True, log=lambda _m: None)  # the next export cleans up
    assert leftovers(tmp_path) == [] and Manifest.from_file(out).files == EXPECTED_FILES


def test_each_route_says_which_it_is_and_takes_its_own_default_dtype(tmp_path, tiny_checkpoint, fake_graphs, monkeypatch):
    lines: list[str] = []
    export_model(tiny_checkpoint, tmp_path / "a", log=lines.append)
    assert lines[0].startswith("in-memory route") and "dtype fp32 (the route's default), opset 23" in lines[0]
    assert Manifest.from_file(tmp_path / "a").model.dtype == "fp32"

    written = {}

    def fake_stream(folder, model, dtype, opset, seed, **_):
        written.update(dtype=dtype, opset=opset, seed=seed)
        (folder / "manifest.json").write_text(OLD_MANIFEST)

    monkeypatch.setattr("export.meta.needs_streaming", lambda config, ram_bytes=None: True)
    monkeypatch.setattr("export.stream.write_streaming", fake_stream)
    lines.clear()
    export_model("tiny", tmp_path / "b", random_weights=True, opset=18, seed=5, log=lines.append)
    assert lines[0].startswith("streaming route") and "dtype fp16 (the route's default), opset 18" in lines[0]
    assert written == {"dtype": "fp16", "opset": 18, "seed": 5}
    lines.clear()
    export_model("tiny", tmp_path / "c", random_weights=True, dtype="fp32", log=lines.append)
    assert "dtype fp32, opset 23" in lines[0] and written["dtype"] == "fp32"


# Lines a user cannot act on that the libraries print during an export (none may reach stderr).
NOISE = ("torchvision is not installed", "LeafSpec", "will not be used, since it shares the same shape constraints",
         "Loading weights", "Warning")  # fmt: skip


@pytest.mark.slow
def test_an_export_prints_only_its_own_progress_lines(tmp_path, tiny_checkpoint):
    p = subprocess.run(
        [sys.executable, "-m", "export", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "b"), "--opset", "18"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    assert [line for line in lines if not line.startswith("[export] ")] == []
    assert not any(noise in p.stderr for noise in NOISE)
    assert lines[0] == "[export] in-memory route (the model is loaded and exported as it is), dtype fp32 (the " \
        "route's default), opset 18"
    assert lines[-1].startswith(f"[export] wrote {tmp_path / 'b'} in ")


@pytest.mark.parametrize(
    "batch, s, past, left_pad",
    [(1, 37, 0, 0), (1, 20, 5, 0), (1, 3, 9, 0), (1, 1, 12, 0), (2, 16, 0, 3)],
)
def test_block_causal_attention_equals_the_single_attention_node(tmp_path, batch, s, past, left_pad):
    """The decoder's Attention rewrite (query blocks over causal key prefixes) changes no output: prefill
    (s >= blocks, the blocked branch), decode (s < blocks, the original node), past keys, left padding."""
    from onnx import TensorProto, helper

    from export.decoder_graph import block_causal_attention

    heads, kv_heads, dim = 4, 2, 8
    total = past + s
    inputs = [
        helper.make_tensor_value_info("q", TensorProto.FLOAT, [batch, heads, "s", dim]),
        helper.make_tensor_value_info("k", TensorProto.FLOAT, [batch, kv_heads, "t", dim]),
        helper.make_tensor_value_info("v", TensorProto.FLOAT, [batch, kv_heads, "t", dim]),
        helper.make_tensor_value_info("mask", TensorProto.BOOL, [batch, 1, "s", "t"]),
    ]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, heads, "s", dim])
    node = helper.make_node("Attention", ["q", "k", "v", "mask"], ["y"], name="attn", q_num_heads=heads,
                            kv_num_heads=kv_heads)  # fmt: skip
    graph = helper.make_graph([node], "g", inputs, [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    rng = np.random.default_rng(0)
    feeds = {
        "q": rng.standard_normal((batch, heads, s, dim), dtype=np.float32),
        "k": rng.standard_normal((batch, kv_heads, total, dim), dtype=np.float32),
        "v": rng.standard_normal((batch, kv_heads, total, dim), dtype=np.float32),
    }
    causal = np.arange(total)[None, :] <= (past + np.arange(s))[:, None]  # [s, total]
    mask = np.broadcast_to(causal, (batch, 1, s, total)).copy()
    mask[-1, :, :, :left_pad] = False  # the last sequence is left-padded
    feeds["mask"] = mask

    def run(m):
        path = tmp_path / "m.onnx"
        onnx.save(m, path)
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    want = run(model)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert block_causal_attention(rewritten.graph, 8) == 1
    assert [n.op_type for n in rewritten.graph.node].count("Attention") == 0  # now inside the If branches
    np.testing.assert_allclose(run(rewritten), want, atol=1e-6, rtol=1e-6)
