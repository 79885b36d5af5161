"""runtime.generate: the one generate loop (prefill -> decode -> stop) on a scripted decoder, no graphs needed."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import PipelineClosedError
from runtime.generate import Generation, pick_token, stream_text
from runtime.options import SamplingConfig

V, EOS = 8, 2


class ScriptedDecoder:
    """Logits whose argmax is script[i] at call i (prefill is call 0); records what the loop asked."""

    def __init__(self, script):
        self.script = list(script)
        self.calls: list[tuple] = []

    def _logits(self) -> np.ndarray:
        i = len(self.calls) - 1
        out = np.zeros(V, np.float32)
        out[self.script[min(i, len(self.script) - 1)]] = 5.0
        out[(self.script[min(i, len(self.script) - 1)] + 1) % V] = 4.0  # the runner-up when the top is masked
        return out

    def prefill(self, embeds, max_new_tokens):
        self.calls.append(("prefill", embeds.shape[0], max_new_tokens))
        return self._logits(), "cache"

    def step(self, token, position, cache):
        self.calls.append(("step", token, position))
        return self._logits(), cache


def run(script, **sampling):
    dec = ScriptedDecoder(script)
    gen = Generation(dec, np.zeros((5, 4), np.float32), SamplingConfig(**sampling), eos=EOS)
    return list(gen), gen, dec


def test_eos_stops_the_loop_and_is_kept_in_the_ids():
    ids, gen, dec = run([4, 5, EOS, 6], max_new_tokens=10)
    assert ids == gen.ids == [4, 5, EOS]
    assert dec.calls == [("prefill", 5, 10), ("step", 4, 5), ("step", 5, 6)]  # positions follow the prompt
    assert gen.prefill_logits.argmax() == 4 and gen.prefill_s >= 0 and gen.decode_s >= 0


def test_max_new_tokens_stops_without_a_step_for_the_last_token():
    ids, _, dec = run([4, 5, 6, 7], max_new_tokens=3)
    assert ids == [4, 5, 6] and [c[0] for c in dec.calls] == ["prefill", "step", "step"]


@pytest.mark.parametrize("min_new", [1, 3, 6])
def test_eos_cannot_be_picked_before_min_new_tokens(min_new):
    ids, _, _ = run([EOS] * 10, max_new_tokens=6, min_new_tokens=min_new)
    assert ids[:min_new] == [EOS + 1] * min_new  # the runner-up while EOS is masked
    assert len(ids) == min_new + (min_new < 6) and (min_new == 6 or ids[-1] == EOS)


def test_min_new_tokens_also_holds_when_sampling():
    ids, _, _ = run([EOS] * 10, max_new_tokens=5, min_new_tokens=5, temperature=1.0, seed=3)
    assert len(ids) == 5 and EOS not in ids


def test_cancelled_stops_between_decoder_steps():
    dec = ScriptedDecoder([4] * 100)
    asked = []

    def cancelled():
        asked.append(1)
        return len(dec.calls) >= 3

    gen = Generation(dec, np.zeros((2, 4), np.float32), SamplingConfig(max_new_tokens=100), eos=EOS,
                     cancelled=cancelled, cancel_error=lambda: PipelineClosedError("closed"))  # fmt: skip
    with pytest.raises(PipelineClosedError):
        list(gen)
    assert len(dec.calls) == 3 and len(gen.ids) <= 3


def test_stream_text_yields_whole_characters_and_returns_the_text():
    table = {3: "a", 4: "\xe2", 5: "\x82\xac", 6: "b"}  # 4 + 5 spell the euro sign in UTF-8 bytes

    def decode(ids):
        return b"".join(table[i].encode("latin-1") for i in ids).decode("utf-8", errors="replace")

    stream = stream_text([3, 4, 5, 6, EOS], decode, EOS)
    pieces = []
    try:
        while True:
            pieces.append(next(stream))
    except StopIteration as stop:
        text = stop.value
    assert pieces == ["a", "€", "b"] and text == "a€b"


def test_greedy_takes_the_first_index_on_ties():
    assert pick_token(np.array([1.0, 3.0, 3.0], np.float32), SamplingConfig(), np.random.default_rng(0)) == 1
