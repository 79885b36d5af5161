"""serving.protocol without a server: request rows become generate() calls, outcomes become tensors, and every
malformed request (no prompt, an empty image, options nested absurdly deep or holding integers of thousands of
digits) becomes the typed one-line error the local Pipeline raises, never an untyped exception."""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType

import numpy as np
import pytest

from runtime import errors as runtime_errors
from runtime.errors import BudgetError, GenerationError, HiredError, ImageError, PromptError, RemoteError
from runtime.options import RequestOptions
from runtime.pipeline import GenerationResult
from serving.protocol import (
    INPUTS,
    MAX_OPTION_DEPTH,
    MAX_OPTIONS_BYTES,
    OUTPUTS,
    WIRE_OPTIONS,
    answer_requests,
    encode_options,
    encode_outcomes,
    format_error,
    parse_error,
    parse_options,
    parse_row,
)
from serving.remote import result_from_dict
from tests.serving_helpers import picture

PROMPT = "What is in this picture?"


def _request(**tensors) -> dict[str, np.ndarray]:
    data = {"prompt": np.array([[PROMPT.encode()]], dtype=object), "image": picture(4, 5)[None]}
    data.update(tensors)
    return {k: v for k, v in data.items() if v is not None}


def _options(text: bytes | str) -> np.ndarray:
    return np.array([[text.encode() if isinstance(text, str) else text]], dtype=object)


def _nested(depth: int, inner: str = "0.5", opener: str = "[") -> str:
    closer = {"[": "]", '{"k": ': "}"}[opener]
    return opener * depth + inner + closer * depth


# ---- errors cross the wire ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [getattr(runtime_errors, n) for n in runtime_errors.__all__])
def test_typed_errors_cross_the_wire_with_class_and_message(cls):
    sent = cls("image is 0x5 pixels (width x height); pass an image with both sides >= 1 pixel")
    got = parse_error(format_error(sent))
    assert type(got) is cls
    assert str(got) == str(sent)


def test_unexpected_server_exceptions_become_remote_errors():
    text = format_error(KeyError("boom"))
    assert text.startswith("RemoteError: the server failed on this request (KeyError: 'boom')")
    assert isinstance(parse_error(text), RemoteError)
    assert isinstance(parse_error("NotAnError: x"), RemoteError)
    assert "NotAnError: x" in str(parse_error("NotAnError: x"))
    assert "\n" not in format_error(ValueError("first line\nsecond line\nthird"))


def test_a_typed_error_subclass_travels_as_its_runtime_base_class():
    class CropError(ImageError):  # defined outside runtime.errors: the client knows ImageError
        pass

    got = parse_error(format_error(CropError("the crop is empty; pick a larger box")))
    assert type(got) is ImageError and str(got) == "the crop is empty; pick a larger box"


# ---- request rows -> generate() arguments -----------------------------------------------------------------------
def test_wire_options_are_the_request_options_but_color():
    assert WIRE_OPTIONS == tuple(n for n in RequestOptions.names() if n != "color")
    plain = {s.name: s.dtype for s in INPUTS}
    assert set(WIRE_OPTIONS) <= set(plain)  # every option may also come as its own tensor
    assert {n: plain[n] for n in ("budget", "alpha", "distribution", "newlines", "max_new_tokens", "min_new_tokens",
                                  "temperature", "top_p", "seed")} == {
        "budget": "FP64", "alpha": "FP64", "distribution": "BYTES", "newlines": "BYTES", "max_new_tokens": "INT32",
        "min_new_tokens": "INT32", "temperature": "FP64", "top_p": "FP64", "seed": "INT64",
    }  # fmt: skip


def test_plain_tensors_and_json_options_become_generate_keywords():
    data = _request(
        options=np.array(
            [[encode_options({"budget": 0.1 + 0.2, "seed": np.int64(7), "distribution": None})]], object
        ),
        alpha=np.array([[0.25]]),
        max_new_tokens=np.array([[5]], dtype=np.int32),
        newlines=np.array([[b"rows"]], dtype=object),
    )
    call = parse_row(data, 0)
    assert call.prompt == PROMPT and call.image.shape == (4, 5, 3)
    assert call.options == {
        "budget": 0.1 + 0.2, "seed": 7, "distribution": None, "alpha": 0.25, "max_new_tokens": 5, "newlines": "rows"
    }  # fmt: skip
    assert type(call.options["max_new_tokens"]) is int and type(call.options["alpha"]) is float


@pytest.mark.parametrize(
    ("tensors", "error", "message"),
    [
        ({"image": None}, ImageError, "has no image"),
        ({"image_bytes": np.array([[b"\x89PNG"]], dtype=object)}, ImageError, "both image and image_bytes"),
        ({"prompt": np.array([[b"\xff\xfe"]], dtype=object)}, PromptError, "not valid UTF-8"),
        ({"options": np.array([[b"{budget: 1}"]], dtype=object)}, GenerationError, "not valid JSON"),
        ({"options": np.array([[b"[0.2]"]], dtype=object)}, GenerationError, "must be a JSON object"),
        ({"options": np.array([[b'{"rate": 0.2}']], dtype=object)}, GenerationError, "unknown option"),
        (
            {"options": np.array([[b'{"budget": 0.2}']], dtype=object), "budget": np.array([[0.3]])},
            GenerationError,
            "both as a tensor and in options",
        ),
        ({"prompt": None}, PromptError, "the request has no prompt"),
        ({"prompt": np.zeros((1, 0), dtype=object)}, PromptError, "holds 0 elements"),
        ({"image": None, "image_bytes": np.zeros((1, 0), dtype=object)}, ImageError, "holds 0 elements"),
        ({"options": _options('{"color": "bgr"}')}, GenerationError, "color is not a wire option"),
        ({"options": _options(b"\xc3\x28")}, GenerationError, "not valid UTF-8"),
        ({"top_p": np.zeros((1, 0))}, GenerationError, "top_p holds 0 values"),
    ],
)
def test_malformed_requests_raise_typed_errors(tensors, error, message):
    with pytest.raises(error, match=message):
        parse_row(_request(**tensors), 0)


def test_a_request_without_prompt_answers_every_row_with_a_prompt_error():
    def generate(image, prompt, **options):
        raise AssertionError("a row without prompt must not reach generate")

    (out,) = answer_requests(generate, [{"image": np.zeros((3, 6, 2, 3), np.uint8)}])
    errors = [e.decode() for e in out["error"][:, 0]]
    assert errors == ["PromptError: the request has no prompt; send prompt (BYTES [1, 1], UTF-8 text)"] * 3


@pytest.mark.parametrize("shape", [(1, 0, 9, 3), (1, 11, 0, 3), (2, 0, 0, 3)])
def test_empty_images_get_the_pipelines_image_error(pipe, shape):
    data = {
        "image": np.zeros(shape, np.uint8),
        "prompt": np.array([[PROMPT.encode()]] * shape[0], dtype=object),
    }
    (out,) = answer_requests(pipe.generate, [data])
    with pytest.raises(ImageError) as local:
        pipe.generate(np.zeros(shape[1:], np.uint8), PROMPT)
    for row in range(shape[0]):
        served = parse_error(out["error"][row, 0].decode())
        assert type(served) is ImageError and str(served) == str(local.value)


# ---- options nested absurdly deep, integers of thousands of digits ----------------------------------------------
def _served_error(pipe, options_json: str | bytes) -> HiredError:
    (out,) = answer_requests(pipe.generate, [_request(options=_options(options_json))])
    text = out["error"][0, 0].decode()
    assert text and "\n" not in text
    return parse_error(text)


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        ("top_p", _nested(MAX_OPTION_DEPTH + 1), GenerationError),
        ("budget", _nested(20_000), BudgetError),
        ("newlines", _nested(5_000, '"rows"'), BudgetError),
        ("max_new_tokens", _nested(700, "3", opener='{"k": '), GenerationError),
        ("seed", _nested(200_000, "[]"), GenerationError),
    ],
)
def test_options_nested_absurdly_deep_get_the_options_own_error(pipe, key, value, error):
    served = _served_error(pipe, f'{{"{key}": {value}}}')
    assert type(served) is error
    assert str(served).startswith(f"{key} must be")


def test_options_nested_within_the_limit_get_exactly_the_local_error(pipe):
    value = json.loads(_nested(MAX_OPTION_DEPTH - 1))
    served = _served_error(pipe, json.dumps({"temperature": value}))
    with pytest.raises(GenerationError) as local:
        pipe.generate(picture(4, 5), PROMPT, temperature=value)
    assert type(served) is GenerationError and str(served) == str(local.value)


def test_a_document_nested_absurdly_deep_is_a_generation_error(pipe):
    for text in ("[" * 30_000 + "]" * 30_000, "{" + '"a": {' * 9_000 + "}" * 9_001):
        served = _served_error(pipe, text)
        assert type(served) is GenerationError, text[:20]


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"seed": 3 * 10**4700}, GenerationError),  # past Python's 4,300-digit str <-> int limit
        ({"max_new_tokens": 10**6001 + 7}, GenerationError),
        ({"min_new_tokens": 2 * 10**4400}, GenerationError),
        ({"alpha": -(10**5200)}, BudgetError),
        ({"budget": 10**4350}, BudgetError),
        ({"temperature": 9 * 10**4999}, GenerationError),
        ({"top_p": 10**80}, GenerationError),
    ],
)
def test_huge_integers_get_exactly_the_local_error(pipe, options, error):
    served = _served_error(pipe, encode_options(options))
    with pytest.raises(HiredError) as local:
        pipe.generate(picture(4, 5), PROMPT, **options)
    assert type(local.value) is error
    assert type(served) is error and str(served) == str(local.value)


def test_integers_of_any_length_travel_exactly():
    for n in (10**4299, -(10**4301) + 3, 7**9000, 0, -1):
        assert parse_options(encode_options({"seed": n})) == {"seed": n}


def test_an_options_object_over_the_size_limit_is_refused():
    text = encode_options({"distribution": "x" * MAX_OPTIONS_BYTES})
    with pytest.raises(GenerationError, match=f"over the {MAX_OPTIONS_BYTES}-byte limit"):
        parse_options(text)


# ---- outcomes -> output tensors ---------------------------------------------------------------------------------
def _result(ids: tuple[int, ...]) -> GenerationResult:
    return GenerationResult(
        text="a cat",
        token_ids=ids,
        visual_tokens=MappingProxyType({"before": 1560, "kept": 345, "per_image": (172, 87, 86)}),
        budget=MappingProxyType(
            {"rate": 0.2, "alpha": 0.5, "total": 345, "distribution": "spatial", "newlines": "none"}
        ),
        timings_ms=MappingProxyType({"total": 1.5}),
        provider="CPUExecutionProvider",
    )


def test_result_json_rebuilds_an_equal_generation_result():
    r = _result((5, 6, 2))
    out = encode_outcomes([r])
    assert result_from_dict(json.loads(out["result_json"][0, 0])) == r
    other = dataclasses.replace(r, selector="uniform", quant="int4")  # fields with defaults travel too
    assert result_from_dict(json.loads(encode_outcomes([other])["result_json"][0, 0])) == other


def test_rows_of_one_request_pad_token_ids_and_keep_errors_per_row():
    out = encode_outcomes(
        [_result((5, 6, 2)), BudgetError("budget must be in (0, 1], got 2.0"), _result((9,))]
    )
    assert out["token_ids"].tolist() == [[5, 6, 2], [-1, -1, -1], [9, -1, -1]]
    assert out["error"][:, 0].tolist() == [b"", b"BudgetError: budget must be in (0, 1], got 2.0", b""]
    assert out["visual_tokens_kept"][:, 0].tolist() == [345, 0, 345]
    assert out["text"][:, 0].tolist() == [b"a cat", b"", b"a cat"]
    assert {k for k in out} == {s.name for s in OUTPUTS}


def test_answer_requests_runs_every_row_on_its_own_and_keeps_order():
    seen = []

    def generate(image, prompt, **options):
        seen.append(prompt)
        if prompt == "bad":
            raise PromptError("prompt is empty; ask something about the image")
        return _result((len(prompt),))

    req_a = _request(
        prompt=np.array([[b"ab"], [b"bad"]], dtype=object), image=np.zeros((2, 3, 3, 3), np.uint8)
    )
    req_b = _request(prompt=np.array([[b"abcd"]], dtype=object))
    with ThreadPoolExecutor(4) as ex:
        out_a, out_b = answer_requests(generate, [req_a, req_b], ex)
    assert sorted(seen) == ["ab", "abcd", "bad"]
    assert out_a["token_ids"].tolist() == [[2], [-1]]
    assert out_a["error"][1, 0].startswith(b"PromptError: prompt is empty")
    assert out_b["token_ids"].tolist() == [[4]]


def test_inputs_declare_one_required_prompt_and_optional_rest():
    assert [s.name for s in INPUTS if not s.optional] == ["prompt"]
    assert {s.name: s.dtype for s in INPUTS}["budget"] == "FP64"  # 0.3 must arrive as 0.3
