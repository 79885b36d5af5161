"""Load-time cross-checks of a bundle's loaded parts against the manifest's numbers (and so against each other).

    check_loaded(manifest, embed_tokens=arr, image_newline=arr, tokenizer=tok)   # raises BundleError or returns

`Manifest.from_file` checks each number's range and the numbers against each other; `OrtSession._check_graph`
checks each graph's inputs and outputs (names, element types, fixed sizes) against them. This module checks
the rest once it is loaded: the embedding table and the image newline (shape and a float dtype the decoder
can take) and the tokenizer (no token id past the embedding table). A bundle whose parts disagree but whose
hashes were updated to match is refused here, at load, naming the two things that disagree.
"""

from __future__ import annotations

import numpy as np

from runtime.errors import BundleError
from runtime.manifest import Manifest

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
_FIX = "re-export the bundle"


def check_array(manifest: Manifest, name: str, arr: np.ndarray, shape: tuple[int, ...], meaning: str) -> None:
    """`arr` (logical file `name`) is a float32/float16 array of `shape`, which `meaning` says the manifest implies."""
    fname = manifest.files.get(name, name)
    if not isinstance(arr, np.ndarray) or arr.dtype not in FLOAT_DTYPES:
        got = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
        raise BundleError(
            f"{fname} holds {got} values; the decoder takes float32 or float16 embeddings; {_FIX}"
        )
    if arr.shape != shape:
        raise BundleError(f"{fname} has shape {arr.shape}, but the manifest's {meaning} make it {shape}; {_FIX}")


def check_tokenizer(manifest: Manifest, tokenizer) -> None:
    """No id the tokenizer can produce lies past the embedding table (text.vocab_size rows)."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    top = max(vocab.values(), default=-1)
    if top >= manifest.text.vocab_size:
        piece = next(p for p, i in vocab.items() if i == top)
        raise BundleError(
            f"{manifest.files.get('tokenizer', 'tokenizer.json')} has token id {top} ({piece[:40]!r}), but the "
            f"manifest's text.vocab_size (the embedding table's rows) is {manifest.text.vocab_size}; {_FIX}"
        )


def check_loaded(manifest: Manifest, *, embed_tokens: np.ndarray, image_newline: np.ndarray, tokenizer) -> None:
    """The embedding table, the image newline and the tokenizer against the manifest's numbers."""
    t = manifest.text
    check_array(
        manifest, "embed_tokens", embed_tokens, (t.vocab_size, t.hidden_size), "text.vocab_size and text.hidden_size"
    )
    check_array(manifest, "image_newline", image_newline, (t.hidden_size,), "text.hidden_size")
    check_tokenizer(manifest, tokenizer)
