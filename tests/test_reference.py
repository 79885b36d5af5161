"""export.reference: the torch HiRED golden path equals stock transformers at rate 1.0 and keeps exact budgets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from export.reference import HiredReference, cls_row_attention, feature_block_indices
from hired import NEWLINE, HiredConfig, pack_tokens, plan_budget, select_tokens

PROMPT = "What is in this picture?"
# (width, height): a 2x2 grid (5 images), a portrait 1x2 grid (3 images) and a wide 1x3 grid (4 images).
SIZES = [(800, 600), (420, 900), (1200, 330)]


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB picture: gradients plus noise, so every crop differs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    noise = rng.integers(0, 64, (height, width, 3))
    return Image.fromarray(((base + noise) % 256).astype(np.uint8))


@pytest.fixture(scope="module")
def checkpoint(request, tmp_path_factory):
    """The session's tiny checkpoint (tests/conftest.py), else one built here."""
    try:
        return request.getfixturevalue("tiny_checkpoint")
    except pytest.FixtureLookupError:
        from models.build import build_checkpoint

        return build_checkpoint("tiny", tmp_path_factory.mktemp("ref") / "tiny", log=None)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration.from_pretrained(str(checkpoint)).eval()
    processor = LlavaNextProcessor.from_pretrained(str(checkpoint))
    return model, processor


@pytest.fixture(scope="module")
def ref(loaded):
    return HiredReference(*loaded)


@pytest.fixture(scope="module")
def vision_out(ref):
    """Per size: (pixel_values, layout, features, early, late), computed once."""
    out = {}
    for size in SIZES:
        pixels, layout = ref.preprocess(picture(*size))
        out[size] = (pixels, layout, *ref.vision(pixels))
    return out


def stock_generate(model, processor, template: str, image, max_new_tokens: int):
    """Stock transformers: processor(images, text) -> generate; also the stock inputs_embeds and first logits."""
    inputs = processor(images=image, text=template.replace("{prompt}", PROMPT), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            return_dict_in_generate=True,
            output_logits=True,
        )
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        feats = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
        mask = (inputs["input_ids"] == model.config.image_token_id)[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(mask, torch.cat(feats).to(embeds.dtype))
    new = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    return new, embeds, out.logits[0][0].float().numpy(), inputs["input_ids"][0].tolist()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_rate_one_is_stock_transformers(ref, loaded, size):
    model, processor = loaded
    image = picture(*size)
    out = ref.run(
        image, PROMPT, rate=1.0, alpha=0.3, distribution="official", newlines="none", max_new_tokens=6
    )
    tokens, embeds, logits, input_ids = stock_generate(model, processor, ref.prompt_template, image, 6)

    assert out.visual_tokens == out.layout.stock_tokens
    assert out.inputs_embeds.shape == embeds.shape
    assert torch.allclose(out.inputs_embeds, embeds, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out.prefill_logits, logits, rtol=0, atol=1e-5)
    assert out.token_ids == tokens
    before, after = out.prompt_ids
    assert input_ids[: len(before)] == before and input_ids[len(input_ids) - len(after) :] == after
    assert (np.asarray(input_ids) == model.config.image_token_id).sum() == out.layout.stock_tokens


def test_stock_order_matches_pack_image_features_with_newlines(ref, vision_out):
    """At rate 1.0 the NEWLINE slots are exactly the image_newline rows of transformers' packed features."""
    pixels, layout, features, early, late = vision_out[SIZES[0]]
    cfg = HiredConfig(rate=1.0)
    order = pack_tokens(select_tokens(late, plan_budget(layout, early[0], cfg), layout), layout, cfg)
    visual = ref.project(features, order)
    newline = ref.model.model.image_newline
    rows = torch.isclose(visual, newline.expand_as(visual), rtol=0, atol=0).all(dim=1).numpy()
    np.testing.assert_array_equal(rows, order == NEWLINE)
    assert int((order == NEWLINE).sum()) == layout.unpadded_rows


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_spatial_keeps_exactly_min_of_total_and_capacity(ref, size):
    out = ref.run(picture(*size), PROMPT, rate=0.2, alpha=0.5, max_new_tokens=1)
    layout, plan = out.layout, out.plan
    total = int(layout.n_images * layout.tokens_per_image * 0.2)
    expected = min(total, layout.tokens_per_image + int(layout.capacities.sum()))
    assert plan.total == total
    assert sum(len(k) for k in out.kept_indices) == expected == plan.kept
    assert out.visual_tokens == expected  # newlines="none": the span is the kept tokens only
    assert out.inputs_embeds.shape[1] == len(out.prompt_ids[0]) + expected + len(out.prompt_ids[1])
    assert len(out.token_ids) == 1


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_official_keeps_at_most_total(ref, vision_out, size):
    _, layout, _, early, late = vision_out[size]
    cfg = HiredConfig(rate=0.2, alpha=0.5, distribution="official")
    plan = plan_budget(layout, early[0], cfg)
    keep = select_tokens(late, plan, layout)
    assert sum(len(k) for k in keep) <= plan.total == int(layout.n_images * layout.tokens_per_image * 0.2)
    for i, k in enumerate(keep[1:]):
        assert layout.valid_mask[i][k].all()  # padding removed


def test_visual_span_is_projector_of_kept_tokens_and_newlines(ref, vision_out):
    pixels, layout, features, early, late = vision_out[SIZES[1]]
    cfg = HiredConfig(rate=0.3, alpha=0.5, newlines="rows")
    keep = select_tokens(late, plan_budget(layout, early[0], cfg), layout)
    order = pack_tokens(keep, layout, cfg)
    visual = ref.project(features, order)
    assert visual.shape == (order.shape[0], ref.config.text_config.hidden_size)
    with torch.no_grad():
        full = ref.model.model.multi_modal_projector(features.reshape(-1, features.shape[-1]))
    tokens = order != NEWLINE
    assert torch.allclose(visual[torch.from_numpy(tokens)], full[torch.from_numpy(order[tokens])], atol=1e-6)
    assert torch.equal(visual[torch.from_numpy(~tokens)][0], ref.model.model.image_newline)
    assert (~tokens).sum() > 0


def test_scores_equal_eager_output_attentions(checkpoint, ref, vision_out):
    from transformers import LlavaNextForConditionalGeneration

    eager = LlavaNextForConditionalGeneration.from_pretrained(
        str(checkpoint), attn_implementation="eager"
    ).eval()
    pixels, _, _, early, late = vision_out[SIZES[0]]
    _, early_layer, late_layer = feature_block_indices(eager.config)
    assert (early_layer, late_layer) == (0, eager.config.vision_config.num_hidden_layers - 2)
    with torch.no_grad():
        attentions = eager.model.vision_tower(pixels, output_attentions=True).attentions
    for got, layer in ((early, early_layer), (late, late_layer)):
        want = attentions[layer][:, :, 0, 1:].sum(dim=1).numpy()  # CLS query row, patch columns, summed heads
        assert got.dtype == np.float32 and got.shape == want.shape == (pixels.shape[0], 576)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()


def test_cls_row_attention_keeps_cls_inside_the_softmax(ref):
    attn = ref.model.model.vision_tower.encoder.layers[0].self_attn
    hidden = torch.randn(2, 577, ref.config.vision_config.hidden_size)
    with torch.no_grad():
        scores = cls_row_attention(attn, hidden)
    heads = ref.config.vision_config.num_attention_heads
    assert scores.shape == (2, 576)
    assert (scores.sum(dim=1) < heads).all() and (scores >= 0).all()  # the CLS column's share is missing


def test_hooks_are_removed_after_each_run(ref, vision_out):
    layers = ref.model.model.vision_tower.encoder.layers
    assert all(len(layer.self_attn._forward_pre_hooks) == 0 for layer in layers)


def test_prompt_ids_follow_the_template_with_bos(ref):
    before, after = ref.prompt_ids(PROMPT)
    assert before[0] == ref.bos_token_id
    whole = ref.tokenizer(ref.prompt_template.replace("{prompt}", PROMPT), add_special_tokens=False)[
        "input_ids"
    ]
    assert [*before[1:], ref.image_token_id, *after] == list(whole)


def test_prompt_with_image_placeholder_is_refused(ref):
    with pytest.raises(ValueError, match="<image>"):
        ref.prompt_ids("look at <image> please")


def test_float16_run_keeps_float32_scores_and_the_same_budget():
    """The seeded twin of an export_streaming("tiny") bundle, built directly in float16."""
    half = HiredReference.random("tiny", seed=0, dtype=torch.float16)
    out = half.run(picture(*SIZES[2]), PROMPT, rate=0.2, max_new_tokens=2)
    assert out.inputs_embeds.dtype == torch.float16 and out.pixel_values.dtype == torch.float16
    assert out.early_scores.dtype == np.float32 and np.isfinite(out.late_scores).all()
    layout = out.layout
    assert out.plan.kept == min(int(layout.n_images * 576 * 0.2), 576 + int(layout.capacities.sum()))
    assert len(out.token_ids) == 2
    t = out.timings
    assert t["ttft"] >= t["prefill"] > 0 and t["decode"] >= 0
    # every stage is a difference of microsecond marks: they add up exactly, not within rounding
    assert abs(t["total"] - (t["ttft"] + t["decode"])) < 1e-9
    stages = t["preprocess"] + t["vision"] + t["select"] + t["projector"] + t["prefill"]
    assert abs(t["ttft"] - stages) < 1e-9


# ---------------------------------------------------------------------------------------------- streaming route
# The 7B-shaped streaming route (export.meta, export.stream, export.check, export.watchdog), on the tiny config.


def test_random_weights_depend_only_on_seed_and_name():
    from export.meta import RandomWeights, WeightSpec

    spec = WeightSpec("model.x.weight", (64, 32), np.dtype(np.float16), "normal", 0.02)
    a, b = RandomWeights(7)(spec), RandomWeights(7)(spec)
    other = RandomWeights(7)(WeightSpec("model.y.weight", (64, 32), np.dtype(np.float16), "normal", 0.02))
    assert a.dtype == np.float16 and a.shape == (64, 32)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, other) and not np.array_equal(a, RandomWeights(8)(spec))
    big = RandomWeights(0)(WeightSpec("w", (400, 500), np.dtype(np.float32), "normal", 0.02))
    assert abs(float(big.mean())) < 1e-3 and abs(float(big.std()) - 0.02) < 1e-3
    ones = RandomWeights(0)(WeightSpec("n.weight", (5,), np.dtype(np.float32), "ones", 0.02))
    zeros = RandomWeights(0)(WeightSpec("n.bias", (5,), np.dtype(np.float32), "zeros", 0.02))
    assert (ones == 1).all() and (zeros == 0).all()


def test_meta_model_holds_no_weights_but_real_buffers():
    from export.meta import meta_model, param_inits
    from models.registry import get

    model, buffers = meta_model(get("tiny").llava_config(), torch.float16)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    ids = buffers["model.vision_tower.embeddings.position_ids"]
    assert ids.device.type == "cpu" and torch.equal(ids[0], torch.arange(577))
    assert torch.isfinite(buffers["model.language_model.rotary_emb.inv_freq"]).all()
    kinds = {name: kind for name, kind, _ in param_inits(model).values()}
    assert kinds["model.vision_tower.pre_layrnorm.weight"] == "ones"
    assert kinds["model.language_model.norm.weight"] == "ones"
    assert kinds["model.vision_tower.pre_layrnorm.bias"] == "zeros"
    assert kinds["lm_head.weight"] == "normal"


def shrunken_tiny(folder):
    """A config folder of `tiny` with fewer blocks (vision 3, text 1): the same shapes, a faster trace."""
    from transformers import LlavaNextConfig

    from models.registry import get

    fields = get("tiny").config_dict()
    fields["vision_config"]["num_hidden_layers"] = 3  # feature layer -2: blocks 0 and 1 run; late block 1
    fields["text_config"]["num_hidden_layers"] = 1
    LlavaNextConfig(**fields).save_pretrained(folder)
    return folder


STREAMING_CLI = (
    "import sys, export.meta\n"
    "export.meta.needs_streaming = lambda config, ram_bytes=None: True  # as on a machine too small for the model\n"
    "from export.__main__ import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.mark.slow  # a whole streamed export in a subprocess, then verification: minutes on 2 cores
def test_streamed_bundle_matches_its_torch_twin(tmp_path):
    """`python -m export --random-weights` on a model too large for RAM takes the streaming route by itself, prints
    only its own lines; in onnxruntime the bundle equals the torch model with the same seeded weights
    (export.verify), and the hashes computed while streaming are the files' sha256."""
    import subprocess
    import sys

    import onnx
    from transformers import LlavaNextConfig

    from export.check import check_bundle
    from export.meta import RandomWeights, torch_twin
    from export.verify import verify_bundle
    from runtime.manifest import Manifest

    config_dir = shrunken_tiny(tmp_path / "tiny-3x1")
    out = tmp_path / "bundle"
    args = ["--model", str(config_dir), "--out", str(out), "--random-weights", "--dtype", "fp32", "--seed", "3"]
    done = subprocess.run([sys.executable, "-c", STREAMING_CLI, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0].startswith("[export] streaming route") and "dtype fp32" in lines[0]
    assert [line for line in lines if not line.startswith("[export] ")] == []  # no library chatter
    manifest = Manifest.from_file(out)  # re-hashes every file against the streamed sha256
    assert manifest.files["decoder_data"] == "decoder.onnx.data" and manifest.model.random_weights
    assert manifest.export_info["seed"] == 3 and manifest.export_info["peak_rss_bytes"] > 0
    assert (manifest.vision.early_layer, manifest.vision.late_layer, manifest.text.num_layers) == (0, 1, 1)
    decoder = onnx.load(str(out / "decoder.onnx"), load_external_data=False)
    assert {m.key: m.value for m in decoder.metadata_props}["hired_edge.kv_cache"] == "shared-buffer"
    inline = [t for t in decoder.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert all(int(np.prod(t.dims)) < 4096 for t in inline)  # only buffers and folded constants stay inline
    external = {t.name for t in decoder.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert {"head.weight", "lm.norm.weight"} <= external and "lm.embed_tokens.weight" not in external
    lines = check_bundle(out, log=None)  # onnx.checker, graph I/O against the manifest, 1 crop in onnxruntime
    assert len(lines) == 5

    twin = torch_twin(LlavaNextConfig.from_pretrained(config_dir), RandomWeights(3))
    embed = np.load(out / "embed_tokens.npy")
    np.testing.assert_array_equal(embed, twin.get_input_embeddings().weight.detach().numpy())
    assert verify_bundle(out, twin, log=None, steps=8).ok


def test_the_weight_writer_writes_what_the_per_tensor_hook_returns(tmp_path):
    """write_graph(transform=...) calls the hook once per weight with its spec and drawn values and writes the
    array it returns: zeroed weights make the projector's output exactly its (zero) biases."""
    import onnxruntime as ort

    from export.meta import RandomWeights, meta_model, trace_graph
    from export.stream import write_graph
    from models.registry import get

    model, buffers = meta_model(get("tiny").llava_config(), torch.float32)
    onnx_model, specs = trace_graph(model, "projector", buffers, opset=23)
    seen = {}

    def zero(spec, values):
        seen[spec.name] = values.shape
        assert values.shape == spec.shape and values.dtype == spec.dtype
        return np.zeros_like(values)

    hashes = write_graph(onnx_model, specs, tmp_path, "projector", RandomWeights(0), transform=zero)
    assert set(hashes) == {"projector", "projector_data"}
    assert seen == {spec.name: spec.shape for _, spec in specs} and "model.multi_modal_projector.linear_1.weight" in seen
    session = ort.InferenceSession(str(tmp_path / "projector.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((3, 128)).astype(np.float32)
    (y,) = session.run(None, {"image_features": x})
    assert y.shape == (3, 128) and not y.any()


def test_memory_watchdog_aborts_with_a_clear_message(tmp_path):
    import subprocess
    import sys

    marker = tmp_path / "staging"
    marker.mkdir()
    code = (
        "import shutil, time, numpy as np\n"
        "from export.watchdog import MemoryWatchdog, rss_bytes\n"
        f"with MemoryWatchdog(rss_bytes() + 200 * 2**20, on_abort=lambda: shutil.rmtree({str(marker)!r}),"
        " interval=0.05) as w:\n"
        "    w.stage = 'write decoder'\n"
        "    big = np.ones(600 * 2**20, dtype=np.uint8)\n"
        "    time.sleep(5)\n"
        "print('not aborted')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert (
        "passed the" in done.stderr and "'write decoder'" in done.stderr and "not aborted" not in done.stdout
    )
    assert not marker.exists()  # the staging folder was discarded


def test_seven_b_needs_the_streaming_route_on_24_gib():
    from export.meta import needs_streaming
    from models.registry import get

    # 7.06 B parameters = 28.3 GB in float32, over a third of 24 GiB (and of 64 GiB); tiny is 40 MB.
    assert needs_streaming(get("llava-next-7b").llava_config(), ram_bytes=64 * 2**30)
    assert not needs_streaming(get("tiny").llava_config(), ram_bytes=24 * 2**30)
