"""LLaVA-1.5 (one 336 px partition per image): registry entries, tiny-llava15 parity with transformers'
LlavaForConditionalGeneration at budget 1.0, exact HiRED counts below it, and the 7B export's route."""

from __future__ import annotations

import numpy as np
import pytest

from hired import NEWLINE
from models.registry import CLIP_MEAN, CLIP_STD, VICUNA_TEMPLATE, get
from runtime.pipeline import Pipeline, Trace
from tests.helpers import scene

SIZES = [(800, 600), (450, 1000), (1300, 380)]  # (width, height): landscape, portrait, wide strip
PROMPT = "What is in this picture?"
NEW = 10


@pytest.fixture(scope="module")
def llava15_checkpoint(tmp_path_factory):
    from models.build import build_checkpoint

    return build_checkpoint("tiny-llava15", tmp_path_factory.mktemp("checkpoints") / "tiny-llava15", log=None)


@pytest.fixture(scope="module")
def llava15_pipe(llava15_checkpoint, tmp_path_factory):
    from export.pipeline import export_model

    out = export_model(
        llava15_checkpoint, tmp_path_factory.mktemp("artifacts") / "tiny-llava15", force=True, log=lambda _m: None
    )
    p = Pipeline.load(out)
    yield p
    p.close()


@pytest.fixture(scope="module")
def hf15(llava15_checkpoint):
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model = LlavaForConditionalGeneration.from_pretrained(llava15_checkpoint, dtype=torch.float32).eval()
    processor = LlavaProcessor.from_pretrained(llava15_checkpoint)
    assert isinstance(processor.image_processor, CLIPImageProcessorPil)  # the PIL backend, no torchvision
    return model, processor


@pytest.mark.parametrize("name, text_name, layers", [("llava-1.5-7b", "lmsys/vicuna-7b-v1.5", None),
                                                      ("llava-1.5-13b", "lmsys/vicuna-13b-v1.5", 40)])  # fmt: skip
def test_llava15_entries_hold_the_llava_hf_configs(name, text_name, layers):
    entry = get(name)
    cfg = entry.config
    assert entry.hf_id == f"llava-hf/{name}-hf" and entry.single_image and entry.prompt_template == VICUNA_TEMPLATE
    assert cfg["architectures"] == ("LlavaForConditionalGeneration",) and cfg["model_type"] == "llava"
    assert "image_grid_pinpoints" not in cfg and cfg["image_token_index"] == 32000 and cfg["vocab_size"] == 32064
    assert cfg["vision_feature_layer"] == -2 and cfg["vision_feature_select_strategy"] == "default"
    vision = cfg["vision_config"]
    assert (vision["image_size"], vision["patch_size"], vision["hidden_size"], vision["num_hidden_layers"]) == (
        336, 14, 1024, 24)  # fmt: skip  CLIP ViT-L/14-336
    assert cfg["text_config"]["_name_or_path"] == text_name and cfg["text_config"].get("num_hidden_layers") == layers
    config = entry.llava_config()
    assert type(config).__name__ == "LlavaConfig" and config.image_token_id == 32000


def test_tiny_llava15_has_tinys_sizes_and_a_clip_processor(llava15_checkpoint):
    tiny, small = get("tiny").config, get("tiny-llava15").config
    assert dict(small["vision_config"]) == dict(tiny["vision_config"])
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        assert small["text_config"][key] == tiny["text_config"][key]
    from export.bundle import image_processor_spec, read_processor_config

    spec = image_processor_spec(get("tiny-llava15").llava_config(), read_processor_config(llava15_checkpoint))
    assert (spec.shortest_edge, spec.crop_size, spec.resample, spec.grid_pinpoints) == (336, 336, "bicubic", ())
    assert spec.image_mean == CLIP_MEAN and spec.image_std == CLIP_STD


@pytest.mark.parametrize("size", SIZES)
def test_budget_one_equals_transformers_llava_token_for_token(llava15_pipe, hf15, size):
    import torch

    model, processor = hf15
    img = scene(*size)
    trace = Trace()
    r = llava15_pipe.generate(img, PROMPT, budget=1.0, max_new_tokens=NEW, trace=trace)
    text = llava15_pipe.manifest.prompt.template.replace("{prompt}", PROMPT)
    inputs = processor(images=img, text=text, return_tensors="pt")
    np.testing.assert_allclose(trace.pixel_values, inputs["pixel_values"].numpy(), atol=1e-5, rtol=0)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW)
    assert list(r.token_ids) == out[0, inputs["input_ids"].shape[1] :].tolist()
    n_image_tokens = int((inputs["input_ids"] == llava15_pipe.manifest.tokens.image).sum())
    assert r.visual_tokens["kept"] == r.visual_tokens["before"] == n_image_tokens == 576
    assert tuple(r.visual_tokens["per_image"]) == (576,)
    assert not (trace.order == NEWLINE).any()  # stock LLaVA-1.5: no newline embeddings


def test_the_bundle_records_one_partition(llava15_pipe):
    m = llava15_pipe.manifest
    assert m.image_processor.grid_pinpoints == () and m.image_processor.shortest_edge == 336
    assert m.vision.tokens_per_image == 576 and m.model.name == "tiny-llava15"


@pytest.mark.parametrize("size", SIZES)
def test_a_fifth_keeps_exactly_int_576_rate_tokens_by_late_attention(llava15_pipe, size):
    img = scene(*size, seed=1)
    runs = {}
    for distribution in ("spatial", "official"):
        for newlines in ("none", "rows"):
            trace = Trace()
            r = llava15_pipe.generate(img, PROMPT, budget=0.2, distribution=distribution, newlines=newlines,
                                      max_new_tokens=1, trace=trace)  # fmt: skip
            assert r.budget["total"] == int(576 * 0.2) == 115
            assert tuple(r.visual_tokens["per_image"]) == (115,) and r.visual_tokens["kept"] == 115
            assert r.visual_tokens["before"] == 576
            late = trace.late_scores[0]
            kept = np.asarray(trace.kept_indices[0])
            assert np.all(np.diff(kept) > 0)  # raster order
            assert late[kept].min() >= np.delete(late, kept).max()  # the top 115 by late-layer CLS attention
            runs[distribution, newlines] = kept
    first = runs["spatial", "none"]
    assert all(np.array_equal(first, k) for k in runs.values())  # one partition: official == spatial, no rows


def test_pruned_run_matches_the_pytorch_reference(llava15_pipe, hf15):
    from export.reference import HiredReference

    model, processor = hf15
    img = scene(1300, 380, seed=3)
    trace = Trace()
    r = llava15_pipe.generate(img, PROMPT, budget=0.2, max_new_tokens=NEW, trace=trace)
    ref = HiredReference(model, processor, prompt_template=VICUNA_TEMPLATE).run(img, PROMPT, rate=0.2, max_new_tokens=NEW)
    np.testing.assert_array_equal(np.asarray(trace.kept_indices[0]), ref.kept_indices[0])
    np.testing.assert_allclose(trace.inputs_embeds, ref.inputs_embeds[0].float().numpy(), atol=1e-4)
    assert list(r.token_ids)[: len(ref.token_ids)] == list(ref.token_ids)


def test_llava15_7b_random_weights_takes_the_streaming_route(tmp_path, monkeypatch):
    """`make export MODEL=llava-1.5-7b RANDOM_WEIGHTS=1` on a 24 GiB machine: the real size check picks the
    streaming route (the streamed write itself is replaced: the 7B export takes minutes)."""
    from types import SimpleNamespace

    import psutil

    from export.meta import fp32_bytes, needs_streaming
    from export.pipeline import export_model

    config = get("llava-1.5-7b").llava_config()
    assert 6.5e9 * 4 < fp32_bytes(config) < 7.5e9 * 4
    assert needs_streaming(config, ram_bytes=64 * 2**30) and not needs_streaming(
        get("tiny-llava15").llava_config(), ram_bytes=24 * 2**30)  # fmt: skip
    written = {}

    class Stop(Exception):
        pass

    def fake_stream(folder, model, dtype, opset, seed, *, log, **_):
        written.update(model=model, dtype=dtype)
        log("streaming")  # the route's header comes before the first progress line
        raise Stop  # nothing of a bundle is written

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(total=24 * 2**30))
    monkeypatch.setattr("export.stream.write_streaming", fake_stream)
    lines: list[str] = []
    with pytest.raises(Stop):
        export_model("llava-1.5-7b", tmp_path / "out", random_weights=True, log=lines.append)
    assert lines[0].startswith("streaming route") and "dtype fp16 (the route's default)" in lines[0]
    assert written == {"model": "llava-1.5-7b", "dtype": "fp16"}


def test_two_images_at_budget_one_equal_transformers_llava(llava15_pipe, hf15):
    """Several images on LLaVA-1.5: each its own 336 px centre crop and 576-token span, in prompt order."""
    import torch

    model, processor = hf15
    images = [scene(1300, 380, seed=4), scene(450, 1000, seed=5)]
    prompt = "<image> <image> What changed?"
    trace = Trace()
    r = llava15_pipe.generate(images, prompt, budget=1.0, max_new_tokens=NEW, trace=trace)
    text = llava15_pipe.manifest.prompt.template.replace("<image>\n", "").replace("{prompt}", prompt)
    inputs = processor(images=images, text=text, return_tensors="pt")
    for i, one in enumerate(trace.images):
        np.testing.assert_allclose(one.pixel_values, inputs["pixel_values"][i : i + 1].numpy(), atol=1e-5, rtol=0)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW)
    assert list(r.token_ids) == out[0, inputs["input_ids"].shape[1] :].tolist()
    assert r.visual_tokens["images"] == ({"before": 576, "kept": 576},) * 2
    small = llava15_pipe.generate(images, prompt, budget=0.2, max_new_tokens=1)
    assert tuple(small.visual_tokens["per_image"]) == (115, 115) and small.budget["total"] == 230


@pytest.mark.slow
def test_a_streamed_llava15_bundle_equals_its_torch_twin(tmp_path, monkeypatch):
    """The streaming route on a LLaVA-1.5 config (no image_newline parameter: the bundle's is zeros)."""
    from export.pipeline import export_model
    from export.reference import HiredReference

    monkeypatch.setattr("export.meta.needs_streaming", lambda config, ram_bytes=None: True)
    out = export_model("tiny-llava15", tmp_path / "b", random_weights=True, dtype="fp32", verify=True,
                       log=lambda _m: None)  # fmt: skip
    img = scene(1300, 380)
    ref = HiredReference.random("tiny-llava15").run(img, PROMPT, rate=0.2, max_new_tokens=NEW)
    with Pipeline.load(out) as p:
        r = p.generate(img, PROMPT, budget=0.2, max_new_tokens=NEW)
        assert not np.load(p.manifest.path("image_newline")).any()
    assert list(r.token_ids) == list(ref.token_ids) and tuple(r.visual_tokens["per_image"]) == (115,)
