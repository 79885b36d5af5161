"""The decoder graph and its runner: GroupQueryAttention reads the KV cache in place, one buffer per request."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from runtime.decoder import CONCAT, KV_CACHE_KEY, SHARED, Decoder, cache_device
from runtime.errors import GenerationError
from runtime.manifest import Manifest
from runtime.session import OrtSession
from tests.helpers import rss_mb


@pytest.fixture(scope="module")
def manifest(tiny_bundle) -> Manifest:
    return Manifest.from_file(tiny_bundle)


@pytest.fixture(scope="module")
def session(manifest) -> OrtSession:
    return OrtSession.from_manifest(manifest, "decoder", threads=2)


@pytest.fixture(scope="module")
def embed(manifest) -> np.ndarray:
    return np.load(manifest.path("embed_tokens"))


def decoder(session, embed, text, kind: str | None = None) -> Decoder:
    dec = Decoder(session, embed, text)
    if kind is not None:
        dec.kv_cache = kind  # the same graph driven the other way (GroupQueryAttention also takes a growing past)
    return dec


def prompt(embed, n: int, seed: int = 0) -> np.ndarray:
    return embed[np.random.default_rng(seed).integers(3, 32000, n)]


# ---------------------------------------------------------------------------------------------- the graph
def test_only_group_query_attention_reads_the_past(manifest):
    graph = onnx.load(str(manifest.path("decoder")), load_external_data=False)
    past = {i.name for i in graph.graph.input if i.name.startswith("past_key_values.")}
    readers = [n for n in graph.graph.node if set(n.input) & past]
    assert {n.op_type for n in readers} <= {"GroupQueryAttention", "Shape"}
    gqa = [n for n in graph.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == manifest.text.num_layers
    for i, node in enumerate(gqa):  # past i in, present i out: the pair the runtime binds to one buffer
        assert list(node.input[3:5]) == [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        assert list(node.output[1:3]) == [f"present.{i}.key", f"present.{i}.value"]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert (attrs["num_heads"], attrs["kv_num_heads"]) == (4, manifest.text.num_kv_heads)
        # packed q/k/v in `query`; rotary inside, from cos/sin caches as long as the context, at position_ids
        assert node.input[1] == node.input[2] == "" and attrs["do_rotary"] == 1
        cos = next(t for t in graph.graph.initializer if t.name == node.input[7])
        assert list(cos.dims) == [manifest.text.max_position_embeddings, manifest.text.head_dim // 2]
        assert node.input[9] == "position_ids"
    ops = {n.op_type for n in graph.graph.node}
    assert not ops & {"Attention", "Expand", "Concat", "If"}  # no concatenated cache, no repeat_kv, no mask blocks
    assert not ops & {"RotaryEmbedding", "Cos", "Sin"}
    assert {p.key: p.value for p in graph.metadata_props}[KV_CACHE_KEY] == SHARED


def test_linear_layers_stay_plain_matmuls_on_weight_initialisers(manifest):
    """What a weight-only quantizer turns into MatMulNBits: MatMul(x, W) with W an [in, out] initialiser; q, k and v
    are one MatMul on their concatenated weights, whose output is GroupQueryAttention's packed query."""
    graph = onnx.load(str(manifest.path("decoder")), load_external_data=False).graph
    weights = {t.name: list(t.dims) for t in graph.initializer}
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 5 * manifest.text.num_layers + 1  # qkv, o, gate, up, down per layer; lm_head
    assert all(len(weights.get(n.input[1], [])) == 2 for n in matmuls)
    assert weights[matmuls[-1].input[1]] == [manifest.text.hidden_size, manifest.text.vocab_size]
    t = manifest.text
    queries = {n.input[0] for n in graph.node if n.op_type == "GroupQueryAttention"}
    packed = [weights[n.input[1]] for n in matmuls if n.output[0] in queries]
    assert packed == [[t.hidden_size, (4 + 2 * t.num_kv_heads) * t.head_dim]] * t.num_layers  # tiny: 4 heads


def test_a_graph_without_attention_keeps_the_concat_form(tmp_path):
    """Opset 18 decoders (primitive attention ops) are left as they are and say so in their metadata."""
    from export.decoder import rewrite_attention

    past = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, [1, 2, "p", 4])
    new = helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, 2, "s", 4])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, "t"])
    out = helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, [1, 2, "t", 4])
    node = helper.make_node("Concat", ["past_key_values.0.key", "k"], ["present.0.key"], axis=2)
    model = helper.make_model(helper.make_graph([node], "g", [past, new, mask], [out]))
    path = tmp_path / "decoder.onnx"
    onnx.save(model, path)
    text = types.SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
    assert rewrite_attention(path, text) == CONCAT
    again = onnx.load(str(path))
    assert [n.op_type for n in again.graph.node] == ["Concat"]
    assert {p.key: p.value for p in again.metadata_props}[KV_CACHE_KEY] == CONCAT


# ---------------------------------------------------------------------------------------------- the runner
def test_shared_buffer_and_concat_runs_give_the_same_logits(session, embed, manifest):
    shared, concat = decoder(session, embed, manifest.text), decoder(session, embed, manifest.text, CONCAT)
    assert shared.kv_cache == SHARED
    x = prompt(embed, 37)
    a, ca = shared.prefill(x, max_new_tokens=12)
    b, cb = concat.prefill(x, max_new_tokens=12)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert ca.capacity == 37 + 12 and ca.values[0].shape() == [1, manifest.text.num_kv_heads, 49, 32]
    for position in range(37, 48):
        token = int(np.argmax(a))
        assert token == int(np.argmax(b))
        a, ca = shared.step(token, position, ca)
        b, cb = concat.step(token, position, cb)
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert ca.length == cb.length == 48 and cb.values[0].shape[2] == 48
    k = ca.values[0].numpy()[:, :, :48]  # the shared buffer holds what the concat run returned, in place
    np.testing.assert_allclose(k, cb.values[0], atol=1e-5)


def test_a_chunked_prefill_equals_one_call(session, embed, manifest, monkeypatch):
    """Prefill in chunks (each attending to the cache written so far) gives the logits and cache of one call."""
    import runtime.decoder

    x = prompt(embed, 37, seed=1)
    whole, cw = decoder(session, embed, manifest.text, CONCAT).prefill(x, max_new_tokens=4)
    calls = []
    dec = decoder(session, embed, manifest.text)
    run = dec._run
    dec._run = lambda e, start, cache: calls.append((start, e.shape[0])) or run(e, start, cache)
    monkeypatch.setattr(runtime.decoder, "PREFILL_CHUNK", 8)
    chunked, cc = dec.prefill(x, max_new_tokens=4)
    assert calls == [(0, 8), (8, 8), (16, 8), (24, 8), (32, 5)]
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    np.testing.assert_allclose(cc.values[1].numpy()[:, :, :37], cw.values[1], atol=1e-5)


def test_a_decode_to_the_context_limit_reuses_one_buffer_and_keeps_memory_flat(session, embed, manifest):
    limit = 1024  # a model context of 1,024 tokens: a 1-token prompt then 1,023 decode steps fill it
    dec = decoder(session, embed, dataclasses.replace(manifest.text, max_position_embeddings=limit))
    logits, cache = dec.prefill(prompt(embed, 1), max_new_tokens=limit - 1)
    ptrs = cache.data_ptrs()
    assert cache.capacity == limit and len(set(ptrs)) == 2 * manifest.text.num_layers
    rss = []
    for position in range(1, limit):
        logits, cache = dec.step(int(np.argmax(logits)), position, cache)
        assert cache.data_ptrs() == ptrs  # written in place, never regrown
        if position in (64, limit - 1):
            rss.append(rss_mb(trim=True))
    assert cache.length == limit and np.isfinite(logits).all()
    assert rss[1] - rss[0] < 8, f"resident memory grew {rss[1] - rss[0]:.1f} MB over {limit - 65} decode steps"
    with pytest.raises(GenerationError, match=f"holds {limit} tokens"):
        dec.step(0, limit, cache)


class CountingSession:
    """An OrtSession stand-in that counts graph runs."""

    def __init__(self, session):
        self._s, self.runs = session, 0
        self.inputs, self.outputs, self.session, self.dtype = session.inputs, session.outputs, session.session, session.dtype
        self.metadata, self.io_binding = session.metadata, session.io_binding

    def run(self, *a, **k):
        self.runs += 1
        return self._s.run(*a, **k)

    def run_with_binding(self, binding):
        self.runs += 1
        return self._s.run_with_binding(binding)


@pytest.mark.parametrize("kind", [SHARED, CONCAT])
def test_a_request_longer_than_the_context_is_refused_before_any_graph_runs(session, embed, manifest, kind):
    counting = CountingSession(session)
    dec = decoder(counting, embed, dataclasses.replace(manifest.text, max_position_embeddings=300), kind)
    with pytest.raises(GenerationError, match="301 tokens .* exceeds the decoder's 300-token context") as info:
        dec.prefill(prompt(embed, 201), max_new_tokens=100)
    assert counting.runs == 0 and "\n" not in str(info.value)
    logits, cache = dec.prefill(prompt(embed, 200), max_new_tokens=100)  # exactly the context: fine
    assert counting.runs == 1 and cache.capacity == 300


@pytest.mark.parametrize(
    "providers, device",
    [
        (["CPUExecutionProvider"], ("cpu", 0)),
        (["CUDAExecutionProvider", "CPUExecutionProvider"], ("cuda", 0)),
        (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], ("cuda", 0)),
        ([], ("cpu", 0)),
    ],
)
def test_the_cache_lives_on_the_device_of_the_session_provider(providers, device):
    assert cache_device(providers) == device


def test_a_cpu_session_keeps_its_cache_in_cpu_memory(session, embed, manifest):
    dec = decoder(session, embed, manifest.text)
    assert session.session.get_providers()[0] == "CPUExecutionProvider" and dec.device == ("cpu", 0)
    cache = dec.new_cache(8)
    assert {v.device_name() for v in cache.values} == {"cpu"}


@pytest.mark.slow  # exports an fp16 tiny model (~10 s)
def test_an_fp16_export_reads_its_cache_in_place_too(tmp_path):
    """fp16 exports spell rotary out (Mul/Slice/Neg on [b, h, s, hd]); they get GroupQueryAttention all the same,
    and the bound-buffer run stays within fp16 rounding of the fp32 torch model."""
    import onnxruntime as ort
    import torch

    from export.decoder import DecoderWrapper, export_decoder
    from models import registry
    from models.build import random_model

    config = registry.get("tiny").llava_config()
    config.text_config.num_hidden_layers = 1  # one block keeps this extra export short
    model = random_model(config, seed=0)
    x = torch.randn(1, 20, 128, generator=torch.Generator().manual_seed(0)) * 0.5
    wrapper = DecoderWrapper(model.model.language_model, model.lm_head).eval()
    with torch.no_grad():
        want = wrapper(x, torch.ones(1, 20, dtype=torch.int64), torch.arange(20)[None], *[torch.zeros(1, 2, 0, 32)] * 2)
    want = want[0].reshape(-1).numpy()
    path = export_decoder(model.half(), tmp_path / "decoder.onnx", opset=23)
    graph = onnx.load(str(path), load_external_data=False)
    assert {p.key: p.value for p in graph.metadata_props}[KV_CACHE_KEY] == SHARED
    past = {"past_key_values.0.key", "past_key_values.0.value"}
    assert {n.op_type for n in graph.graph.node if set(n.input) & past} == {"GroupQueryAttention"}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cache = [ort.OrtValue.ortvalue_from_shape_and_type((1, 2, 24, 32), np.float16, "cpu", 0) for _ in range(2)]
    binding = sess.io_binding()
    binding.bind_output("logits", "cpu")
    binding.bind_cpu_input("inputs_embeds", x.numpy().astype(np.float16))
    binding.bind_cpu_input("attention_mask", np.ones((1, 20), np.int64))
    binding.bind_cpu_input("position_ids", np.arange(20)[None])
    for value, name in zip(cache, ("key", "value")):
        binding.bind_ortvalue_input(f"past_key_values.0.{name}", value)
        binding.bind_ortvalue_output(f"present.0.{name}", value)
    sess.run_with_iobinding(binding)
    got = binding.get_outputs()[0].numpy().reshape(-1)
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()
    assert int(np.argmax(got)) == int(np.argmax(want))


# ---------------------------------------------------------------------------------------------- streamed graphs
def reads_past_in_place(graph: onnx.ModelProto) -> bool:
    """Every node reading a past K/V input is a GroupQueryAttention (or a Shape); metadata says shared-buffer."""
    past = {i.name for i in graph.graph.input if i.name.startswith("past_key_values.")}
    readers = {n.op_type for n in graph.graph.node if set(n.input) & past}
    ops = {n.op_type for n in graph.graph.node}
    meta = {p.key: p.value for p in graph.metadata_props}
    return readers <= {"GroupQueryAttention", "Shape"} and not ops & {"Attention", "Expand", "If"} and (
        meta[KV_CACHE_KEY] == SHARED
    )


def streamed_decoder(folder, name: str, dtype: str, quant: str = "none", weights=None, shrink: bool = False):
    """decoder.onnx of registry model `name` with one text block, as the streaming route writes it (traced on the
    meta device, weights streamed, quantized and rewritten by export.stream.write_traced). `shrink` cuts the MLP
    and vocabulary (not the attention) of 7B shapes. Returns (path, config)."""
    from export.meta import RandomWeights, meta_model, trace_graph
    from export.stream import AS_TORCH, write_traced
    from models import registry

    config = registry.get(name).llava_config()
    text = config.text_config
    text.num_hidden_layers = 1
    if shrink:
        text.intermediate_size, text.vocab_size = 64, 512
    model, buffers = meta_model(config, AS_TORCH[dtype])
    onnx_model, specs = trace_graph(model, "decoder", buffers, 23)
    fill = weights or RandomWeights(0)
    write_traced(onnx_model, specs, folder, "decoder", fill, text, quant=quant)
    return folder / "decoder.onnx", config


def run_bound(path, x: np.ndarray, kv_heads: int, head_dim: int, split: int) -> list[np.ndarray]:
    """Prefill x[:split] then decode x[split:] one row at a time, past and present bound to one buffer per tensor
    (as runtime/decoder.py does): the logits of each call."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    dtype = np.float16 if sess.get_inputs()[0].type == "tensor(float16)" else np.float32
    n = x.shape[0]
    cache = [ort.OrtValue.ortvalue_from_shape_and_type((1, kv_heads, n, head_dim), dtype, "cpu", 0) for _ in range(2)]
    out = []
    for lo, hi in [(0, split), *((i, i + 1) for i in range(split, n))]:
        binding = sess.io_binding()
        binding.bind_output("logits", "cpu")
        binding.bind_cpu_input("inputs_embeds", x[None, lo:hi].astype(dtype))
        binding.bind_cpu_input("attention_mask", np.ones((1, hi), np.int64))
        binding.bind_cpu_input("position_ids", np.arange(lo, hi)[None])
        for value, name in zip(cache, ("key", "value")):
            binding.bind_ortvalue_input(f"past_key_values.0.{name}", value)
            binding.bind_ortvalue_output(f"present.0.{name}", value)
        sess.run_with_iobinding(binding)
        out.append(binding.get_outputs()[0].numpy().reshape(-1).astype(np.float32))
    return out


def torch_logits(config, dtype: str, x: np.ndarray, split: int) -> list[np.ndarray]:
    """The seeded torch twin's last-position logits (fp32 compute) for x[:split], x[:split+1], ..., x[:n]."""
    import torch

    from export.decoder import DecoderWrapper
    from export.meta import RandomWeights, torch_twin
    from export.stream import AS_TORCH

    twin = torch_twin(config, RandomWeights(0), dtype=AS_TORCH[dtype]).float()
    wrapper = DecoderWrapper(twin.model.language_model, twin.lm_head).eval()
    kv, hd = config.text_config.num_key_value_heads, config.text_config.head_dim
    out = []
    with torch.no_grad():
        for end in range(split, x.shape[0] + 1):
            t = torch.from_numpy(x[None, :end].astype(np.float32))
            past = [torch.zeros(1, kv, 0, hd)] * 2
            logits = wrapper(t, torch.ones(1, end, dtype=torch.int64), torch.arange(end)[None], *past)
            out.append(logits[0].reshape(-1).numpy())
    return out


@pytest.mark.slow  # four streamed exports (~10 s each)
@pytest.mark.parametrize("dtype, quant", [("fp32", "none"), ("fp16", "none"), ("fp32", "int4"), ("fp16", "int4")])
def test_a_streamed_decoder_reads_its_cache_in_place_and_equals_its_torch_twin(tmp_path, dtype, quant):
    """The streaming route's graph (its attention output takes one more, shape-keeping Reshape) gets
    GroupQueryAttention on a shared buffer like the in-memory route's; bound-buffer prefill + decode logits equal
    the seeded torch twin's (fp32 to float rounding, fp16 within fp16 rounding; int4 keeps the argmax mostly)."""
    path, config = streamed_decoder(tmp_path, "tiny", dtype, quant)
    graph = onnx.load(str(path), load_external_data=False)
    assert reads_past_in_place(graph)
    assert sum(n.op_type == "GroupQueryAttention" for n in graph.graph.node) == 1
    gqa = next(n for n in graph.graph.node if n.op_type == "GroupQueryAttention")
    if dtype == "fp32":  # the in-memory route's form: packed q/k/v (one byte range of the data file), rotary inside
        qkv = next(n for n in graph.graph.node if gqa.input[0] in n.output)
        assert qkv.op_type == ("MatMul" if quant == "none" else "MatMulNBits") and gqa.input[1] == gqa.input[2] == ""
        assert {a.name: helper.get_attribute_value(a) for a in gqa.attribute}["do_rotary"] == 1
        assert not {n.op_type for n in graph.graph.node} & {"RotaryEmbedding", "Cos", "Sin"}
    x = np.random.default_rng(0).standard_normal((24, config.text_config.hidden_size)).astype(np.float32) * 0.5
    text = config.text_config
    got = run_bound(path, x, text.num_key_value_heads, text.head_dim, split=20)
    want = torch_logits(config, dtype, x, split=20)
    for g, w in zip(got, want):
        if quant != "none":
            assert np.isfinite(g).all() and np.corrcoef(g, w)[0, 1] > 0.9
        elif dtype == "fp16":
            assert np.abs(g - w).max() < 0.02 * np.abs(w).max() and int(np.argmax(g)) == int(np.argmax(w))
        else:
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(w).max())


def _architectures() -> list[str]:
    """One registry model per attention form (text model type, grouped or not), besides `tiny`."""
    from models import registry

    seen, names = {("mistral", True)}, []  # tiny: the test above
    for name in registry.names():
        text = registry.get(name).llava_config().text_config
        form = (text.model_type, text.num_key_value_heads != text.num_attention_heads)
        if form not in seen and getattr(text, "sliding_window", None) is None:
            seen.add(form)
            names.append(name)
    return names


@pytest.mark.slow  # one streamed trace per attention form (~10 s each)
@pytest.mark.parametrize("name", _architectures())
def test_every_registered_architecture_gets_the_shared_buffer_when_streamed(tmp_path, name):
    """A default (opset 23, fp16) streamed export of a supported model never falls back to the concat form
    silently: LLaMA (7B/13B, no KV grouping) and Mistral (grouped KV) both get GroupQueryAttention."""
    path, _ = streamed_decoder(
        tmp_path, name, "fp16", weights=lambda spec: np.zeros(spec.shape, spec.dtype), shrink=True
    )
    assert reads_past_in_place(onnx.load(str(path), load_external_data=False))
