"""Prompt -> token ids around one image slot, and ids -> text, with the bundle's tokenizer.json and template."""

from __future__ import annotations

import os

from tokenizers import Tokenizer

from runtime.errors import BundleError, PromptError
from runtime.manifest import PromptSpec, TokenIds


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

    def encode(self, prompt: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the image slot. prompt: the user's text (no image placeholder)."""
        if not isinstance(prompt, str):
            raise PromptError(f"prompt must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise PromptError("prompt is empty; ask something about the image")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates (e.g. from a bad decode) cannot be tokenized
            raise PromptError(
                f"prompt holds a character that is not valid Unicode ({prompt[e.start]!r} at index {e.start}); "
                "decode the text with errors='replace' or remove it"
            ) from None
        if self.spec.image_placeholder in prompt:
            raise PromptError(
                f"prompt contains {self.spec.image_placeholder!r}; the image goes in by itself, remove it from the text"
            )
        text = self.spec.template.replace("{prompt}", prompt)
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        slots = [i for i, t in enumerate(ids) if t == self.tokens.image]
        if len(slots) != 1:
            raise PromptError(f"prompt produced {len(slots)} image slots, expected 1; remove special tokens from it")
        if self.spec.add_bos:
            ids = [self.tokens.bos, *ids]
            slots[0] += 1
        return ids[: slots[0]], ids[slots[0] + 1 :]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
