"""The offline stand-in tokenizer: Mistral-7B's sentencepiece model (from `mistral_common`) + `<image>`.

    from models.tokenizer import build_offline_tokenizer
    tok = build_offline_tokenizer()      # transformers LlamaTokenizer, <image> = 32000, BOS added

No hub access: the PyPI package `mistral-common` carries `data/tokenizer.model.v1`, the 32000-piece
sentencepiece model that llava-v1.6-mistral's tokenizer is built on. The pieces are read with the
`sentencepiece` library (no protobuf), and the fast tokenizer is built from vocab + merges, so the
saved `tokenizer.json` is what both transformers and the runtime's `tokenizers` load.

Tokenizing a templated prompt: encode the whole string with its single `<image>` in one call.
The Metaspace pre-tokenizer (prepend_scheme "first") puts a `▁` in front of the first piece of
every separate call, so encoding the text around `<image>` piecewise gives other ids.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

OFFLINE_SP_RELPATH = "data/tokenizer.model.v1"
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = 32000
BOS_ID, EOS_ID, UNK_ID = 1, 2, 0
_SPECIAL_PIECES = ("<unk>", "<s>", "</s>")


def offline_sp_model_path() -> Path:
    """Path of `mistral_common/data/tokenizer.model.v1`; raises FileNotFoundError saying what to install."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline tokenizer comes from the mistral-common package, which is not installed; "
            "run: pip install mistral-common (or make install)"
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / OFFLINE_SP_RELPATH
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"mistral-common is installed but has no {OFFLINE_SP_RELPATH}; "
        "reinstall a version that ships it: pip install 'mistral-common>=1.5'"
    )


@cache
def _vocab_and_merges(model_path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """BPE vocab (piece -> id) and merges of a sentencepiece BPE model, merges ordered by piece id."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_path)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    return vocab, _merges_by_rank(vocab)


def _merges_by_rank(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split (left, right) of a piece whose halves are both pieces, ordered by the merged piece's id.

    A sentencepiece BPE model ranks its pieces by score, which falls with the id, so a lower id
    is an earlier merge. Splits of one piece go shortest left half first (transformers' order).
    """
    skip = set(_SPECIAL_PIECES)
    merges: list[tuple[int, int, str, str]] = []
    for piece, pid in vocab.items():
        if piece in skip:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab and left not in skip and right not in skip:
                merges.append((pid, cut, left, right))
    merges.sort()
    return [(left, right) for _, _, left, right in merges]


def build_offline_tokenizer():
    """A transformers `LlamaTokenizer` over the offline Mistral pieces with `<image>` as id 32000.

    BOS (`<s>`, 1) is added by the post-processor, EOS is `</s>` (2), unk and pad are `<unk>` (0).
    """
    from transformers import LlamaTokenizer

    vocab, merges = _vocab_and_merges(str(offline_sp_model_path()))
    tok = LlamaTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        add_bos_token=True,
        add_eos_token=False,
        legacy=False,
        add_prefix_space=True,
    )
    tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tok.pad_token = "<unk>"
    got = {
        "<unk>": tok.convert_tokens_to_ids("<unk>"),
        "<s>": tok.bos_token_id,
        "</s>": tok.eos_token_id,
        IMAGE_TOKEN: tok.convert_tokens_to_ids(IMAGE_TOKEN),
    }
    want = {"<unk>": UNK_ID, "<s>": BOS_ID, "</s>": EOS_ID, IMAGE_TOKEN: IMAGE_TOKEN_ID}
    if got != want:
        raise RuntimeError(f"offline tokenizer has unexpected special ids {got}, expected {want}")
    return tok


__all__ = [
    "BOS_ID",
    "EOS_ID",
    "IMAGE_TOKEN",
    "IMAGE_TOKEN_ID",
    "UNK_ID",
    "build_offline_tokenizer",
    "offline_sp_model_path",
]
