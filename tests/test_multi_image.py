"""Several images in one prompt: each its own anyres layout and HiRED plan at the request's rate, parity with
transformers' LlavaNext on two images at budget 1.0, exact per-image counts below it, marker rules, CLI and dump."""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtime.errors import ImageError, PromptError
from runtime.pipeline import Trace
from tests.helpers import scene

A, B = (800, 600), (450, 1000)  # (width, height): landscape 2x1 grid, portrait 1x2 grid
QUESTION = "What changed?"
NEW = 8


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    import torch
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    return model, LlavaNextProcessor.from_pretrained(tiny_checkpoint)


def transformers_tokens(hf, images, text):
    import torch

    model, processor = hf
    inputs = processor(images=images, text=text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW)
    return inputs, out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("markers", [True, False], ids=["markers", "template-slot"])
def test_two_images_at_budget_one_equal_transformers_token_for_token(pipe, hf, markers):
    images = [scene(*A, seed=4), scene(*B, seed=5)]
    prompt = f"<image> <image> {QUESTION}" if markers else QUESTION
    trace = Trace()
    r = pipe.generate(images, prompt, budget=1.0, max_new_tokens=NEW, trace=trace)
    template = pipe.manifest.prompt.template
    slot = "<image>\n"  # the template's image slot: replaced by the markers, or holding both images in order
    text = template.replace(slot, "" if markers else slot * 2).replace("{prompt}", prompt)
    inputs, expected = transformers_tokens(hf, images, text)
    assert list(r.token_ids) == expected
    for i, one in enumerate(trace.images):  # transformers pads the crop axis to the larger image's count
        n = one.layout.n_images
        np.testing.assert_allclose(one.pixel_values, inputs["pixel_values"][i][:n].numpy(), atol=1e-5, rtol=0)
    per_image = [img["kept"] for img in r.visual_tokens["images"]]
    assert per_image == [one.layout.stock_tokens for one in trace.images]
    assert r.visual_tokens["kept"] == sum(per_image) == int((inputs["input_ids"] == pipe.manifest.tokens.image).sum())


def test_each_image_keeps_its_own_exact_budget_at_a_fifth(pipe):
    images = [scene(*A, seed=6), scene(*B, seed=7), scene(300, 300, seed=8)]
    trace = Trace()
    r = pipe.generate(images, f"Compare <image>, <image> and <image>. {QUESTION}", budget=0.2, max_new_tokens=1,
                      trace=trace)  # fmt: skip
    flat = []
    for img, one, result in zip(images, trace.images, r.visual_tokens["images"]):
        layout = one.layout
        exact = min(int(layout.n_images * 576 * 0.2), 576 + int(layout.capacities.sum()))
        assert result == {"before": layout.stock_tokens, "kept": exact}
        alone = Trace()
        pipe.generate(img, QUESTION, budget=0.2, max_new_tokens=1, trace=alone)  # the same plan as on its own
        for got, want in zip(one.kept_indices, alone.kept_indices):
            np.testing.assert_array_equal(got, want)
        flat += [len(k) for k in one.kept_indices]
    assert list(r.visual_tokens["per_image"]) == flat  # flat over all partitions, in prompt order
    assert r.budget["total"] == sum(int(o.layout.n_images * 576 * 0.2) for o in trace.images)
    assert r.visual_tokens["kept"] == sum(i["kept"] for i in r.visual_tokens["images"])
    assert trace.pixel_values is None and trace.inputs_embeds.shape[0] > r.visual_tokens["kept"]


@pytest.mark.parametrize(
    "images, prompt, message",
    [
        (2, "<image> What changed?", "holds 1 <image> marker for 2 images"),
        (2, "<image> <image> <image> What changed?", "holds 3 <image> markers for 2 images"),
        (1, "<image> then <image>", "holds 2 <image> markers for 1 image;"),
        (0, "look at <image>", "holds 1 <image> marker for 0 images"),
    ],
)
def test_a_marker_count_other_than_none_or_one_per_image_is_refused(pipe, images, prompt, message):
    batch = [scene(64, 64, seed=i) for i in range(images)] or None
    with pytest.raises(PromptError, match=message) as err:
        pipe.generate(batch, prompt, max_new_tokens=1)
    assert "\n" not in str(err.value)


def test_one_image_with_one_marker_is_valid_and_reported_as_before(pipe):
    r = pipe.generate(scene(*A), f"Look: <image>\n{QUESTION}", budget=0.2, max_new_tokens=1)
    assert "images" not in r.visual_tokens and r.visual_tokens["kept"] == sum(r.visual_tokens["per_image"])


def test_a_bad_image_among_several_is_named(pipe):
    with pytest.raises(ImageError, match="^image 1: "):
        pipe.generate([scene(64, 64), "no/such/file.png"], QUESTION, max_new_tokens=1)
    with pytest.raises(ImageError, match="^image 1: "):  # before budget="auto" would calibrate on them
        pipe.generate([scene(64, 64), "no/such/file.png"], QUESTION, budget="auto", target_ttft_ms=500)
    assert pipe.active_requests == 0


def test_cli_takes_image_twice_and_dumps_per_image_arrays_with_an_index(tiny_bundle, tmp_path, capsys):
    from runtime.infer import main

    paths = []
    for i, size in enumerate((A, B)):
        paths += ["--image", str(tmp_path / f"{i}.png")]
        scene(*size, seed=i).save(paths[-1])
    dump = tmp_path / "dump"
    code = main(["--artifacts", str(tiny_bundle), *paths, "--prompt", f"<image> <image> {QUESTION}", "--budget", "0.2",
                 "--max-new-tokens", "2", "--json", "--dump", str(dump), "--show-kept", str(tmp_path / "kept.png")])  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    names = sorted(p.name for p in dump.iterdir())
    assert names == sorted(["inputs_embeds.npy", "prefill_logits.npy"] + [f"{n}_{i}.{ext}" for i in (0, 1) for n, ext in (
        ("pixel_values", "npy"), ("early_scores", "npy"), ("late_scores", "npy"), ("kept_indices", "json"))])  # fmt: skip
    for i, image in enumerate(result["visual_tokens"]["images"]):
        kept = json.loads((dump / f"kept_indices_{i}.json").read_text())
        assert len(kept["order"]) == image["kept"]
        assert np.load(dump / f"pixel_values_{i}.npy").shape[0] == len(kept["per_image"])
    assert np.load(dump / "inputs_embeds.npy").shape[0] > result["visual_tokens"]["kept"]
    assert (tmp_path / "kept_0.png").is_file() and (tmp_path / "kept_1.png").is_file()
