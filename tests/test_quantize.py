"""export/quantize.py and runtime/quant.py: int4/int8 MatMulNBits weights for the decoder.

The per-tensor quantizer equals onnxruntime's own and dequantizes back within half a step; the graph pass equals
onnxruntime's MatMulNBitsQuantizer; int4 and int8 tiny bundles load and generate; bad values are one line.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.quantize import (
    check_block_size,
    dequantize_weight,
    quantize_graph,
    quantize_weight,
    requantize,
)
from runtime.errors import BundleError
from runtime.quant import check_method, check_onnxruntime, version_tuple


def _ort_reference(w: np.ndarray, bits: int, block: int):
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False, bits=bits)
    return DefaultWeightOnlyQuantizer(config).qbits_block_quant(w)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("k", [128, 100])  # 100: the last block is padded
def test_quantize_weight_equals_onnxruntime_quantizer(bits, dtype, k):
    w = (np.random.default_rng(k + bits).standard_normal((k, 48)) * 0.05).astype(dtype)
    q = quantize_weight(w, bits, 32)
    packed, scales, zero_points = _ort_reference(w, bits, 32)
    blocks = -(-k // 32)
    assert q.packed.shape == (48, blocks, 32 * bits // 8) and q.packed.dtype == np.uint8
    assert q.scales.shape == (48, blocks) and q.scales.dtype == dtype
    np.testing.assert_array_equal(q.packed, packed)
    np.testing.assert_array_equal(q.scales, scales)
    np.testing.assert_array_equal(q.zero_points, zero_points)


@pytest.mark.parametrize("bits, rel_rms", [(4, 0.12), (8, 0.008)])
def test_dequantized_weight_is_within_half_a_step(bits, rel_rms):
    w = np.random.default_rng(bits).standard_normal((96, 40)).astype(np.float32) * 0.02
    q = quantize_weight(w, bits, 32)
    back = dequantize_weight(q)
    assert back.shape == w.shape
    step = np.repeat(q.scales.T.astype(np.float32), 32, axis=0)[:96]  # [K, N]: each value's block scale
    assert np.all(np.abs(back - w) <= step / 2 * 1.001 + 1e-7)
    assert np.sqrt(np.mean((back - w) ** 2)) / np.sqrt(np.mean(w**2)) < rel_rms


def _two_layer_model(k: int = 64, hidden: int = 96, n: int = 32) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array((rng.standard_normal((k, hidden)) * 0.1).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((hidden, n)) * 0.1).astype(np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
        helper.make_node("MatMul", ["x", "x_t"], ["gram"], name="activations_only"),  # no weight: left alone
    ]
    graph = helper.make_graph(
        nodes,
        "two_layers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", k]),
         helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [1, k, "s"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "s", n]),
         helper.make_tensor_value_info("gram", TensorProto.FLOAT, [1, "s", "s"])],
        [w1, w2],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x, "x_t": x.transpose(0, 2, 1).copy()})


@pytest.mark.parametrize("bits", [4, 8])
def test_graph_pass_equals_onnxruntime_matmul_nbits_quantizer(bits):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    ours = _two_layer_model()
    assert quantize_graph(ours, bits, 32, accuracy_level=4) == 2
    theirs = MatMulNBitsQuantizer(_two_layer_model(), bits=bits, block_size=32, is_symmetric=False, accuracy_level=4)
    theirs.process()
    theirs = theirs.model.model

    def summary(m):
        inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
        out = []
        for node in m.graph.node:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            values = [inits[i].tobytes() for i in node.input if i in inits]
            out.append((node.op_type, node.domain, sorted(attrs.items()), values))
        return out

    assert summary(ours) == summary(theirs)
    assert {t.name for t in ours.graph.initializer}.isdisjoint({"w1", "w2"})  # the float weights are gone
    x = np.random.default_rng(1).standard_normal((1, 5, 64)).astype(np.float32)
    y_ours, gram = _run(ours, x)
    y_theirs, _ = _run(theirs, x)
    np.testing.assert_array_equal(y_ours, y_theirs)
    np.testing.assert_array_equal(gram, x @ x.transpose(0, 2, 1))
    # and it computes x @ dequantized(W): the activations' int8 rounding (accuracy_level 4) is all that differs
    ref = _two_layer_model()
    w1, w2 = (numpy_helper.to_array(t) for t in ref.graph.initializer)
    deq = lambda w: dequantize_weight(quantize_weight(w, bits, 32))  # noqa: E731
    expect = np.maximum(x @ deq(w1), 0) @ deq(w2)
    assert np.abs(y_ours - expect).max() < 0.05 * np.abs(expect).max()


def test_graph_pass_quantizes_a_shared_weight_once_and_keeps_other_readers():
    rng = np.random.default_rng(2)
    w = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"]),
        helper.make_node("MatMul", ["x", "w"], ["b"]),
        helper.make_node("Identity", ["w"], ["w_out"]),  # a non-MatMul reader keeps the float weight alive
    ]
    f = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)  # noqa: E731
    graph = helper.make_graph(nodes, "shared", [f("x", [2, 64])], [f("a", [2, 32]), f("b", [2, 32]), f("w_out", [64, 32])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    assert quantize_graph(model, 4, 32) == 2
    names = [t.name for t in model.graph.initializer]
    assert names.count("w") == 1 and sum(n.endswith("_Q4") for n in names) == 1
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a, b, w_out = sess.run(None, {"x": rng.standard_normal((2, 64)).astype(np.float32)})
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(w_out, numpy_helper.to_array(w))


@dataclass(frozen=True)
class _Spec:  # the fields of export.meta.WeightSpec that plan_streaming and the writer use
    name: str
    shape: tuple
    dtype: np.dtype
    kind: str = "normal"
    std: float = 0.02


@pytest.mark.parametrize("bits", [4, 8])
def test_streaming_plan_quantizes_while_writing_like_the_graph_pass(bits):
    """plan_streaming on a data-less graph + a writer that draws one weight at a time = quantize_graph on the
    loaded graph; the traced form Transpose(W [N, K]) -> MatMul and the plain MatMul(x, W [K, N]) both."""
    import onnx_ir as ir

    from export.quantize import plan_streaming

    rng = np.random.default_rng(4)
    w1_nk = (rng.standard_normal((96, 64)) * 0.1).astype(np.float32)  # nn.Linear(64 -> 96).weight
    w2 = (rng.standard_normal((96, 32)) * 0.1).astype(np.float32)
    f = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)  # noqa: E731
    nodes = [
        helper.make_node("Transpose", ["w1"], ["w1_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w1_t"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
    ]
    inits = [numpy_helper.from_array(w1_nk, "w1"), numpy_helper.from_array(w2, "w2")]
    graph = helper.make_graph(nodes, "traced", [f("x", [1, "s", 64])], [f("y", [1, "s", 32])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    values = {"w1": w1_nk, "w2": w2}

    model = ir.from_proto(proto)
    specs = []
    for name in ("w1", "w2"):
        v = model.graph.initializers[name]
        v.const_value = None  # data-less, as export.meta.trace_graph leaves parameters
        specs.append((v, _Spec(name, values[name].shape, np.dtype(np.float32))))
    specs, transform = plan_streaming(model, specs, f"int{bits}", 32)
    assert len(specs) == 6  # each weight -> packed, scales, zero points, in writing order
    for value, spec in specs:  # what export.stream.write_graph does, inline instead of external data
        drawn = values[spec.name] if spec.kind != "zeros" else np.zeros(spec.shape, spec.dtype)
        out = np.ascontiguousarray(transform(spec, drawn))
        value.shape, value.dtype = ir.Shape(out.shape), ir.DataType.from_numpy(out.dtype)
        value.const_value = ir.tensor(out, name=value.name)
    streamed = ir.to_proto(model)
    assert [n.op_type for n in streamed.graph.node] == ["MatMulNBits", "Relu", "MatMulNBits"]  # Transpose gone

    plain = helper.make_model(
        helper.make_graph(
            [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])],
            "plain", [f("x", [1, "s", 64])], [f("y", [1, "s", 32])],
            [numpy_helper.from_array(np.ascontiguousarray(w1_nk.T), "w1"), numpy_helper.from_array(w2, "w2")],
        ),
        opset_imports=[helper.make_opsetid("", 21)],
    )  # fmt: skip
    quantize_graph(plain, bits, 32)
    by_name = lambda m: {t.name: numpy_helper.to_array(t).tobytes() for t in m.graph.initializer}  # noqa: E731
    assert by_name(streamed) == by_name(plain)
    x = rng.standard_normal((1, 7, 64)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})  # noqa: E731
    np.testing.assert_array_equal(run(streamed)[0], run(plain)[0])


@pytest.mark.slow
def test_streaming_route_writes_an_int4_bundle_that_generates(tmp_path):
    """export.stream.write_streaming(..., quant="int4") on tiny: MatMulNBits decoder, manifest quant, generates."""
    import torch

    from export.meta import RandomWeights, meta_model, model_config, param_inits
    from export.stream import write_streaming
    from runtime import Pipeline

    write_streaming(tmp_path, "tiny", "fp32", quant="int4", log=None)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["quant"] == {"method": "int4", "block_size": 32, "accuracy_level": 4}
    ops, weight_matmuls = _decoder_ops(tmp_path)
    # tiny: 2 layers x (packed qkv, o, gate, up, down) + lm_head, as the in-memory route quantizes it
    assert ops.get("MatMulNBits") == 11 and weight_matmuls == 0
    graph = onnx.load(str(tmp_path / "decoder.onnx"), load_external_data=False).graph
    nbits = {n.output[0]: n for n in graph.node if n.op_type == "MatMulNBits"}
    queries = [nbits.get(n.input[0]) for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert [helper.get_attribute_value(next(a for a in q.attribute if a.name == "N")) for q in queries] == [256] * 2
    model = onnx.load(str(tmp_path / "decoder.onnx"))
    packed = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("_Q4")}
    head = next(v for k, v in packed.items() if "head" in k)
    config = model_config("tiny")[0]
    model_meta, _ = meta_model(config, torch.float32)
    init = param_inits(model_meta)[id(model_meta.lm_head.weight)]
    spec = _Spec(init.name, tuple(model_meta.lm_head.weight.shape), np.dtype(np.float32), init.kind, init.std)
    np.testing.assert_array_equal(head, quantize_weight(RandomWeights(0)(spec).T, 4, 32).packed)
    image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    with Pipeline.load(tmp_path) as p:
        r = p.generate(image, "What is this?", max_new_tokens=4, min_new_tokens=4)
    assert r.quant == "int4" and len(r.token_ids) == 4


def test_block_size_must_be_a_power_of_two_from_16():
    for ok in (16, 32, 128):
        check_block_size(ok)
    for bad in (8, 48, 0, -32, True):
        with pytest.raises(ValueError, match="power of 2 >= 16"):
            check_block_size(bad)


# ---- bundles ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def int4_bundle(tiny_checkpoint, tmp_path_factory):
    """Through the CLI: python -m export --model <tiny> --out DIR --quant int4."""
    from export.__main__ import main

    out = tmp_path_factory.mktemp("quant") / "tiny-int4"
    assert main(["--model", str(tiny_checkpoint), "--out", str(out), "--quant", "int4"]) == 0
    return out


@pytest.fixture(scope="module")
def int8_bundle(tiny_bundle, tmp_path_factory):
    """Through export.quantize.requantize: the float tiny bundle's decoder quantized into a new bundle."""
    out = tmp_path_factory.mktemp("quant") / "tiny-int8"
    return requantize(tiny_bundle, out, "int8", 32)


def _decoder_ops(bundle) -> tuple[dict[str, int], int]:
    model = onnx.load(str(bundle / "decoder.onnx"))
    inits = {t.name for t in model.graph.initializer}
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    weight_matmuls = sum(1 for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits)
    return ops, weight_matmuls


@pytest.mark.parametrize("method, fixture", [("int4", "int4_bundle"), ("int8", "int8_bundle")])
def test_quantized_tiny_bundles_load_and_generate(method, fixture, request, tiny_bundle):
    from runtime import Pipeline

    bundle = request.getfixturevalue(fixture)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["quant"] == {"method": method, "block_size": 32, "accuracy_level": 4}
    ops, weight_matmuls = _decoder_ops(bundle)
    # tiny: 2 layers x (packed qkv, o, gate, up, down) + lm_head
    assert ops.get("MatMulNBits") == 11 and weight_matmuls == 0
    float_manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    for part in ("vision", "projector", "embed_tokens"):  # only the decoder is quantized
        assert manifest["sha256"][part] == float_manifest["sha256"][part]
    small = (bundle / "decoder.onnx").stat().st_size
    assert small < (tiny_bundle / "decoder.onnx").stat().st_size / (3 if method == "int4" else 2)

    image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    with Pipeline.load(bundle) as p:
        r = p.generate(image, "What is this?", budget=0.2, max_new_tokens=6, min_new_tokens=6)
    assert r.quant == method and r.to_dict()["quant"] == method
    assert len(r.token_ids) == 6 and all(0 <= t < 32064 for t in r.token_ids)
    with Pipeline.load(tiny_bundle) as p:
        assert p.generate(image, "What is this?", budget=0.2, max_new_tokens=1).quant == "none"


def test_int8_prefill_logits_stay_close_to_float(int8_bundle, tiny_bundle):
    from runtime.decoder import Decoder
    from runtime.manifest import Manifest
    from runtime.session import OrtSession

    embeds = np.random.default_rng(3).standard_normal((40, 128)).astype(np.float32) * 0.05
    logits = []
    for bundle in (tiny_bundle, int8_bundle):
        m = Manifest.from_file(bundle)
        dec = Decoder(OrtSession.from_manifest(m, "decoder"), np.load(bundle / "embed_tokens.npy"), m.text)
        logits.append(dec.prefill(embeds)[0])
    a, b = logits
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.995


def test_quantized_bundle_on_old_onnxruntime_names_the_minimum(int4_bundle, monkeypatch):
    from runtime import Pipeline

    with pytest.raises(BundleError, match=r"needs onnxruntime >= 1\.22; this is onnxruntime 1\.21\.1"):
        check_onnxruntime("int8", "1.21.1")
    check_onnxruntime("int4", "1.17.0")
    check_onnxruntime("none", "1.0")
    with pytest.raises(BundleError, match=r">= 1\.23"):  # the opset's own minimum wins when larger
        check_onnxruntime("int4", "1.20.0", opset_min="1.23")
    assert version_tuple("1.22.0.dev20250101+cpu") == (1, 22, 0)
    monkeypatch.setattr(ort, "__version__", "1.16.3")
    with pytest.raises(BundleError, match=r"int4-quantized .* needs onnxruntime >= 1\.23; this is onnxruntime 1\.16\.3"):
        Pipeline.load(int4_bundle)


def test_unknown_quant_method_in_a_manifest_is_refused(int4_bundle, tmp_path):
    from runtime import Pipeline

    check_method("int4", 32)
    with pytest.raises(BundleError, match="knows none, int8, int4"):
        check_method("int3", 32)
    bad = tmp_path / "bad"
    shutil.copytree(int4_bundle, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["quant"]["method"] = "int3"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    (bad / ".verified.json").unlink(missing_ok=True)  # the stamp would refuse any edited manifest first
    with pytest.raises(BundleError, match="int3"):
        Pipeline.load(bad)


def test_bad_quant_value_is_one_line_listing_the_choices(capsys, tmp_path):
    from export.__main__ import main

    for bad in ("int3", "fp8", "INT4"):
        with pytest.raises(SystemExit) as e:
            main(["--model", "tiny", "--out", str(tmp_path / "x"), "--quant", bad])
        assert e.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]  # argparse: usage, then the one error line
        assert f"--quant: invalid choice: '{bad}'" in last
        assert all(choice in last for choice in ("none", "int8", "int4")), last
    assert main(["--model", "tiny", "--out", str(tmp_path / "x"), "--quant", "int4", "--block-size", "48"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "power of 2 >= 16" in err[0]
    assert not (tmp_path / "x").exists()
