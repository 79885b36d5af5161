"""The runtime end to end on the tiny bundle: parity with transformers, exact budgets, the CLI and typed errors."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime import BudgetError, GenerationError, ImageError, PromptError
from runtime.pipeline import Pipeline, Trace
from tests.helpers import scene

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(800, 600), (450, 1000), (1300, 380)]  # (width, height): landscape, portrait, wide strip
PROMPT = "What is in this picture?"
NEW = 10


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    import torch
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32).eval()
    processor = LlavaNextProcessor.from_pretrained(tiny_checkpoint)
    return model, processor


@pytest.mark.parametrize("size", SIZES)
def test_budget_one_equals_transformers_token_for_token(pipe, hf, size):
    import torch

    model, processor = hf
    img = scene(*size)
    trace = Trace()
    r = pipe.generate(img, PROMPT, budget=1.0, max_new_tokens=NEW, trace=trace)

    text = pipe.manifest.prompt.template.replace("{prompt}", PROMPT)
    inputs = processor(images=img, text=text, return_tensors="pt")
    np.testing.assert_allclose(trace.pixel_values, inputs["pixel_values"][0].numpy(), atol=1e-5, rtol=0)
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].numpy()
        out = model.generate(**inputs, do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW)
    expected = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert list(r.token_ids) == expected
    np.testing.assert_allclose(trace.prefill_logits, logits, atol=2e-4, rtol=1e-4)
    # The stock span: what transformers expands <image> into.
    n_image_tokens = int((inputs["input_ids"] == pipe.manifest.tokens.image).sum())
    assert r.visual_tokens["kept"] == r.visual_tokens["before"] == n_image_tokens


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("rate", [0.1, 0.2, 0.4])
def test_spatial_keeps_the_exact_documented_count(pipe, size, rate):
    trace = Trace()
    r = pipe.generate(scene(*size, seed=1), PROMPT, budget=rate, max_new_tokens=1, trace=trace)
    layout = trace.layout
    n = 1 + layout.n_crops
    total = int(n * 576 * rate)
    exact = min(total, 576 + int(layout.capacities.sum()))
    assert r.budget["total"] == total
    assert sum(r.visual_tokens["per_image"]) == exact
    assert r.visual_tokens["kept"] == exact  # newlines "none": the span is the kept patches only
    assert r.visual_tokens["before"] == layout.stock_tokens


def test_official_never_exceeds_the_total_and_rows_adds_newlines(pipe):
    img = scene(900, 700, seed=2)
    off = pipe.generate(img, PROMPT, budget=0.2, distribution="official", max_new_tokens=1)
    assert sum(off.visual_tokens["per_image"]) <= off.budget["total"]
    rows = pipe.generate(img, PROMPT, budget=0.2, newlines="rows", max_new_tokens=1)
    plain = pipe.generate(img, PROMPT, budget=0.2, max_new_tokens=1)
    assert rows.visual_tokens["per_image"] == plain.visual_tokens["per_image"]
    assert plain.visual_tokens["kept"] < rows.visual_tokens["kept"] <= plain.visual_tokens["kept"] + 48


def test_pruned_run_matches_the_pytorch_reference(pipe, hf):
    reference = pytest.importorskip("export.reference")
    model, processor = hf
    img = scene(800, 600, seed=3)
    for distribution in ("spatial", "official"):
        trace = Trace()
        r = pipe.generate(img, PROMPT, budget=0.2, distribution=distribution, max_new_tokens=NEW, trace=trace)
        ref = reference.HiredReference(model, processor).run(
            img, PROMPT, rate=0.2, alpha=0.5, distribution=distribution, max_new_tokens=NEW
        )
        for got, want in zip(trace.kept_indices, ref.kept_indices):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        np.testing.assert_allclose(trace.inputs_embeds, ref.inputs_embeds[0].float().numpy(), atol=1e-4)
        assert list(r.token_ids)[: len(ref.token_ids)] == list(ref.token_ids)


def test_stream_yields_the_text_and_ends_with_the_result(pipe):
    stream = pipe.stream(scene(640, 480), PROMPT, max_new_tokens=NEW)
    pieces = list(stream)
    assert "".join(pieces) == stream.result.text
    assert len(stream.result.token_ids) <= NEW
    assert set(stream.result.timings_ms) == {"preprocess", "vision", "select", "projector", "prefill", "decode", "total"}


def test_result_is_frozen_and_to_dict_is_plain_json(pipe):
    r = pipe.generate(scene(500, 400), PROMPT, max_new_tokens=3)
    with pytest.raises(AttributeError):
        r.text = "x"
    d = json.loads(json.dumps(r.to_dict()))
    assert d["budget"] == {"rate": 0.2, "alpha": 0.5, "total": r.budget["total"], "distribution": "spatial",
                           "newlines": "none"}  # fmt: skip
    assert d["provider"] == "CPUExecutionProvider"


def test_sampling_is_reproducible_with_a_seed(pipe):
    img = scene(500, 400)
    a = pipe.generate(img, PROMPT, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    b = pipe.generate(img, PROMPT, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    assert a.token_ids == b.token_ids


def test_text_only_request_equals_transformers_without_an_image(pipe, hf):
    import torch

    model, processor = hf
    trace = Trace()
    r = pipe.generate(None, PROMPT, max_new_tokens=NEW, min_new_tokens=NEW, trace=trace)
    spec = pipe.manifest.prompt
    text = spec.template.replace(spec.image_placeholder + "\n", "").replace("{prompt}", PROMPT)
    ids = processor.tokenizer(text, return_tensors="pt").input_ids  # the template without its image slot
    assert ids[0].tolist() == pipe.prompt.encode(PROMPT, image=False)[0]
    with torch.no_grad():
        out = model.generate(input_ids=ids, do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW)
    assert list(r.token_ids) == out[0, ids.shape[1] :].tolist()
    assert trace.inputs_embeds.shape[0] == ids.shape[1] and trace.layout is None and trace.pixel_values is None
    assert dict(r.visual_tokens) == {"before": 0, "kept": 0, "per_image": ()} and r.budget["total"] == 0


INTEGER_MAXIMA = [np.uint64(2**64 - 1), np.int64(2**63 - 1), np.uint32(2**32 - 1), np.int32(2**31 - 1),
                  np.int16(2**15 - 1), np.uint16(2**16 - 1), 2**63, 10**30, 2**64 + 7, 10**400]  # fmt: skip


@pytest.mark.parametrize("value", INTEGER_MAXIMA, ids=lambda v: f"{type(v).__name__}-{int(v).bit_length()}bit")
def test_huge_max_new_tokens_of_any_integer_type_is_refused_at_once(pipe, value):
    t0 = time.perf_counter()
    with pytest.raises((GenerationError, PromptError), match="max_new_tokens|context") as info:
        pipe.generate(scene(64, 48), PROMPT, max_new_tokens=value)
    assert time.perf_counter() - t0 < 10 and "\n" not in str(info.value)
    with pytest.raises(GenerationError, match="min_new_tokens"):  # above max_new_tokens
        pipe.generate(scene(64, 48), PROMPT, max_new_tokens=3, min_new_tokens=value)


@pytest.mark.parametrize("kind", [np.int8, np.uint8, np.int32, np.uint64, int])
def test_the_context_limit_holds_for_every_integer_type(tiny_bundle, kind):
    # 600 tokens: the text (~14) + the image's 518 tokens at budget 0.3 (3 partitions) + 3 new tokens fit; 100 new
    # tokens do not: a GenerationError (max_new_tokens takes it past the context; the prompt alone fits)
    with Pipeline.load(tiny_bundle, max_context=600) as small:
        image = scene(64, 48)
        fits = small.generate(image, PROMPT, budget=0.3, max_new_tokens=kind(3), min_new_tokens=kind(3))
        assert len(fits.token_ids) == 3 and all(type(t) is int for t in fits.token_ids)
        assert fits.visual_tokens["kept"] == 518
        with pytest.raises(GenerationError, match="600-token context"):
            small.generate(image, PROMPT, budget=0.3, max_new_tokens=kind(100))
        assert small.active_requests == 0


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"image": "no/such/file.png"}, ImageError, "no/such/file.png"),
        ({"image": np.zeros((0, 0, 3), np.uint8)}, ImageError, "0x0"),
        ({"prompt": "   "}, PromptError, "prompt is empty"),
        ({"prompt": "\x00"}, PromptError, "prompt is empty"),
        ({"prompt": "\u200b\ufeff\u2060 \t"}, PromptError, "prompt is empty"),
        ({"prompt": "look at <image> here <image>"}, PromptError, "2 <image> markers for 1 image"),
        ({"budget": 0.0}, BudgetError, "rate"),
        ({"budget": 1.5}, BudgetError, "rate"),
        ({"alpha": -0.1}, BudgetError, "alpha"),
        ({"distribution": "magic"}, BudgetError, "distribution"),
        ({"max_new_tokens": 0}, GenerationError, "max_new_tokens"),
    ],
)
def test_bad_requests_raise_typed_one_line_errors_and_the_pipeline_stays_usable(pipe, kwargs, error, message):
    args = {"image": scene(300, 300), "prompt": PROMPT, **kwargs}
    with pytest.raises(error, match=message) as info:
        pipe.generate(args.pop("image"), args.pop("prompt"), max_new_tokens=args.pop("max_new_tokens", 2), **args)
    assert "\n" not in str(info.value)
    assert pipe.generate(scene(300, 300), PROMPT, max_new_tokens=2).token_ids


def test_huge_image_is_refused_before_decoding(pipe, tmp_path):
    with pytest.raises(ImageError, match="limit"):
        pipe.generate(np.zeros((9000, 9000, 3), np.uint8), PROMPT, max_new_tokens=1)


def test_threads_get_the_same_answers_as_alone(pipe):
    images = [scene(400 + 97 * i, 300 + 61 * i, seed=i) for i in range(4)]
    alone = [pipe.generate(im, PROMPT, max_new_tokens=6).token_ids for im in images]
    got: dict[int, tuple] = {}

    def work(i):
        got[i] = pipe.generate(images[i % 4], PROMPT, max_new_tokens=6).token_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(got[i] == alone[i % 4] for i in range(8))


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "runtime.infer", *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_cli_json_is_the_last_stdout_line_and_dump_and_picture_are_written(tiny_bundle, tmp_path):
    img = tmp_path / "img.png"
    scene(700, 500).save(img)
    dump, pic = tmp_path / "dump", tmp_path / "kept.png"
    p = run_cli("--artifacts", str(tiny_bundle), "--image", str(img), "--prompt", PROMPT, "--max-new-tokens", "4",
                "--json", "--dump", str(dump), "--show-kept", str(pic))  # fmt: skip
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(result) == {"text", "token_ids", "visual_tokens", "budget", "timings_ms", "provider", "quant", "selector"}
    assert result["quant"] == "none" and result["selector"] == "hired"
    names = {"pixel_values.npy", "early_scores.npy", "late_scores.npy", "kept_indices.json", "inputs_embeds.npy",
             "prefill_logits.npy"}  # fmt: skip
    assert names <= {f.name for f in dump.iterdir()}
    kept = json.loads((dump / "kept_indices.json").read_text())
    assert [len(k) for k in kept["per_image"]] == result["visual_tokens"]["per_image"]
    assert Image.open(pic).size[0] > 336


@pytest.mark.parametrize(
    "override, message",
    [({"--image": "missing.png"}, "missing.png"), ({"--budget": "1.5"}, "rate"), ({"--prompt": ""}, "prompt is empty")],
)
def test_cli_errors_are_one_line_with_exit_code_2(tiny_bundle, tmp_path, override, message):
    img = tmp_path / "img.png"
    scene(300, 200).save(img)
    opts = {"--image": str(img), "--prompt": PROMPT, "--max-new-tokens": "2", **override}
    p = run_cli("--artifacts", str(tiny_bundle), *[x for kv in opts.items() for x in kv])
    assert p.returncode == 2
    assert message in p.stderr and p.stderr.strip().count("\n") == 0, p.stderr


def test_cli_refuses_a_missing_bundle(tmp_path):
    p = run_cli("--artifacts", str(tmp_path / "none"), "--image", "x.png", "--prompt", PROMPT)
    assert p.returncode == 2 and "manifest.json is missing" in p.stderr


def test_runtime_never_imports_torch_or_transformers(tiny_bundle):
    code = (
        "import sys, runtime, hired; from runtime import Pipeline; import runtime.infer, runtime.visualize;"
        f"p = Pipeline.load({str(tiny_bundle)!r});"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]; print(bad); assert not bad"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_gpu_provider_without_gpu_falls_back_to_cpu_with_one_warning_line(tiny_bundle, provider, caplog):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA; the fallback path is not taken")
    with caplog.at_level("WARNING", logger="hired_edge"), Pipeline.load(tiny_bundle, provider=provider) as p:
        r = p.generate(scene(300, 300), PROMPT, max_new_tokens=1)
    assert r.provider == "CPUExecutionProvider"
    warnings = [rec.getMessage() for rec in caplog.records]
    assert sum(f"{provider} requested but this onnxruntime build has no" in w for w in warnings) == 1, warnings
    assert all("\n" not in w for w in warnings)


def test_unknown_provider_is_a_typed_error(tiny_bundle):
    from runtime import ProviderError

    with pytest.raises(ProviderError, match="unknown provider 'npu'; choose one of cpu, cuda, tensorrt"):
        Pipeline.load(tiny_bundle, provider="npu")


def test_session_run_refuses_a_wrong_dtype_naming_the_tensor(pipe):
    proj = pipe.projector
    name = proj.inputs["features"]
    width = pipe.manifest.vision.hidden_size
    with pytest.raises(GenerationError, match=f"projector input '{name}' must be float32, got float64") as info:
        proj.run({name: np.zeros((2, width), np.float64)}, [proj.outputs["projected"]])
    assert "\n" not in str(info.value)
    with pytest.raises(GenerationError, match="has no input 'nope'; its inputs are"):
        proj.run({"nope": np.zeros((2, width), np.float32)})
    (out,) = proj.run({name: np.zeros((2, width), np.float32)}, [proj.outputs["projected"]])
    assert out.shape == (2, pipe.manifest.text.hidden_size)


def test_load_deletes_the_half_deleted_old_bundle_a_killed_export_left_and_nothing_else(tiny_bundle, tmp_path):
    import shutil

    from runtime.leftovers import remove_old_bundles

    bundle = tmp_path / "model"
    shutil.copytree(tiny_bundle, bundle)
    half = tmp_path / ".model.old-q7x_0p2m" / "model.deleting"  # export killed while deleting the previous bundle
    half.mkdir(parents=True)
    (half / "decoder.onnx").write_bytes(b"partial")
    staging = tmp_path / ".model.export-zz9_k1ab"  # an export may be writing now: never touched at load
    staging.mkdir()
    others = [".model.old-notes", "model.old-abcd1234", ".other.old-abcd1234"]
    for name in others:
        (tmp_path / name).mkdir()
    with Pipeline.load(bundle) as p:
        assert p.generate(np.zeros((40, 60, 3), np.uint8), "What is it?", max_new_tokens=1).token_ids
    assert not half.parent.exists()
    assert staging.is_dir() and all((tmp_path / n).is_dir() for n in others)
    assert remove_old_bundles(tmp_path / "missing" / "model") == []
