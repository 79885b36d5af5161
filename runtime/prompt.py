"""Prompt -> token ids around the image slots, and ids -> text, with the bundle's tokenizer.json and template.

    enc = PromptEncoder(manifest.path("tokenizer"), manifest.prompt, manifest.tokens)
    before, after = enc.encode("What is on the table?")              # the manifest's template, image slot between
    ids, _ = enc.encode("Hello", image=False)                         # the same template without the image slot
    a, b, c = enc.encode_slots("<image> <image> What changed?", 2)   # the text around 2 images' slots
    before, after = enc.encode(Chat((("user", "Describe it."), ("assistant", "A cat."), ("user", "Its colour?")),
                                    system="Answer briefly."))       # several turns in the model's own chat format

The chat format is read from the manifest's single-turn template (the registry's), in the form LLaVA's own
`conversation.py` renders it (the format the models were trained on):
- Vicuna (`... USER: <image>\n{prompt} ASSISTANT:`): `{system} USER: <image>\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT:`;
  the template's preamble is the default system text, a `system` replaces it.
- Mistral (`[INST] <image>\n{prompt} [/INST]`): `[INST] <<SYS>>\n{system}\n<</SYS>>\n\n<image>\nq1 [/INST] a1 </s>[INST] q2 [/INST]`
  (no system block without a system text).
A template of another shape supports one user turn without a system text; anything else is a PromptError.
One user turn without a system text is always exactly the template, so `encode(text)` == `encode(Chat(...one turn))`.

Several images (`encode_slots(prompt, n)`): a prompt without `<image>` markers gets the n images in the
template's image slot, in order (`<image>\n` n times, as chat templates put images first); a prompt with exactly
n markers has them replace the template's slot; any other count is a PromptError saying how many it found.
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass

from tokenizers import Tokenizer

from runtime.errors import BundleError, PromptError
from runtime.manifest import PromptSpec, TokenIds

ROLES = ("user", "assistant")
_INVISIBLE = ("Cc", "Cf", "Zs", "Zl", "Zp")  # control, format (zero-width, BOM, bidi marks), separators


def is_blank(text: str) -> bool:
    """True if `text` shows nothing: only whitespace, control and format characters ('\\x00', '\\u200b', ...)."""
    return all(ch.isspace() or unicodedata.category(ch) in _INVISIBLE for ch in text)


@dataclass(frozen=True)
class Chat:
    """A conversation: user/assistant turns (alternating, first and last from the user) and an optional system text.

    turns:      ((role, text), ...), role "user" or "assistant".
    system:     None = the template's own preamble (Vicuna) or none (Mistral); a string replaces it.
    image_turn: index in `turns` of the user turn the image belongs to (its slot goes before that turn's text);
                None = the first user turn. Ignored when the request has no image.
    """

    turns: tuple[tuple[str, str], ...]
    system: str | None = None
    image_turn: int | None = None

    def __post_init__(self) -> None:
        turns = self.turns
        if not isinstance(turns, tuple | list) or not turns:
            raise PromptError("a chat needs at least one user turn")
        checked = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, tuple | list) or len(turn) != 2:
                raise PromptError(f"chat turn {i} must be a (role, text) pair, got {type(turn).__name__}")
            role, text = turn
            want = ROLES[i % 2]
            if role != want:
                raise PromptError(
                    f"chat turn {i} is from {role!r}, expected {want!r}: turns alternate user/assistant, "
                    "starting and ending with the user"
                )
            checked.append((role, text))
        if checked[-1][0] != "user":
            raise PromptError("the last chat turn must be the user's (the model answers it)")
        object.__setattr__(self, "turns", tuple(checked))
        if self.system is not None and not isinstance(self.system, str):
            raise PromptError(f"system must be a string or None, got {type(self.system).__name__}")
        if self.image_turn is not None and (
            isinstance(self.image_turn, bool)
            or not isinstance(self.image_turn, int)
            or not 0 <= self.image_turn < len(checked)
            or checked[self.image_turn][0] != "user"
        ):
            raise PromptError(f"image_turn must be the index of a user turn, got {self.image_turn!r}")

    @property
    def chars(self) -> int:
        """Characters of text in the chat (for the early length check)."""
        return sum(len(t) for _, t in self.turns if isinstance(t, str)) + len(self.system or "")


@dataclass(frozen=True)
class ChatFormat:
    """The pieces of a single-turn template `{head}{image}{prompt}{close}`, and the chat style they imply."""

    style: str  # "vicuna", "mistral" or "single" (one user turn only)
    head: str  # text before the first user turn, with the turn's opening (Vicuna: preamble + "USER: ")
    opening: str  # how every later user turn opens ("USER: ", "[INST] ")
    image: str  # the image slot with its separator ("<image>\n")
    close: str  # after the user's text (" ASSISTANT:", " [/INST]")

    @classmethod
    def from_template(cls, template: str, placeholder: str) -> ChatFormat:
        before, _, close = template.partition("{prompt}")
        i = before.find(placeholder)
        head, image = before[:i], before[i:]
        if head.endswith("USER: ") and close.strip() == "ASSISTANT:":
            return cls("vicuna", head, "USER: ", image, close)
        if head.endswith("[INST] ") and close.strip() == "[/INST]" and not head[: -len("[INST] ")].strip():
            return cls("mistral", head, "[INST] ", image, close)
        return cls("single", head, "", image, close)

    def render(self, chat: Chat, *, image: bool | int, eos: str) -> str:
        """The chat as text, `image` image slots (True = 1) in chat.image_turn (or the first user turn)."""
        one_turn = len(chat.turns) == 1 and chat.system is None
        if self.style == "single" and not one_turn:
            raise PromptError(
                "this bundle's prompt template has no multi-turn format; send one user message without a system one"
            )
        image_turn = (0 if chat.image_turn is None else chat.image_turn) if image else None
        out = []
        for i, (role, text) in enumerate(chat.turns):
            if role == "assistant":
                out.append(f" {text}{eos}" if self.style == "vicuna" else f" {text} {eos}")
                continue
            body = (self.image * int(image) if i == image_turn else "") + text
            if i == 0:
                opening = self.head
                if chat.system is not None and self.style == "vicuna":
                    opening = (f"{chat.system} " if chat.system else "") + self.opening
                elif chat.system and self.style == "mistral":
                    opening = self.head + f"<<SYS>>\n{chat.system}\n<</SYS>>\n\n"
            else:
                opening = self.opening
            out.append(f"{opening}{body}{self.close}")
        return "".join(out)


class PromptEncoder:
    """Fills the manifest's template with the user prompt and tokenizes it (BOS as the manifest says)."""

    def __init__(self, tokenizer_path: str | os.PathLike, prompt: PromptSpec, tokens: TokenIds):
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as e:
            raise BundleError(f"{tokenizer_path} is not a tokenizers JSON file ({e}); re-export the bundle") from None
        self.spec = prompt
        self.tokens = tokens
        got = self.tokenizer.token_to_id(prompt.image_placeholder)
        if got != tokens.image:
            raise BundleError(
                f"tokenizer.json maps {prompt.image_placeholder!r} to {got}, the manifest says {tokens.image}; "
                "re-export the bundle"
            )
        self.format = ChatFormat.from_template(prompt.template, prompt.image_placeholder)
        self._eos_text = self.tokenizer.id_to_token(tokens.eos) or ""

    def encode(self, prompt: str | Chat, *, image: bool = True) -> tuple[list[int], list[int]]:
        """Token ids before and after the image slot; with `image=False`, (all the ids, []).

        prompt: the user's text (no marker, or one `<image>` marker where the image goes), or a Chat of several
        turns and/or a system text."""
        slots = self.encode_slots(prompt, int(bool(image)))
        return (slots[0], slots[1]) if image else (slots[0], [])

    def encode_slots(self, prompt: str | Chat, images: int) -> list[list[int]]:
        """`images` + 1 id lists: the ids before the first image's slot, between the slots, and after the last.

        Markers: none -> the images fill the template's image slot in order; exactly `images` `<image>` markers ->
        they replace it; any other count is a PromptError."""
        ph = self.spec.image_placeholder
        chat = prompt if isinstance(prompt, Chat) else None
        texts = [prompt] if chat is None else [t for _, t in chat.turns] + [chat.system or ""]
        markers = sum(t.count(ph) for t in texts if isinstance(t, str))
        if markers and markers != images:
            raise PromptError(
                f"the prompt holds {markers} {ph} marker{'s' * (markers != 1)} for {images} image"
                f"{'s' * (images != 1)}; put one {ph} where each image goes, or none to have the images first"
            )
        in_slot = 0 if markers else images  # images the template's own slot holds
        if chat is None:
            self._check_text(prompt, "prompt", image=images > 0)
            template = self.spec.template.replace(self.format.image, self.format.image * in_slot, 1)
            text = template.replace("{prompt}", prompt)
        else:
            last = len(chat.turns) - 1
            image_turn = (0 if chat.image_turn is None else chat.image_turn) if in_slot else None
            for i, (role, t) in enumerate(chat.turns):
                # an earlier user turn may be only the image; the last one must ask something
                self._check_text(t, f"chat turn {i} ({role})", image=images > 0, empty_ok=i == image_turn and i != last)
            if chat.system:
                self._check_text(chat.system, "system", image=images > 0, empty_ok=True)
            text = self.format.render(chat, image=in_slot, eos=self._eos_text)
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        slots = [i for i, t in enumerate(ids) if t == self.tokens.image]
        if len(slots) != images:
            raise PromptError(
                f"prompt produced {len(slots)} image slots, expected {images}; remove special tokens from it"
            )
        if chat is not None:
            replies = sum(role == "assistant" for role, _ in chat.turns)
            if sum(t == self.tokens.eos for t in ids) != replies:
                raise PromptError(
                    "the chat's text holds the end-of-sequence token or the tokenizer cannot spell it; remove "
                    f"{self._eos_text!r} from the messages"
                )
        if self.spec.add_bos:
            ids = [self.tokens.bos, *ids]
            slots = [s + 1 for s in slots]
        bounds = [-1, *slots, len(ids)]
        return [ids[a + 1 : b] for a, b in zip(bounds, bounds[1:])]

    def _check_text(self, text: str, what: str, *, image: bool, empty_ok: bool = False) -> None:
        if not isinstance(text, str):
            raise PromptError(f"{what} must be a string, got {type(text).__name__}")
        if not empty_ok and is_blank(text):
            hint = "ask something about the image" if image else "ask something"
            raise PromptError(f"{what} is empty (only blank or invisible characters); {hint}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates (e.g. from a bad decode) cannot be tokenized
            raise PromptError(
                f"{what} holds a character that is not valid Unicode ({text[e.start]!r} at index {e.start}); "
                "decode the text with errors='replace' or remove it"
            ) from None

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
