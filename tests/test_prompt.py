"""runtime.prompt: the template with and without its image slot, chats in the model's own format, empty prompts.

Renderings are checked as exact strings for both registry templates (Vicuna, Mistral), in the form LLaVA's
conversation.py gives; token ids are checked against the tiny bundle's tokenizer.
"""

from __future__ import annotations

import pytest

from models.registry import MISTRAL_TEMPLATE, VICUNA_TEMPLATE
from runtime.errors import PromptError
from runtime.manifest import Manifest, PromptSpec
from runtime.prompt import Chat, ChatFormat, PromptEncoder, is_blank

PREAMBLE = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
TURNS = (("user", "Describe it."), ("assistant", "A cat."), ("user", "Its colour?"))


@pytest.fixture(scope="module")
def manifest(tiny_bundle) -> Manifest:
    return Manifest.from_file(tiny_bundle)


def encoder(manifest: Manifest, template: str) -> PromptEncoder:
    spec = PromptSpec(template=template, add_bos=True, image_placeholder="<image>")
    return PromptEncoder(manifest.path("tokenizer"), spec, manifest.tokens)


RENDERINGS = [
    (VICUNA_TEMPLATE, Chat((("user", "Q"),)), True, f"{PREAMBLE} USER: <image>\nQ ASSISTANT:"),
    (VICUNA_TEMPLATE, Chat((("user", "Q"),)), False, f"{PREAMBLE} USER: Q ASSISTANT:"),
    (VICUNA_TEMPLATE, Chat(TURNS), True,
     f"{PREAMBLE} USER: <image>\nDescribe it. ASSISTANT: A cat.</s>USER: Its colour? ASSISTANT:"),
    (VICUNA_TEMPLATE, Chat(TURNS, system="Be brief."), True,
     "Be brief. USER: <image>\nDescribe it. ASSISTANT: A cat.</s>USER: Its colour? ASSISTANT:"),
    (VICUNA_TEMPLATE, Chat(TURNS, system=""), False,
     "USER: Describe it. ASSISTANT: A cat.</s>USER: Its colour? ASSISTANT:"),
    (VICUNA_TEMPLATE, Chat(TURNS, image_turn=2), True,
     f"{PREAMBLE} USER: Describe it. ASSISTANT: A cat.</s>USER: <image>\nIts colour? ASSISTANT:"),
    (MISTRAL_TEMPLATE, Chat((("user", "Q"),)), True, "[INST] <image>\nQ [/INST]"),
    (MISTRAL_TEMPLATE, Chat((("user", "Q"),)), False, "[INST] Q [/INST]"),
    (MISTRAL_TEMPLATE, Chat(TURNS), True, "[INST] <image>\nDescribe it. [/INST] A cat. </s>[INST] Its colour? [/INST]"),
    (MISTRAL_TEMPLATE, Chat(TURNS, system="Be brief."), True,
     "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>\nDescribe it. [/INST] A cat. </s>[INST] Its colour? [/INST]"),
    (MISTRAL_TEMPLATE, Chat((("user", "Q"),), system="Be brief."), False,
     "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nQ [/INST]"),
]  # fmt: skip


@pytest.mark.parametrize(("template", "chat", "image", "want"), RENDERINGS)
def test_chats_render_in_the_models_own_format(template, chat, image, want):
    assert ChatFormat.from_template(template, "<image>").render(chat, image=image, eos="</s>") == want


@pytest.mark.parametrize("template", [VICUNA_TEMPLATE, MISTRAL_TEMPLATE], ids=["vicuna", "mistral"])
def test_one_turn_without_system_is_exactly_the_template(manifest, template):
    enc = encoder(manifest, template)
    assert enc.encode(Chat((("user", "What is it?"),))) == enc.encode("What is it?")
    assert enc.encode(Chat((("user", "What is it?"),)), image=False) == enc.encode("What is it?", image=False)
    text = template.replace("{prompt}", "What is it?")
    ids = enc.tokenizer.encode(text, add_special_tokens=False).ids
    slot = ids.index(manifest.tokens.image)
    assert enc.encode("What is it?") == ([manifest.tokens.bos, *ids[:slot]], ids[slot + 1 :])


@pytest.mark.parametrize("template", [VICUNA_TEMPLATE, MISTRAL_TEMPLATE], ids=["vicuna", "mistral"])
def test_text_only_leaves_out_the_image_slot_and_nothing_else(manifest, template):
    enc = encoder(manifest, template)
    ids, after = enc.encode("What is it?", image=False)
    assert after == [] and manifest.tokens.image not in ids
    text = template.replace("<image>\n", "").replace("{prompt}", "What is it?")
    assert ids == [manifest.tokens.bos, *enc.tokenizer.encode(text, add_special_tokens=False).ids]


def test_a_chat_ends_each_answer_with_one_eos(manifest):
    enc = encoder(manifest, MISTRAL_TEMPLATE)
    before, after = enc.encode(Chat(TURNS, system="Be brief."))
    assert (before + after).count(manifest.tokens.eos) == 1
    assert before[0] == manifest.tokens.bos and manifest.tokens.image not in before + after


BAD_CHATS = [
    (lambda: Chat(()), "at least one user turn"),
    (lambda: Chat((("assistant", "hi"), ("user", "q"))), "expected 'user'"),
    (lambda: Chat((("user", "q"), ("user", "q"))), "expected 'assistant'"),
    (lambda: Chat((("user", "q"), ("assistant", "a"))), "last chat turn"),
    (lambda: Chat((("user", "q"),), image_turn=1), "image_turn"),
    (lambda: Chat(TURNS, image_turn=1), "image_turn"),
    (lambda: Chat((("user", "q"),), system=5), "system"),
]


@pytest.mark.parametrize(("make", "match"), BAD_CHATS)
def test_malformed_chats_are_prompt_errors(make, match):
    with pytest.raises(PromptError, match=match):
        make()


@pytest.mark.parametrize(
    ("chat", "match"),
    [
        (Chat((("user", "Describe."), ("assistant", "Done</s>"), ("user", "More?"))), "end-of-sequence"),
        (Chat((("user", "Describe."), ("assistant", "see <image> <image>"), ("user", "More?"))), "<image>"),
        (Chat((("user", "Describe."), ("assistant", "ok"), ("user", "\u200b"))), "empty"),
        (Chat((("user", "q <image>"),), system="x <image>"), "<image>"),
    ],
)
def test_bad_chat_text_is_a_prompt_error(manifest, chat, match):
    with pytest.raises(PromptError, match=match):
        encoder(manifest, MISTRAL_TEMPLATE).encode(chat)


def test_an_earlier_turn_may_be_only_the_image(manifest):
    enc = encoder(manifest, MISTRAL_TEMPLATE)
    before, after = enc.encode(Chat((("user", ""), ("assistant", "A cat."), ("user", "Its colour?"))))
    assert before[-1] != manifest.tokens.image and after  # the slot sits in the first turn
    with pytest.raises(PromptError, match="empty"):  # without the image that turn asks nothing
        enc.encode(Chat((("user", ""), ("assistant", "A cat."), ("user", "Its colour?"))), image=False)


def test_a_template_of_another_shape_takes_one_turn_only(manifest):
    enc = encoder(manifest, "<image>\nQuestion: {prompt}\nAnswer:")
    assert enc.format.style == "single"
    assert enc.encode(Chat((("user", "q"),))) == enc.encode("q")
    with pytest.raises(PromptError, match="no multi-turn format"):
        enc.encode(Chat(TURNS))
    with pytest.raises(PromptError, match="no multi-turn format"):
        enc.encode(Chat((("user", "q"),), system="s"))


@pytest.mark.parametrize("text", ["", " \t\n", "\x00", "\u200b", "\ufeff\u200d\u2060", "\u2028\u3000", "\x00\x1f\x7f"])
def test_prompts_of_only_invisible_characters_are_empty(manifest, text):
    assert is_blank(text)
    with pytest.raises(PromptError, match="prompt is empty"):
        encoder(manifest, MISTRAL_TEMPLATE).encode(text)


@pytest.mark.parametrize("text", ["\u200bhi", "\x00?", "é", "\u0301"])
def test_a_visible_character_is_a_prompt(text):
    assert not is_blank(text)
