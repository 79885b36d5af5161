"""models/: registry entries and configs, FLOP split, the offline tiny build, checkpoint resolving and loading."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import build, load, registry
from models.tokenizer import IMAGE_TOKEN_ID, build_offline_tokenizer, offline_sp_model_path

REAL = ["llava-next-7b", "llava-next-mistral-7b", "llava-next-13b"]
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build.build_checkpoint("tiny", tmp_path_factory.mktemp("a") / "tiny", log=None)


# ----------------------------------------------------------------------------- registry


def test_registry_lists_the_eight_models():
    assert registry.names() == ["llava-next-7b", "llava-next-mistral-7b", "llava-next-13b", "llava-1.5-7b",
                                "llava-1.5-13b", "tiny", "bench", "tiny-llava15"]  # fmt: skip


def test_llava15_and_llava_next_share_a_text_model_but_match_their_own_entry():
    """llava-1.5-7b and llava-next-7b are both on lmsys/vicuna-7b-v1.5: a config matches by model_type too."""
    for name in ("llava-1.5-7b", "llava-next-7b", "llava-1.5-13b", "llava-next-13b"):
        fields = registry.get(name).config_dict()
        assert registry.match_config(fields).name == name


def test_unknown_name_error_lists_every_known_model():
    with pytest.raises(ValueError) as err:
        registry.get("llava-next-70b")
    msg = str(err.value)
    assert "'llava-next-70b'" in msg
    for name in registry.names():
        assert name in msg


@pytest.mark.parametrize(
    "name, hf_id, text_type, hidden, layers, heads, kv_heads, ffn",
    [
        ("llava-next-7b", "llava-hf/llava-v1.6-vicuna-7b-hf", "llama", 4096, 32, 32, 32, 11008),
        ("llava-next-mistral-7b", "llava-hf/llava-v1.6-mistral-7b-hf", "mistral", 4096, 32, 32, 8, 14336),
        ("llava-next-13b", "llava-hf/llava-v1.6-vicuna-13b-hf", "llama", 5120, 40, 40, 40, 13824),
    ],
)
def test_real_config_builds_llava_next_config_with_the_published_shapes(
    name, hf_id, text_type, hidden, layers, heads, kv_heads, ffn
):
    entry = registry.get(name)
    cfg = entry.llava_config()
    assert entry.hf_id == hf_id
    assert entry.tokenizer == registry.TOKENIZER_CHECKPOINT
    assert cfg.model_type == "llava_next"
    v, t = cfg.vision_config, cfg.text_config
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads) == (1024, 4096, 24, 16)
    assert (v.image_size, v.patch_size, v.hidden_act) == (336, 14, "quick_gelu")
    assert t.model_type == text_type
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (
        hidden,
        layers,
        heads,
        kv_heads,
    )
    assert t.intermediate_size == ffn
    assert t.vocab_size == 32064
    assert cfg.image_token_id == 32000
    assert [list(p) for p in cfg.image_grid_pinpoints] == PINPOINTS
    assert cfg.vision_feature_layer == -2
    assert cfg.vision_feature_select_strategy == "default"
    if text_type == "mistral":
        assert t.rope_parameters["rope_theta"] == 1e6
        assert t.sliding_window is None


@pytest.mark.parametrize(
    "name, billions", [("llava-next-7b", 7.06), ("llava-next-mistral-7b", 7.57), ("llava-next-13b", 13.35)]
)
def test_real_config_parameter_count_matches_the_published_model(name, billions):
    from transformers import LlavaNextForConditionalGeneration

    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(registry.get(name).llava_config())
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e9 - billions) < 0.01, n


def test_every_config_file_says_where_its_numbers_come_from():
    for name in registry.names():
        raw = json.loads((registry.CONFIG_DIR / f"{name}.json").read_text())
        assert raw["_source"], name
        assert "_source" not in registry.get(name).config  # notes never reach LlavaNextConfig
    assert "llava-hf/llava-v1.6-vicuna-7b-hf" in registry.config_source("llava-next-7b")


def test_tiny_has_the_real_geometry_with_small_widths():
    cfg = registry.get("tiny").llava_config()
    v, t = cfg.vision_config, cfg.text_config
    assert (v.image_size // v.patch_size) ** 2 == 576
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads) == (128, 6, 4)
    assert t.model_type == "mistral"
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (128, 2, 4, 2)
    assert (t.vocab_size, t.sliding_window) == (32064, None)
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == (1, 2, 0)
    assert cfg.image_token_id == 32000
    assert [list(p) for p in cfg.image_grid_pinpoints] == PINPOINTS
    assert cfg.vision_feature_layer == -2
    assert registry.get("tiny").hf_id is None


@pytest.mark.parametrize(
    "name, template",
    [
        ("tiny", registry.MISTRAL_TEMPLATE),
        ("bench", registry.MISTRAL_TEMPLATE),
        ("llava-next-mistral-7b", registry.MISTRAL_TEMPLATE),
        ("llava-next-7b", registry.VICUNA_TEMPLATE),
        ("llava-next-13b", registry.VICUNA_TEMPLATE),
    ],
)
def test_prompt_template_follows_the_text_model_family(name, template):
    entry = registry.get(name)
    assert entry.prompt_template == template
    assert entry.add_bos is True
    assert entry.prompt_template.count("<image>") == 1


def test_templates_are_the_llava_hf_prompts():
    assert registry.MISTRAL_TEMPLATE.format(prompt="Hi?") == "[INST] <image>\nHi? [/INST]"
    assert registry.VICUNA_TEMPLATE.format(prompt="Hi?").endswith("questions. USER: <image>\nHi? ASSISTANT:")
    assert registry.VICUNA_TEMPLATE.startswith("A chat between a curious human and an artificial intelligence")


def test_template_without_exactly_one_image_is_refused():
    with pytest.raises(ValueError, match="exactly one '<image>'"):
        registry.check_template("<image><image>{prompt}")
    with pytest.raises(ValueError, match="exactly one"):
        registry.check_template("<image> no prompt slot")


def test_importing_the_registry_does_not_import_torch():
    code = (
        "import sys, models.registry as r; r.get('bench'); r.flops_split(r.get('bench')); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=_repo())
    assert out.stdout.strip() == "[]"


def _repo() -> Path:
    return Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- FLOPs


def test_flops_split_counts_matmuls_and_attention_exactly():
    cfg = {
        # 28 px / 14 = 2x2 patches + CLS = 5 tokens; feature layer -2 of 3 layers = 2 blocks run.
        "vision_config": {"hidden_size": 2, "intermediate_size": 4, "num_hidden_layers": 3, "image_size": 28, "patch_size": 14},
        "vision_feature_layer": -2,
        "text_config": {
            "model_type": "mistral",
            "hidden_size": 4,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "intermediate_size": 8,
            "num_hidden_layers": 1,
            "vocab_size": 10,
        },
    }
    embed = 2 * (3 * 14 * 14 * 2) * 4
    block = 2 * (4 * 2 * 2 + 2 * 2 * 4) * 5 + 4 * 5**2 * 2
    assert registry.vision_flops(cfg, n_crops=1) == embed + 2 * block
    assert registry.vision_flops(cfg, n_crops=3) == 3 * (embed + 2 * block)
    # q,o: 4x4 each; k,v: 4x2 each (1 KV head of dim 2); mlp 3 * 4 * 8; T = 3; LM head on one position.
    layer = 2 * (16 + 16 + 8 + 8 + 96) * 3 + 4 * 3**2 * 4
    assert registry.llm_prefill_flops(cfg, tokens=3) == layer + 2 * 4 * 10
    assert registry.flops_split(cfg, n_crops=1, text_tokens=3) == (embed + 2 * block) / (layer + 80)


def test_llava_next_7b_vision_is_about_5_percent_of_prefill():
    split = registry.flops_split(registry.get("llava-next-7b"))
    assert 0.03 < split < 0.06


def test_bench_flop_split_is_within_30_percent_of_llava_next_7b():
    ref = registry.flops_split(registry.get("llava-next-7b"))
    bench = registry.flops_split(registry.get("bench"))
    assert abs(bench / ref - 1) < 0.30, (bench, ref)


def test_bench_is_small_enough_for_a_cpu_prefill():
    cfg = registry.get("bench").llava_config()
    assert cfg.text_config.hidden_size <= 768 and cfg.text_config.num_hidden_layers <= 8
    assert registry.llm_prefill_flops(registry.get("bench")) < 1e12  # ~0.57 TFLOP: seconds on 2 cores


# ----------------------------------------------------------------------------- build


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_tiny_build_writes_a_complete_checkpoint_folder(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "prompt_template.json",
        "build_info.json",
    } <= names
    assert json.loads((tiny_dir / "prompt_template.json").read_text()) == {
        "add_bos": True,
        "template": registry.MISTRAL_TEMPLATE,
    }
    proc = json.loads((tiny_dir / "processor_config.json").read_text())
    assert proc["patch_size"] == 14 and proc["num_additional_image_tokens"] == 1
    assert proc["vision_feature_select_strategy"] == "default"
    ip = proc["image_processor"]
    assert ip["size"] == {"shortest_edge": 336} and ip["crop_size"] == {"height": 336, "width": 336}
    assert ip["image_grid_pinpoints"] == PINPOINTS
    assert not any(n.startswith(".") for n in (p.name for p in tiny_dir.parent.iterdir()))  # no temp left


def test_tiny_build_is_byte_identical_and_force_replaces(tiny_dir, tmp_path, capsys):
    other = build.build_checkpoint("tiny", tmp_path / "tiny", log=None)
    assert _files(other) == _files(tiny_dir)
    # Rebuild over the existing folder through the CLI: --force replaces it with the same bytes.
    (other / "stale.txt").write_text("x")
    assert build.main(["tiny", "--out", str(other), "--force"]) == 0
    assert _files(other) == _files(tiny_dir)
    assert "wrote" in capsys.readouterr().err


def test_seed_changes_the_weights(tiny_dir, tmp_path):
    other = build.build_checkpoint("tiny", tmp_path / "tiny", seed=1, log=None)
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()


def test_existing_out_is_refused_without_force(tiny_dir, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert build.main(["tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {out} already exists; pass --force to replace it"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(FileExistsError):
        build.build_checkpoint("tiny", out, log=None)


def test_large_model_build_warns_and_stops_before_allocating_what_ram_cannot_hold(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(build, "_total_ram", lambda: 16 * 2**30)
    out = tmp_path / "big"
    assert build.main(["llava-next-13b", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "warning: llava-next-13b is large: about 49.7 GiB" in err
    assert "error: llava-next-13b in float32 needs about 49.7 GiB but this machine has 16.0 GiB" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_built_tiny_loads_in_transformers_and_generates(tiny_dir):
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    model = LlavaNextForConditionalGeneration.from_pretrained(str(tiny_dir)).eval()
    processor = LlavaNextProcessor.from_pretrained(str(tiny_dir))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 500, 3), dtype=np.uint8))
    prompt = registry.MISTRAL_TEMPLATE.format(prompt="What is in this picture?")
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (1, 5, 3, 336, 336)  # 672x672 grid: base + 4 crops
    ids = inputs["input_ids"][0]
    assert ids[0].item() == 1  # BOS
    # 576 base + 48x48 crop canvas unpadded to 38 rows (500x400 image) + 38 newlines = 2438.
    assert int((ids == IMAGE_TOKEN_ID).sum()) == 576 + 38 * 48 + 38
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    new = out[0, ids.numel() :]
    assert 1 <= new.numel() <= 4
    assert int(new.max()) < 32064


def test_tokenizer_json_gives_the_transformers_tokenizer_ids(tiny_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    fast = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    ref = AutoTokenizer.from_pretrained(str(tiny_dir))
    prompts = ["What is in this picture?", "Décris l'image: 3 chats, 2 chiens 🐶\nEt ensuite?", "  spaced  out ", "x"]
    for template in (registry.MISTRAL_TEMPLATE, registry.VICUNA_TEMPLATE):
        for prompt in prompts:
            text = template.format(prompt=prompt)
            ids = fast.encode(text, add_special_tokens=False).ids
            assert ids == ref(text, add_special_tokens=False)["input_ids"], text
            assert ids.count(IMAGE_TOKEN_ID) == 1
            assert ref(text)["input_ids"] == [1, *ids]  # transformers adds BOS only


def test_offline_tokenizer_matches_sentencepiece_on_plain_text():
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(offline_sp_model_path()))
    tok = build_offline_tokenizer()
    # Single-spaced text: where HF's Metaspace and sentencepiece agree (runs of spaces and a leading
    # space are split differently by the two, in llava-hf's own tokenizers too).
    texts = [
        "What is in this picture?",
        "[INST] Describe the scene in detail. [/INST]",
        "The quick brown fox jumps over the lazy dog; 3.14159, $100 and 50% off!",
        "Ünïcödé text, 中文字符 and an emoji 🤖\nsecond line\tafter a tab",
    ]
    for text in texts:
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
    assert len(tok) == 32001 and tok.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID


# ----------------------------------------------------------------------------- resolve / load


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(load, "REPO_ROOT", tmp_path)
    return cache


def test_missing_real_checkpoint_error_says_what_to_download(empty_hf_cache):
    with pytest.raises(load.CheckpointNotFound) as err:
        load.resolve_checkpoint("llava-next-7b")
    msg = str(err.value)
    assert "huggingface-cli download llava-hf/llava-v1.6-vicuna-7b-hf --local-dir checkpoints/llava-next-7b" in msg
    assert "--random-weights" in msg
    assert "\n" not in msg


def test_missing_tiny_error_says_how_to_build_it(empty_hf_cache):
    with pytest.raises(load.CheckpointNotFound, match="python -m models.build tiny --out checkpoints/tiny"):
        load.resolve_checkpoint("tiny")


def test_unknown_name_or_path_error_lists_the_registry(empty_hf_cache):
    with pytest.raises(load.CheckpointNotFound, match="known models: llava-next-7b, .*tiny, bench"):
        load.resolve_checkpoint("checkpoints/nothing-here")


NO_TENSORS = "\x02" + "\x00" * 7 + "{}"  # a whole safetensors file holding no tensors (8-byte length, "{}")


def _fake_snapshot(cache: Path, hf_id: str, files: dict[str, str]) -> Path:
    repo = cache / ("models--" + hf_id.replace("/", "--"))
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for name, text in files.items():
        (snap / name).write_text(text)
    return snap


def test_registry_name_resolves_to_a_complete_hf_cache_snapshot(empty_hf_cache):
    hf_id = "llava-hf/llava-v1.6-mistral-7b-hf"
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    snap = _fake_snapshot(
        empty_hf_cache,
        hf_id,
        {"config.json": "{}", "model.safetensors.index.json": json.dumps(index), "model-00001-of-00002.safetensors": NO_TENSORS},
    )
    with pytest.raises(load.CheckpointNotFound, match=hf_id):  # one shard missing: incomplete
        load.resolve_checkpoint("llava-next-mistral-7b")
    (snap / "model-00002-of-00002.safetensors").write_text("")  # present but truncated: incomplete too
    with pytest.raises(load.CheckpointNotFound, match=hf_id):
        load.resolve_checkpoint("llava-next-mistral-7b")
    (snap / "model-00002-of-00002.safetensors").write_text(NO_TENSORS)
    assert load.resolve_checkpoint("llava-next-mistral-7b") == snap
    assert load.resolve_checkpoint(hf_id) == snap


def test_local_checkpoints_folder_wins_over_the_cache(empty_hf_cache):
    local = Path("checkpoints/llava-next-13b")
    local.mkdir(parents=True)
    (local / "config.json").write_text("{}")
    assert load.resolve_checkpoint("llava-next-13b").resolve() == local.resolve()


def test_folder_that_is_not_llava_next_or_llava15_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "text_config": {"model_type": "qwen2"}}))
    with pytest.raises(load.CheckpointError, match="model_type 'qwen2_vl', expected 'llava_next'"):
        load.load_model(tmp_path)


def test_folder_without_config_json_is_refused(tmp_path):
    with pytest.raises(load.CheckpointNotFound, match="has no config.json"):
        load.resolve_checkpoint(tmp_path)


def test_load_model_returns_model_tokenizer_and_info(tiny_dir):
    model, tok, info = load.load_model(tiny_dir)
    assert type(model).__name__ == "LlavaNextForConditionalGeneration" and not model.training
    assert tok is not None and tok.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID
    assert (info.name, info.hf_id, info.checkpoint) == ("tiny", None, tiny_dir)
    assert (info.random_weights, info.seed, info.dtype) == (True, 0, "float32")
    assert info.tokenizer == registry.TOKENIZER_OFFLINE_MISTRAL
    assert (info.prompt_template, info.add_bos) == (registry.MISTRAL_TEMPLATE, True)
    assert json.loads(json.dumps(info.to_dict()))["checkpoint"] == str(tiny_dir)


def test_random_weights_by_name_equal_the_built_checkpoint(tiny_dir, monkeypatch):
    built, _, _ = load.load_model(tiny_dir)
    monkeypatch.setattr(load, "_local_dirs", lambda name: [])  # a `make demo` checkpoints/tiny must not leak in
    fresh, tok, info = load.load_model("tiny", random_weights=True, seed=0)
    a, b = built.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert info.checkpoint is None and info.random_weights and info.tokenizer == registry.TOKENIZER_OFFLINE_MISTRAL
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID


def test_random_weights_honour_dtype():
    model, _, info = load.load_model("tiny", random_weights=True, dtype=torch.float16)
    assert next(model.parameters()).dtype == torch.float16 and info.dtype == "float16"


def _real_folder(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(registry.get(name).config_dict()))
    return folder


@pytest.mark.parametrize(
    "name, template",
    [("llava-next-7b", registry.VICUNA_TEMPLATE), ("llava-next-mistral-7b", registry.MISTRAL_TEMPLATE)],
)
def test_load_prompt_matches_a_real_llava_hf_folder(tmp_path, name, template):
    assert load.load_prompt(_real_folder(tmp_path, name)) == (template, True)
    assert load.load_prompt(name) == (template, True)
    assert load.load_prompt(registry.get(name)) == (template, True)


def test_load_prompt_falls_back_to_the_text_model_type(tmp_path):
    cfg = registry.get("llava-next-7b").config_dict()
    del cfg["text_config"]["_name_or_path"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load.load_prompt(tmp_path) == (registry.VICUNA_TEMPLATE, True)
    cfg["text_config"]["model_type"] = "qwen2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(load.CheckpointError, match="prompt_template.json"):
        load.load_prompt(tmp_path)


def test_load_prompt_prefers_prompt_template_json_and_checks_it(tiny_dir, tmp_path):
    assert load.load_prompt(tiny_dir) == (registry.MISTRAL_TEMPLATE, True)
    folder = _real_folder(tmp_path, "llava-next-7b")
    (folder / "prompt_template.json").write_text(json.dumps({"template": "Q: <image> {prompt} A:", "add_bos": False}))
    assert load.load_prompt(folder) == ("Q: <image> {prompt} A:", False)
    (folder / "prompt_template.json").write_text(json.dumps({"template": "{prompt}", "add_bos": True}))
    with pytest.raises(ValueError, match="exactly one '<image>'"):
        load.load_prompt(folder)


def test_a_registry_name_wins_over_a_same_named_folder_without_config(tmp_path, monkeypatch):
    (tmp_path / "bench").mkdir()  # like the repository's own bench/ package, seen from the repo root
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(load, "REPO_ROOT", tmp_path)  # a checkpoints/bench that `make bench` built must not count
    with pytest.raises(load.CheckpointNotFound, match="python -m models.build bench"):
        load.resolve_checkpoint("bench")
    assert load._load_random("bench", dtype=torch.float32, seed=0)[2].name == "bench"
