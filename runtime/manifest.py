"""The bundle manifest: the one contract between `export/` (writes it once) and `runtime/` (reads every number from it).

    m = Manifest.from_file("artifacts/tiny")          # checks version, keys, types, paths and sha256
    m.path("vision")                                    # -> absolute path of vision.onnx inside the bundle
    m.to_file("artifacts/tiny/manifest.json")           # export side

Unknown format versions, unknown or missing keys, wrong types, file names that leave the bundle folder and
hash mismatches are refused with a `BundleError` that names the file and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import BundleError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
REQUIRED_FILES = ("vision", "projector", "decoder", "embed_tokens", "image_newline", "tokenizer")
STAMP_NAME = ".verified.json"
_FIX = "re-run `make export MODEL=<name>` (or `python -m export`) to rebuild the bundle"


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
    root: Path | None = field(default=None, compare=False)  # the bundle folder, set by from_file

    # ---- reading -------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, root: str | os.PathLike | None = None) -> Manifest:
        if not isinstance(data, dict):
            raise BundleError(f"manifest.json must hold a JSON object, got {type(data).__name__}; {_FIX}")
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise BundleError(f"manifest.json has no integer format_version (got {version!r}); {_FIX}")
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
        if root is not None:
            m = dataclasses.replace(m, root=Path(root).resolve())
        return m

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, verify: bool = True) -> Manifest:
        """Read `path` (a bundle folder or its manifest.json); with `verify`, check every file's location and hash."""
        p = Path(path)
        if p.is_dir() or p.name != MANIFEST_NAME:
            p = p / MANIFEST_NAME
        if not p.exists():
            raise BundleError(f"no bundle at {p.parent}: {MANIFEST_NAME} is missing; {_FIX}")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"{p} is not readable JSON ({e}); {_FIX}") from None
        m = cls.from_dict(data, root=p.parent)
        if verify:
            m.verify_files()
        return m

    def path(self, name: str) -> Path:
        """Absolute path of logical file `name`, refused if it leaves the bundle folder."""
        if self.root is None:
            raise BundleError("manifest has no bundle folder; load it with Manifest.from_file")
        if name not in self.files:
            raise BundleError(f"manifest.json lists no file {name!r}; {_FIX}")
        rel = self.files[name]
        if os.path.isabs(rel) or rel.startswith(("/", "\\")) or ".." in Path(rel).parts:
            raise BundleError(
                f"manifest file {name!r} = {rel!r} points outside the bundle folder; refusing it; {_FIX}"
            )
        full = (self.root / rel).resolve()
        if self.root != full and self.root not in full.parents:
            raise BundleError(
                f"{rel} resolves outside the bundle folder (symlink?); refusing it; copy the file into the "
                f"bundle, or {_FIX}"
            )
        return full

    def verify_files(self) -> None:
        """Every listed file exists inside the bundle and matches its sha256 (a size+mtime+ctime+inode stamp skips re-hashing)."""
        stamp_path = self.root / STAMP_NAME if self.root else None
        stamp = _read_stamp(stamp_path)
        new_stamp = {}
        for name in self.files:
            full = self.path(name)
            if not full.is_file():
                raise BundleError(f"{self.files[name]} is missing from the bundle {self.root}; {_FIX}")
            st = full.stat()
            # ctime and inode too: size and mtime alone survive an edit followed by os.utime (or touch -r),
            # and ctime cannot be set back. A copy to another machine changes both: it is hashed once there.
            key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, self.sha256[name]]
            if stamp.get(self.files[name]) != key:
                digest = sha256_file(full)
                if digest != self.sha256[name]:
                    raise BundleError(
                        f"{self.files[name]} sha256 mismatch (got {digest[:12]}…, manifest says "
                        f"{self.sha256[name][:12]}…): the file was changed or truncated; {_FIX}"
                    )
            new_stamp[self.files[name]] = key
        if stamp_path is not None and new_stamp != stamp:
            try:
                tmp = stamp_path.with_suffix(".tmp")
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
    except (OSError, ValueError):
        return {}


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
    if tp is bool:
        if not isinstance(value, bool):
            raise BundleError(f"manifest {where} must be true/false, got {value!r}; {_FIX}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BundleError(f"manifest {where} must be an integer, got {value!r}; {_FIX}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BundleError(f"manifest {where} must be a number, got {value!r}; {_FIX}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise BundleError(f"manifest {where} must be a string, got {value!r}; {_FIX}")
        return value
    raise TypeError(f"manifest field {where} has unsupported type {tp}")
