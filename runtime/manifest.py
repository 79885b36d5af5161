"""The bundle manifest: the one contract between `export/` (writes it once) and `runtime/` (reads every number from it).

    m = Manifest.from_file("artifacts/tiny")          # checks version, keys, types, paths and sha256
    m.path("vision")                                    # -> absolute path of vision.onnx inside the bundle
    m.to_file("artifacts/tiny/manifest.json")           # export side

Unknown format versions, unknown or missing keys, wrong types, numbers out of their range (NaN, negative sizes,
zero heads, token ids outside the vocabulary, a patch size that does not divide the image), unknown choices,
absurd nesting or integers, file names that leave the bundle folder or that no file system allows, hash
mismatches and a manifest.json edited after the bundle was verified are refused with a `BundleError` that names
the key (or file) and the fix.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import threading
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hired.config import DISTRIBUTIONS, NEWLINE_MODES
from runtime.errors import BundleError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
REQUIRED_FILES = ("vision", "projector", "decoder", "embed_tokens", "image_newline", "tokenizer")
STAMP_NAME = ".verified.json"
_FIX = "re-run `make export MODEL=<name>` (or `python -m export`) to rebuild the bundle"

MODEL_DTYPES = ("fp32", "fp16")  # manifest.model.dtype: the float dtype of the graphs' weights
RESAMPLES = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")  # runtime.preprocess.RESAMPLE's keys
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


@dataclass(frozen=True)
class ModelInfo:
    name: str  # registry name or checkpoint folder name
    source: str  # where the weights came from (folder, hub id, or "random")
    dtype: str  # "fp32" | "fp16": dtype of the graphs' weights
    random_weights: bool
    tokenizer: str  # "checkpoint" or a description of the offline stand-in used instead


@dataclass(frozen=True)
class ImageProcessorSpec:
    crop_size: int  # 336: side of every crop and of the base image
    shortest_edge: int  # 336: the base image is resized to (shortest_edge, shortest_edge)
    grid_pinpoints: tuple[tuple[int, int], ...]  # (height, width) pairs
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float  # 1/255
    resample: str  # "bicubic"


@dataclass(frozen=True)
class VisionSpec:
    num_layers: int  # encoder blocks in the checkpoint
    heads: int
    hidden_size: int  # Dv
    image_size: int  # 336
    patch_size: int  # 14
    tokens_per_image: int  # (image_size // patch_size) ** 2 = 576
    feature_layer: int  # HF hidden_states index of the features (-2)
    early_layer: int  # 0-based encoder block whose CLS attention distributes the budget
    late_layer: int  # 0-based encoder block whose CLS attention ranks tokens


@dataclass(frozen=True)
class TextSpec:
    hidden_size: int  # Dt
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int  # the runtime refuses prompts + visual span + new tokens longer than this


@dataclass(frozen=True)
class TokenIds:
    image: int
    bos: int
    eos: int
    pad: int


@dataclass(frozen=True)
class PromptSpec:
    template: str  # exactly one image placeholder and one "{prompt}"
    add_bos: bool
    image_placeholder: str  # "<image>"


@dataclass(frozen=True)
class GraphSpec:
    inputs: dict[str, str]  # logical name -> tensor name ("{i}" marks the layer index of KV tensors)
    outputs: dict[str, str]


@dataclass(frozen=True)
class HiredDefaults:
    rate: float
    alpha: float
    distribution: str
    newlines: str


@dataclass(frozen=True)
class QuantSpec:
    """Weight-only quantization of the decoder's linear layers (export/quantize.py); absent key = "none"."""

    method: str = "none"  # "none" | "int8" | "int4" (com.microsoft.MatMulNBits, runtime.quant)
    block_size: int = 0  # values per scale along K (32 by default); 0 when method is "none"
    accuracy_level: int = 0  # MatMulNBits accuracy_level (4: int8 activations on CPU)


@dataclass(frozen=True)
class Manifest:
    format_version: int
    model: ModelInfo
    files: dict[str, str]  # logical name -> file name relative to the bundle, verbatim
    sha256: dict[str, str]  # logical name -> hex digest
    image_processor: ImageProcessorSpec
    vision: VisionSpec
    text: TextSpec
    tokens: TokenIds
    prompt: PromptSpec
    graphs: dict[str, GraphSpec]  # "vision" | "projector" | "decoder"
    hired: HiredDefaults
    export_info: dict[str, Any] = field(default_factory=dict)  # free-form provenance (versions, opset, times)
    quant: QuantSpec = field(default_factory=QuantSpec)
    root: Path | None = field(default=None, compare=False)  # the bundle folder, set by from_file

    # ---- reading -------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, root: str | os.PathLike | None = None) -> Manifest:
        if not isinstance(data, dict):
            got = _show(data) if isinstance(data, _HugeInt) else type(data).__name__
            raise BundleError(f"manifest.json must hold a JSON object, got {got}; {_FIX}")
        _check_depth(data)
        version = data.get("format_version")
        if isinstance(version, _HugeInt) or not isinstance(version, int) or isinstance(version, bool):
            raise BundleError(f"manifest.json has no integer format_version (got {_show(version)}); {_FIX}")
        if version > FORMAT_VERSION:
            raise BundleError(
                f"manifest version {version} is newer than this runtime ({FORMAT_VERSION}); "
                "re-export with this version or upgrade hired-edge"
            )
        if version < FORMAT_VERSION:
            raise BundleError(f"manifest version {version} is older than this runtime ({FORMAT_VERSION}); {_FIX}")
        m = _build(cls, dict(data), "", skip=("root",))
        missing = [n for n in REQUIRED_FILES if n not in m.files]
        if missing:
            raise BundleError(f"manifest.json lists no file for {', '.join(missing)}; {_FIX}")
        for name in m.files:
            if name not in m.sha256:
                raise BundleError(f"manifest.json has no sha256 for {name!r}; {_FIX}")
        for g in ("vision", "projector", "decoder"):
            if g not in m.graphs:
                raise BundleError(f"manifest.json has no graphs.{g} entry; {_FIX}")
        if m.prompt.template.count(m.prompt.image_placeholder) != 1 or "{prompt}" not in m.prompt.template:
            raise BundleError(
                f"manifest prompt template must hold one {m.prompt.image_placeholder} and one {{prompt}}; {_FIX}"
            )
        _check_values(m)
        if root is not None:
            m = dataclasses.replace(m, root=Path(root).resolve())
        return m

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, verify: bool = True) -> Manifest:
        """Read `path` (a bundle folder or its manifest.json); with `verify`, check every file's location and hash,
        and that manifest.json is the one the verified stamp saw (if there is a stamp)."""
        try:
            p = Path(path)
            if p.is_dir() or p.name != MANIFEST_NAME:
                p = p / MANIFEST_NAME
            exists = p.exists()
        except (OSError, ValueError, TypeError) as e:
            raise BundleError(f"cannot open the bundle {str(path)[:200]!r} ({e}); pass the bundle folder") from None
        if not exists:
            raise BundleError(f"no bundle at {p.parent}: {MANIFEST_NAME} is missing; {_FIX}")
        try:
            size = p.stat().st_size
            if size > MAX_MANIFEST_BYTES:
                raise BundleError(
                    f"{p} is {size} bytes, more than any manifest needs ({MAX_MANIFEST_BYTES}); it is not a "
                    f"bundle manifest; {_FIX}"
                )
            raw = p.read_bytes()
            data = _parse_json(raw.decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            raise BundleError(f"{p} is not readable JSON ({_first_line(e)}); {_FIX}") from None
        m = cls.from_dict(data, root=p.parent)
        if verify:
            m.verify_files(manifest_sha256=hashlib.sha256(raw).hexdigest())
        return m

    def path(self, name: str) -> Path:
        """Absolute path of logical file `name`, refused if it leaves the bundle folder."""
        if self.root is None:
            raise BundleError("manifest has no bundle folder; load it with Manifest.from_file")
        if name not in self.files:
            raise BundleError(f"manifest.json lists no file {name!r}; {_FIX}")
        rel = self.files[name]
        _check_file_name(name, rel)
        if os.path.isabs(rel) or rel.startswith(("/", "\\")) or ".." in Path(rel).parts:
            raise BundleError(
                f"manifest file {name!r} = {rel!r} points outside the bundle folder; refusing it; {_FIX}"
            )
        try:
            full = (self.root / rel).resolve()
        except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a name the file system refuses
            raise BundleError(f"manifest files.{name} = {rel!r} cannot be resolved ({_first_line(e)}); {_FIX}") from None
        if self.root != full and self.root not in full.parents:
            raise BundleError(
                f"{rel} resolves outside the bundle folder (symlink?); refusing it; copy the file into the "
                f"bundle, or {_FIX}"
            )
        return full

    def verify_files(self, manifest_sha256: str | None = None) -> None:
        """Every listed file exists inside the bundle and matches its sha256 (a size+mtime+ctime+inode stamp skips
        re-hashing), and manifest.json (its sha256 `manifest_sha256`) is the one the stamp was written for.

        The stamp (.verified.json) records the manifest's sha256 beside each file's key, so an edit to
        manifest.json after a verified load is refused like an edit to a graph. A bundle without a stamp (a
        fresh copy) is hashed in full and stamped."""
        stamp_path = self.root / STAMP_NAME if self.root else None
        stamp = _read_stamp(stamp_path)
        stamped_files = stamp.get("files") if isinstance(stamp.get("files"), dict) else {}
        stamped_manifest = stamp.get("manifest")
        if manifest_sha256 and isinstance(stamped_manifest, str) and stamped_manifest != manifest_sha256:
            raise BundleError(
                f"{MANIFEST_NAME} was changed after the bundle was verified (sha256 {manifest_sha256[:12]}…, "
                f"{STAMP_NAME} says {stamped_manifest[:12]}…); {_FIX}, or delete {self.root / STAMP_NAME} "
                "if you edited the manifest on purpose"
            )
        new_files = {}
        for name in self.files:
            full = self.path(name)
            rel = self.files[name]
            try:
                if not full.is_file():
                    raise BundleError(f"{rel} is missing from the bundle {self.root}; {_FIX}")
                st = full.stat()
                # ctime and inode too: size and mtime alone survive an edit followed by os.utime (or touch -r),
                # and ctime cannot be set back. A copy to another machine changes both: it is hashed once there.
                key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, self.sha256[name]]
                if stamped_files.get(rel) != key:
                    digest = sha256_file(full)
                    if digest != self.sha256[name]:
                        raise BundleError(
                            f"{rel} sha256 mismatch (got {digest[:12]}…, manifest says "
                            f"{self.sha256[name][:12]}…): the file was changed or truncated; {_FIX}"
                        )
            except OSError as e:
                raise BundleError(f"{rel} cannot be read ({_first_line(e)}); {_FIX}") from None
            new_files[rel] = key
        # Called without the manifest's hash (not through from_file), the stamp keeps the manifest hash it has.
        manifest_seen = manifest_sha256 or (stamped_manifest if isinstance(stamped_manifest, str) else None)
        new_stamp = {"manifest": manifest_seen, "files": new_files} if manifest_seen else {"files": new_files}
        if stamp_path is not None and new_stamp != stamp:
            try:
                tmp = stamp_path.with_name(f"{STAMP_NAME}.{os.getpid()}.{threading.get_ident()}.tmp")
                tmp.write_text(json.dumps(new_stamp))
                os.replace(tmp, stamp_path)
            except OSError:
                pass  # read-only bundle: hashing again next time is fine

    # ---- writing (export side) ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("root", None)
        return d

    def to_file(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_stamp(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, RecursionError):  # unreadable, not JSON, absurd: hash everything again
        return {}


# ---- reading JSON that may be hostile: huge integers, NaN, absurd nesting -----------------------------------
class _HugeInt:
    """An integer literal too long to be any manifest number; kept as its digit count so the key can be named."""

    __slots__ = ("digits",)

    def __init__(self, digits: int):
        self.digits = digits


def _parse_int(text: str) -> int | _HugeInt:
    return _HugeInt(len(text.lstrip("-"))) if len(text) > MAX_INT_DIGITS else int(text)


_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{},]')


def _parse_json(text: str) -> Any:
    """json.loads, refusing nesting deeper than MAX_DEPTH (naming where) before the parser recurses into it."""
    stack: list[list] = []  # [kind, key or index, expecting a key]
    for tok in _TOKENS.finditer(text):
        t = tok.group()
        if t in "{[":
            if len(stack) >= MAX_DEPTH:
                raise BundleError(
                    f"manifest.json nests more than {MAX_DEPTH} levels deep at {_json_path(stack)}; "
                    f"a manifest nests a few levels; {_FIX}"
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


def _check_depth(data: Any) -> None:
    """from_dict's own depth check (a dict built in Python never went through _parse_json)."""
    todo = [(data, 0, "(top level)")]
    while todo:
        value, depth, where = todo.pop()
        if depth > MAX_DEPTH:
            raise BundleError(f"manifest.json nests more than {MAX_DEPTH} levels deep at {where}; {_FIX}")
        if isinstance(value, dict):
            todo.extend((v, depth + 1, f"{where}.{k}" if depth else str(k)) for k, v in value.items())
        elif isinstance(value, list | tuple):
            todo.extend((v, depth + 1, f"{where}[{i}]") for i, v in enumerate(value))
        elif isinstance(value, _HugeInt):
            raise BundleError(f"manifest {where} is an integer of {value.digits} digits; {_FIX}")


def _show(value: Any) -> str:
    """repr for messages, short for absurd integers (repr of a 5,000-digit int raises) and long strings."""
    if isinstance(value, _HugeInt):
        return f"an integer of {value.digits} digits"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _check_file_name(name: str, rel: str) -> None:
    """A bundle file name the file system can hold: not empty, no NUL or control characters, not too long."""
    where = f"manifest files.{name}"
    if not rel or rel.strip() != rel:
        raise BundleError(f"{where} = {_show(rel)} is not a file name; {_FIX}")
    if any(ord(c) < 32 or ord(c) == 127 for c in rel):
        raise BundleError(f"{where} = {_show(rel)} holds a control character (NUL?); no bundle file has one; {_FIX}")
    try:
        raw = os.fsencode(rel)
    except (UnicodeError, ValueError):
        raise BundleError(f"{where} = {_show(rel)} cannot be encoded as a file name; {_FIX}") from None
    longest = max((len(part) for part in re.split(rb"[/\\]", raw)), default=0)
    if longest > MAX_NAME_BYTES or len(raw) > MAX_PATH_BYTES:
        raise BundleError(
            f"{where} is {len(raw)} bytes with a {longest}-byte name: longer than a file system allows "
            f"({os.strerror(errno.ENAMETOOLONG)}: at most {MAX_NAME_BYTES} bytes a name); {_FIX}"
        )


# ---- a small typed builder: JSON -> frozen dataclasses, refusing unknown/missing keys and wrong types ----
def _build(cls, data: Any, where: str, skip: tuple[str, ...] = ()):
    label = where or "(top level)"
    if not isinstance(data, dict):
        raise BundleError(f"manifest {label} must be an object, got {type(data).__name__}; {_FIX}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise BundleError(f"manifest {label} has unknown key(s) {', '.join(unknown)}; {_FIX}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                continue
            raise BundleError(f"manifest {label} is missing key {name!r}; {_FIX}")
        kwargs[name] = _convert(hints[name], data[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _convert(tp, value: Any, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            if a is type(None) and value is None:
                return None
        return _convert(next(a for a in args if a is not type(None)), value, where)
    if tp is Any:
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise BundleError(f"manifest {where} must be an object, got {type(value).__name__}; {_FIX}")
        kt, vt = args
        return {_convert(kt, k, where): _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise BundleError(f"manifest {where} must be a list, got {type(value).__name__}; {_FIX}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise BundleError(f"manifest {where} must have {len(args)} entries, got {len(value)}; {_FIX}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if isinstance(value, _HugeInt):
        raise BundleError(f"manifest {where} is an integer of {value.digits} digits, far outside any range; {_FIX}")
    if tp is bool:
        if not isinstance(value, bool):
            raise BundleError(f"manifest {where} must be true/false, got {_show(value)}; {_FIX}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BundleError(f"manifest {where} must be an integer, got {_show(value)}; {_FIX}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BundleError(f"manifest {where} must be a number, got {_show(value)}; {_FIX}")
        try:
            return float(value)
        except OverflowError:
            raise BundleError(f"manifest {where} = {_show(value)} is too large for a number; {_FIX}") from None
    if tp is str:
        if not isinstance(value, str):
            raise BundleError(f"manifest {where} must be a string, got {_show(value)}; {_FIX}")
        return value
    raise TypeError(f"manifest field {where} has unsupported type {tp}")


# ---- the numbers: each in its range, and consistent with each other --------------------------------------------
def _int_in(where: str, value: int, lo: int, hi: int, what: str = "") -> None:
    if not lo <= value <= hi:
        raise BundleError(f"manifest {where} = {_show(value)} is outside [{lo}, {hi}]{what}; {_FIX}")


def _real_in(where: str, value: float, lo: float, hi: float, *, open_lo: bool = False) -> None:
    ok = math.isfinite(value) and (lo < value if open_lo else lo <= value) and value <= hi
    if not ok:
        bounds = f"({lo}, {hi}]" if open_lo else f"[{lo}, {hi}]"
        raise BundleError(f"manifest {where} = {_show(value)} is not a finite number in {bounds}; {_FIX}")


def _one_of(where: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise BundleError(f"manifest {where} = {_show(value)} is not one of {', '.join(choices)}; {_FIX}")


def _check_values(m: Manifest) -> None:
    """Every number in its range and every choice known; numbers that must agree with each other do."""
    _one_of("model.dtype", m.model.dtype, MODEL_DTYPES)

    # files and hashes
    for name, rel in m.files.items():
        _check_file_name(name, rel)
    for name, digest in m.sha256.items():
        if name not in m.files:
            raise BundleError(f"manifest sha256.{name} has no entry in files; {_FIX}")
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise BundleError(f"manifest sha256.{name} = {_show(digest)} is not a sha256 hex digest; {_FIX}")

    # image processor
    ip, v = m.image_processor, m.vision
    _int_in("image_processor.crop_size", ip.crop_size, 1, MAX_PIXELS_SIDE)
    _int_in("image_processor.shortest_edge", ip.shortest_edge, 1, MAX_PIXELS_SIDE)
    for i, pin in enumerate(ip.grid_pinpoints):
        for side in pin:
            _int_in(f"image_processor.grid_pinpoints[{i}]", side, ip.crop_size, MAX_CROPS_PER_SIDE * ip.crop_size)
            if side % ip.crop_size:
                raise BundleError(
                    f"manifest image_processor.grid_pinpoints[{i}] = {list(pin)} does not tile into whole crops of "
                    f"image_processor.crop_size {ip.crop_size}; {_FIX}"
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
            f"manifest vision.hidden_size {v.hidden_size} is not a multiple of vision.heads {v.heads}; {_FIX}"
        )
    _int_in("vision.image_size", v.image_size, 1, MAX_PIXELS_SIDE)
    _int_in("vision.patch_size", v.patch_size, 1, v.image_size, " (at most vision.image_size)")
    if v.image_size % v.patch_size:
        raise BundleError(
            f"manifest vision.image_size {v.image_size} is not a multiple of vision.patch_size {v.patch_size}; {_FIX}"
        )
    if v.tokens_per_image != (v.image_size // v.patch_size) ** 2:
        raise BundleError(
            f"manifest vision.tokens_per_image {_show(v.tokens_per_image)} is not (vision.image_size "
            f"{v.image_size} / vision.patch_size {v.patch_size})^2 = {(v.image_size // v.patch_size) ** 2}; {_FIX}"
        )
    if ip.crop_size != v.image_size:
        raise BundleError(
            f"manifest image_processor.crop_size {ip.crop_size} is not vision.image_size {v.image_size}: the crops "
            f"would not fit the vision graph; {_FIX}"
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
        _int_in(f"tokens.{key}", getattr(tok, key), 0, t.vocab_size - 1, f" (text.vocab_size is {t.vocab_size})")

    # prompt and graphs
    if not m.prompt.image_placeholder.strip():
        raise BundleError(f"manifest prompt.image_placeholder is blank; {_FIX}")
    for g, spec in m.graphs.items():
        needed_in, needed_out = REQUIRED_IO.get(g, ((), ()))
        for direction, names, needed in (("inputs", spec.inputs, needed_in), ("outputs", spec.outputs, needed_out)):
            missing = [n for n in needed if n not in names]
            if missing:
                raise BundleError(f"manifest graphs.{g}.{direction} has no {', '.join(missing)}; {_FIX}")
            for logical, tensor in names.items():
                rest = tensor.replace("{i}", "")
                if not tensor.strip() or "{" in rest or "}" in rest:
                    raise BundleError(
                        f"manifest graphs.{g}.{direction}.{logical} = {_show(tensor)} is not a tensor name "
                        "(only {i}, the layer index, may appear in braces); " + _FIX
                    )

    # HiRED defaults: the same ranges as a request's options (hired.config.HiredConfig)
    h = m.hired
    _real_in("hired.rate", h.rate, 0.0, 1.0, open_lo=True)
    _real_in("hired.alpha", h.alpha, 0.0, 1.0)
    _one_of("hired.distribution", h.distribution, DISTRIBUTIONS)
    _one_of("hired.newlines", h.newlines, NEWLINE_MODES)
