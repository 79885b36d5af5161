"""selector, budget="auto" and target_ttft_ms travel every surface: the wire protocol (options JSON and plain
tensors, Triton's input spec) and the OpenAI `hired` object, with the local Pipeline's checks and messages."""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtime.errors import BudgetError
from serving.openai.schema import HIRED_KEYS, APIError, options_of, parse_request
from serving.protocol import INPUTS, WIRE_OPTIONS, encode_options, parse_row
from tests.serving_helpers import picture


def _row(**tensors):
    data = {"prompt": np.array([[b"What?"]], dtype=object), "image": picture(4, 5)[None], **tensors}
    return parse_row(data, 0)


def test_selector_and_target_are_wire_options_with_their_tensors():
    plain = {s.name: s.dtype for s in INPUTS}
    assert {"selector", "target_ttft_ms"} <= set(WIRE_OPTIONS)
    assert plain["selector"] == "BYTES" and plain["target_ttft_ms"] == "FP64"


def test_options_json_carries_selector_and_auto_budget():
    options = {"selector": "visionzip", "budget": "auto", "target_ttft_ms": 300.0}
    call = _row(options=np.array([[encode_options(options)]], dtype=object))
    assert call.options == options


def test_plain_tensors_carry_selector_and_target():
    call = _row(selector=np.array([[b"random"]], dtype=object), seed=np.array([[4]], dtype=np.int64),
                options=np.array([[b'{"budget": "auto"}']], dtype=object), target_ttft_ms=np.array([[250.0]]))  # fmt: skip
    assert call.options == {"budget": "auto", "selector": "random", "seed": 4, "target_ttft_ms": 250.0}


@pytest.mark.parametrize(
    "options, message",
    [
        ({"selector": "best"}, "selector must be one of hired, cls, uniform, random, visionzip; got 'best'"),
        ({"budget": "auto"}, "budget='auto' needs target_ttft_ms"),
    ],
)
def test_bad_selector_or_auto_is_the_local_budget_error_on_the_wire(options, message):
    with pytest.raises(BudgetError, match=message):
        _row(options=np.array([[encode_options(options)]], dtype=object))


def _chat(hired: dict) -> bytes:
    return json.dumps({"model": "hired", "messages": [{"role": "user", "content": "Hi?"}], "hired": hired}).encode()


def test_openai_hired_object_takes_selector_and_auto_budget():
    assert {"selector", "target_ttft_ms"} <= set(HIRED_KEYS)
    options = options_of(parse_request(_chat({"selector": "cls", "budget": "auto", "target_ttft_ms": 300})))
    assert (options.selector, options.budget, options.target_ttft_ms) == ("cls", "auto", 300.0)


@pytest.mark.parametrize(
    "hired, param",
    [({"selector": "best"}, "hired.selector"), ({"budget": "auto", "target_ttft_ms": -1}, "hired.target_ttft_ms")],
)
def test_openai_bad_selector_or_target_is_a_400_naming_the_key(hired, param):
    with pytest.raises(APIError) as e:
        options_of(parse_request(_chat(hired)))
    assert (e.value.status, e.value.param) == (400, param)
