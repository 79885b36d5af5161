"""bench/llm_peer.py: the LLM extracted for onnxruntime-genai, the prompt lengths, and (slow) one interleaved round
in which the project's fp32 decoder and genai's fp32 build of the same weights pick the same greedy tokens."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from bench import llm_peer


def test_extract_llm_keeps_the_language_model_only(tiny_checkpoint, tmp_path):
    from safetensors import safe_open

    out = llm_peer.extract_llm(tiny_checkpoint, tmp_path / "llm")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["architectures"] == ["MistralForCausalLM"]
    assert config["hidden_size"] == 128 and config["vocab_size"] == 32064
    with safe_open(str(out / "model.safetensors"), "np") as st:
        keys = set(st.keys())
        head = st.get_tensor("lm_head.weight")
    assert "model.embed_tokens.weight" in keys and "model.norm.weight" in keys
    assert all(k.startswith(("model.", "lm_head.")) for k in keys)
    assert not any("vision" in k or "projector" in k or "language_model" in k for k in keys)
    with safe_open(str(next(tiny_checkpoint.glob("*.safetensors"))), "np") as st:
        name = next(k for k in st.keys() if k.endswith("lm_head.weight"))
        np.testing.assert_array_equal(head, st.get_tensor(name))
    assert (out / "tokenizer.json").is_file()


def test_prefill_lengths_are_the_requests_prompt_lengths(tiny_bundle):
    """Budget 1.0: the stock visual span; 0.2: HiRED's exact kept count; both plus the same text tokens."""
    from runtime import Pipeline

    lengths = llm_peer.prefill_lengths(tiny_bundle, side=1000)
    image = np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    with Pipeline.load(tiny_bundle) as p:
        full = p.generate(image, llm_peer.PROMPT, budget=1.0, max_new_tokens=1).visual_tokens
        kept = p.generate(image, llm_peer.PROMPT, budget=0.2, max_new_tokens=1).visual_tokens
    text = lengths[1.0] - full["before"]
    assert full["kept"] == full["before"] and text > 5
    assert lengths[0.2] == kept["kept"] + text


@pytest.mark.slow
def test_one_round_project_fp32_and_genai_fp32_agree(tiny_checkpoint, tiny_bundle, tmp_path):
    pytest.importorskip("onnxruntime_genai")
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_bundle, work / "project-none")  # the float bundle of the same checkpoint
    record = llm_peer.run(tiny_checkpoint, work, ["project-none", "project-int4", "genai-fp32"], rounds=1,
                          new_tokens=6, threads=2, lengths=[40])
    assert {(r["engine"], r["length"]) for r in record["rows"]} == {
        ("project-none", 40), ("project-int4", 40), ("genai-fp32", 40)}
    assert all(r["prefill_ms"] > 0 and r["decode_tok_s"] > 0 and r["peak_rss_mib"] > 0 for r in record["rows"])
    tokens = {r["engine"]: r["tokens"] for r in record["runs"]}
    assert len(tokens["project-none"]) == 6
    assert tokens["project-none"] == tokens["genai-fp32"]  # same weights, same prompt ids, greedy
    assert record["greedy_agreement_vs_genai_fp32"]["project-none"] == 1.0
    quality = record["fidelity"]["40"]["project-int4"]
    assert 0.9 < quality["cosine"] <= 1.0
    assert {q["vs"] for q in record["ratios"]} == {"genai-fp32"}


def test_project_builds_are_rebuilt_when_the_exporter_changed(tmp_path, monkeypatch):
    """A project-none build written by other export/ or models/ sources is rebuilt, not silently reused; a build
    whose recorded digest is today's is kept."""
    built = []

    def fake_run(cmd, what):  # the export child: writes a manifest where --out says
        out = tmp_path / "work" / what
        out.mkdir(parents=True, exist_ok=True)
        (out / "manifest.json").write_text("{}")
        built.append(what)

    monkeypatch.setattr(llm_peer, "_run", fake_run)
    monkeypatch.setattr("bench.quant_row.exporter_digest", lambda root=None: "today")
    work = tmp_path / "work"
    (work / "project-none").mkdir(parents=True)
    (work / "project-none" / "manifest.json").write_text("{}")
    (work / "project-none" / "old-file").write_text("from yesterday's exporter")
    (work / "project.export.json").write_text(json.dumps({"exporter_sha256": "yesterday"}))

    llm_peer.ensure_builds(tmp_path / "ckpt", work, ["project-none"])
    assert built == ["project-none"] and not (work / "project-none" / "old-file").exists()
    assert json.loads((work / "project.export.json").read_text()) == {"exporter_sha256": "today"}

    llm_peer.ensure_builds(tmp_path / "ckpt", work, ["project-none"])  # today's record: reused
    assert built == ["project-none"]
