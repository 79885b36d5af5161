"""Checks of a manifest's raw JSON and values: a parser that refuses absurd nesting and integers, the typed
conversion of each section into its dataclass, file-name rules, and the range and cross checks of every number.

Used by runtime.manifest (the Manifest dataclasses and their loading); every failure is a one-line BundleError
naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import types
import typing
from typing import Any

from hired.config import DISTRIBUTIONS, NEWLINE_MODES
from runtime.errors import BundleError

REBUILD_HINT = "re-run `make export MODEL=<name>` (or `python -m export`) to rebuild the bundle"
MODEL_DTYPES = ("fp32", "fp16")  # manifest.model.dtype: the float dtype of the graphs' weights
RESAMPLES = (
    "nearest",
    "bilinear",
    "bicubic",
    "lanczos",
    "box",
    "hamming",
)  # runtime.preprocess.RESAMPLE's keys
# Logical graph inputs/outputs the runtime feeds or reads; a bundle may list more (e.g. a decoder's cache lengths).
REQUIRED_IO = {
    "vision": (("pixel_values",), ("features", "early_scores", "late_scores")),
    "projector": (("features",), ("projected",)),
    "decoder": (("inputs_embeds", "past_key", "past_value"), ("logits",)),
}
MAX_MANIFEST_BYTES = 1 << 20  # a real manifest is a few KiB
MAX_DEPTH = 32  # a real manifest nests 4 levels
MAX_INT_DIGITS = 40  # longer integers are refused before Python converts them (its limit is 4300 digits)
MAX_NAME_BYTES = 255  # one path component (NAME_MAX on Linux, macOS and Windows)
MAX_PATH_BYTES = 4096  # a whole relative file name (PATH_MAX on Linux)
# Ranges of the manifest's numbers: generous for any real model, tight enough that no absurd value gets through.
MAX_LAYERS = 1 << 12
MAX_HEADS = 1 << 12
MAX_WIDTH = 1 << 20  # hidden sizes, head dims
MAX_VOCAB = 1 << 24
MAX_POSITIONS = 1 << 30
MAX_PIXELS_SIDE = 1 << 16  # crop/image/pinpoint sides
MAX_CROPS_PER_SIDE = 64  # a grid pinpoint may hold at most 64 x 64 crops


class HugeInt:
    """An integer literal too long to be any manifest number; kept as its digit count so the key can be named."""

    __slots__ = ("digits",)

    def __init__(self, digits: int):
        self.digits = digits


def _parse_int(text: str) -> int | HugeInt:
    return HugeInt(len(text.lstrip("-"))) if len(text) > MAX_INT_DIGITS else int(text)


_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{},]')


def parse_json(text: str) -> Any:
    """json.loads, refusing nesting deeper than MAX_DEPTH (naming where) before the parser recurses into it."""
    stack: list[list] = []  # [kind, key or index, expecting a key]
    for tok in _TOKENS.finditer(text):
        t = tok.group()
        if t in "{[":
            if len(stack) >= MAX_DEPTH:
                raise BundleError(
                    f"manifest.json nests more than {MAX_DEPTH} levels deep at {_json_path(stack)}; "
                    f"a manifest nests a few levels; {REBUILD_HINT}"
                )
            stack.append(["obj", None, True] if t == "{" else ["arr", 0, False])
        elif t in "}]":
            if stack:
                stack.pop()
        elif t == ",":
            if stack and stack[-1][0] == "arr":
                stack[-1][1] += 1
            elif stack:
                stack[-1][2] = True
        elif stack and stack[-1][0] == "obj" and stack[-1][2]:
            try:
                stack[-1][1] = json.loads(t)
            except ValueError:
                stack[-1][1] = t
            stack[-1][2] = False
    return json.loads(text, parse_int=_parse_int)


def _json_path(stack: list[list]) -> str:
    parts = []
    for kind, key, _ in stack:
        if kind == "arr":
            parts.append(f"[{key}]")
        elif key is not None:
            parts.append(f".{key}" if parts else str(key))
    path = "".join(parts[:6]) + ("…" if len(parts) > 6 else "")
    return path or "(top level)"


def check_depth(data: Any) -> None:
    """from_dict's own depth check (a dict built in Python never went through parse_json)."""
    todo = [(data, 0, "(top level)")]
    while todo:
        value, depth, where = todo.pop()
        if depth > MAX_DEPTH:
            raise BundleError(
                f"manifest.json nests more than {MAX_DEPTH} levels deep at {where}; {REBUILD_HINT}"
            )
        if isinstance(value, dict):
            todo.extend((v, depth + 1, f"{where}.{k}" if depth else str(k)) for k, v in value.items())
        elif isinstance(value, list | tuple):
            todo.extend((v, depth + 1, f"{where}[{i}]") for i, v in enumerate(value))
        elif isinstance(value, HugeInt):
            raise BundleError(f"manifest {where} is an integer of {value.digits} digits; {REBUILD_HINT}")


def show(value: Any) -> str:
    """repr for messages, short for absurd integers (repr of a 5,000-digit int raises) and long strings."""
    if isinstance(value, HugeInt):
        return f"an integer of {value.digits} digits"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def check_file_name(name: str, rel: str) -> None:
    """A bundle file name the file system can hold: not empty, no NUL or control characters, not too long."""
    where = f"manifest files.{name}"
    if not rel or rel.strip() != rel:
        raise BundleError(f"{where} = {show(rel)} is not a file name; {REBUILD_HINT}")
    if any(ord(c) < 32 or ord(c) == 127 for c in rel):
        raise BundleError(
            f"{where} = {show(rel)} holds a control character (NUL?); no bundle file has one; {REBUILD_HINT}"
        )
    try:
        raw = os.fsencode(rel)
    except (UnicodeError, ValueError):
        raise BundleError(f"{where} = {show(rel)} cannot be encoded as a file name; {REBUILD_HINT}") from None
    longest = max((len(part) for part in re.split(rb"[/\\]", raw)), default=0)
    if longest > MAX_NAME_BYTES or len(raw) > MAX_PATH_BYTES:
        raise BundleError(
            f"{where} is {len(raw)} bytes with a {longest}-byte name: longer than a file system allows "
            f"({os.strerror(errno.ENAMETOOLONG)}: at most {MAX_NAME_BYTES} bytes a name); {REBUILD_HINT}"
        )


# ---- a small typed builder: JSON -> frozen dataclasses, refusing unknown/missing keys and wrong types ----
def build(cls, data: Any, where: str, skip: tuple[str, ...] = ()):
    label = where or "(top level)"
    if not isinstance(data, dict):
        raise BundleError(f"manifest {label} must be an object, got {type(data).__name__}; {REBUILD_HINT}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise BundleError(f"manifest {label} has unknown key(s) {', '.join(unknown)}; {REBUILD_HINT}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                continue
            raise BundleError(f"manifest {label} is missing key {name!r}; {REBUILD_HINT}")
        kwargs[name] = _convert(hints[name], data[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _convert(tp, value: Any, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            if a is type(None) and value is None:
                return None
        return _convert(next(a for a in args if a is not type(None)), value, where)
    if tp is Any:
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise BundleError(
                f"manifest {where} must be an object, got {type(value).__name__}; {REBUILD_HINT}"
            )
        kt, vt = args
        return {_convert(kt, k, where): _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise BundleError(f"manifest {where} must be a list, got {type(value).__name__}; {REBUILD_HINT}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise BundleError(
                f"manifest {where} must have {len(args)} entries, got {len(value)}; {REBUILD_HINT}"
            )
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if isinstance(value, HugeInt):
        raise BundleError(
            f"manifest {where} is an integer of {value.digits} digits, far outside any range; {REBUILD_HINT}"
        )
    if tp is bool:
        if not isinstance(value, bool):
            raise BundleError(f"manifest {where} must be true/false, got {show(value)}; {REBUILD_HINT}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BundleError(f"manifest {where} must be an integer, got {show(value)}; {REBUILD_HINT}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BundleError(f"manifest {where} must be a number, got {show(value)}; {REBUILD_HINT}")
        try:
            return float(value)
        except OverflowError:
            raise BundleError(
                f"manifest {where} = {show(value)} is too large for a number; {REBUILD_HINT}"
            ) from None
    if tp is str:
        if not isinstance(value, str):
            raise BundleError(f"manifest {where} must be a string, got {show(value)}; {REBUILD_HINT}")
        return value
    raise TypeError(f"manifest field {where} has unsupported type {tp}")


# ---- the numbers: each in its range, and consistent with each other --------------------------------------------
def _int_in(where: str, value: int, lo: int, hi: int, what: str = "") -> None:
    if not lo <= value <= hi:
        raise BundleError(f"manifest {where} = {show(value)} is outside [{lo}, {hi}]{what}; {REBUILD_HINT}")


def _real_in(where: str, value: float, lo: float, hi: float, *, open_lo: bool = False) -> None:
    ok = math.isfinite(value) and (lo < value if open_lo else lo <= value) and value <= hi
    if not ok:
        bounds = f"({lo}, {hi}]" if open_lo else f"[{lo}, {hi}]"
        raise BundleError(
            f"manifest {where} = {show(value)} is not a finite number in {bounds}; {REBUILD_HINT}"
        )


def _one_of(where: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise BundleError(
            f"manifest {where} = {show(value)} is not one of {', '.join(choices)}; {REBUILD_HINT}"
        )


def check_values(m: Any) -> None:
    """Every number of the Manifest `m` in its range and every choice known; numbers that must agree do."""
    _one_of("model.dtype", m.model.dtype, MODEL_DTYPES)

    # files and hashes
    for name, rel in m.files.items():
        check_file_name(name, rel)
    for name, digest in m.sha256.items():
        if name not in m.files:
            raise BundleError(f"manifest sha256.{name} has no entry in files; {REBUILD_HINT}")
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise BundleError(
                f"manifest sha256.{name} = {show(digest)} is not a sha256 hex digest; {REBUILD_HINT}"
            )

    # image processor
    ip, v = m.image_processor, m.vision
    _int_in("image_processor.crop_size", ip.crop_size, 1, MAX_PIXELS_SIDE)
    _int_in("image_processor.shortest_edge", ip.shortest_edge, 1, MAX_PIXELS_SIDE)
    for i, pin in enumerate(ip.grid_pinpoints):
        for side in pin:
            _int_in(
                f"image_processor.grid_pinpoints[{i}]", side, ip.crop_size, MAX_CROPS_PER_SIDE * ip.crop_size
            )
            if side % ip.crop_size:
                raise BundleError(
                    f"manifest image_processor.grid_pinpoints[{i}] = {list(pin)} does not tile into whole crops of "
                    f"image_processor.crop_size {ip.crop_size}; {REBUILD_HINT}"
                )
    for i, mean in enumerate(ip.image_mean):
        _real_in(f"image_processor.image_mean[{i}]", mean, 0.0, 255.0)
    for i, std in enumerate(ip.image_std):
        _real_in(f"image_processor.image_std[{i}]", std, 0.0, 255.0, open_lo=True)
    _real_in("image_processor.rescale_factor", ip.rescale_factor, 0.0, 1.0, open_lo=True)
    _one_of("image_processor.resample", ip.resample.lower(), RESAMPLES)

    # vision tower
    _int_in("vision.num_layers", v.num_layers, 1, MAX_LAYERS)
    _int_in("vision.heads", v.heads, 1, MAX_HEADS)
    _int_in("vision.hidden_size", v.hidden_size, 1, MAX_WIDTH)
    if v.hidden_size % v.heads:
        raise BundleError(
            f"manifest vision.hidden_size {v.hidden_size} is not a multiple of vision.heads {v.heads}; {REBUILD_HINT}"
        )
    _int_in("vision.image_size", v.image_size, 1, MAX_PIXELS_SIDE)
    _int_in("vision.patch_size", v.patch_size, 1, v.image_size, " (at most vision.image_size)")
    if v.image_size % v.patch_size:
        raise BundleError(
            f"manifest vision.image_size {v.image_size} is not a multiple of vision.patch_size {v.patch_size}; {REBUILD_HINT}"
        )
    if v.tokens_per_image != (v.image_size // v.patch_size) ** 2:
        raise BundleError(
            f"manifest vision.tokens_per_image {show(v.tokens_per_image)} is not (vision.image_size "
            f"{v.image_size} / vision.patch_size {v.patch_size})^2 = {(v.image_size // v.patch_size) ** 2}; {REBUILD_HINT}"
        )
    if ip.crop_size != v.image_size:
        raise BundleError(
            f"manifest image_processor.crop_size {ip.crop_size} is not vision.image_size {v.image_size}: the crops "
            f"would not fit the vision graph; {REBUILD_HINT}"
        )
    # hidden_states has num_layers + 1 entries (the embeddings, then each block's output)
    _int_in("vision.feature_layer", v.feature_layer, -v.num_layers, v.num_layers, " (a hidden_states index)")
    feature_block = (v.feature_layer % (v.num_layers + 1)) - 1  # 0-based block whose output the features are
    for key in ("early_layer", "late_layer"):
        _int_in(
            f"vision.{key}", getattr(v, key), 0, feature_block,
            f" (0-based blocks up to the one vision.feature_layer {v.feature_layer} ends at: the graph runs no further)",
        )  # fmt: skip

    # language model
    t, tok = m.text, m.tokens
    _int_in("text.hidden_size", t.hidden_size, 1, MAX_WIDTH)
    _int_in("text.num_layers", t.num_layers, 1, MAX_LAYERS)
    _int_in("text.num_kv_heads", t.num_kv_heads, 1, MAX_HEADS)
    _int_in("text.head_dim", t.head_dim, 1, MAX_WIDTH)
    _int_in("text.vocab_size", t.vocab_size, 1, MAX_VOCAB)
    _int_in("text.max_position_embeddings", t.max_position_embeddings, 1, MAX_POSITIONS)
    for key in ("image", "bos", "eos", "pad"):
        _int_in(
            f"tokens.{key}", getattr(tok, key), 0, t.vocab_size - 1, f" (text.vocab_size is {t.vocab_size})"
        )

    # prompt and graphs
    if not m.prompt.image_placeholder.strip():
        raise BundleError(f"manifest prompt.image_placeholder is blank; {REBUILD_HINT}")
    for g, spec in m.graphs.items():
        needed_in, needed_out = REQUIRED_IO.get(g, ((), ()))
        for direction, names, needed in (
            ("inputs", spec.inputs, needed_in),
            ("outputs", spec.outputs, needed_out),
        ):
            missing = [n for n in needed if n not in names]
            if missing:
                raise BundleError(
                    f"manifest graphs.{g}.{direction} has no {', '.join(missing)}; {REBUILD_HINT}"
                )
            for logical, tensor in names.items():
                rest = tensor.replace("{i}", "")
                if not tensor.strip() or "{" in rest or "}" in rest:
                    raise BundleError(
                        f"manifest graphs.{g}.{direction}.{logical} = {show(tensor)} is not a tensor name "
                        "(only {i}, the layer index, may appear in braces); " + REBUILD_HINT
                    )

    # HiRED defaults: the same ranges as a request's options (hired.config.HiredConfig)
    h = m.hired
    _real_in("hired.rate", h.rate, 0.0, 1.0, open_lo=True)
    _real_in("hired.alpha", h.alpha, 0.0, 1.0)
    _one_of("hired.distribution", h.distribution, DISTRIBUTIONS)
    _one_of("hired.newlines", h.newlines, NEWLINE_MODES)
