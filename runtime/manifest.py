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
import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import BundleError
from runtime.manifest_checks import (
    MAX_MANIFEST_BYTES,
    REBUILD_HINT,
    HugeInt,
    build,
    check_depth,
    check_file_name,
    check_values,
    first_line,
    parse_json,
    show,
)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
REQUIRED_FILES = ("vision", "projector", "decoder", "embed_tokens", "image_newline", "tokenizer")
STAMP_NAME = ".verified.json"


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
            got = show(data) if isinstance(data, HugeInt) else type(data).__name__
            raise BundleError(f"manifest.json must hold a JSON object, got {got}; {REBUILD_HINT}")
        check_depth(data)
        version = data.get("format_version")
        if isinstance(version, HugeInt) or not isinstance(version, int) or isinstance(version, bool):
            raise BundleError(
                f"manifest.json has no integer format_version (got {show(version)}); {REBUILD_HINT}"
            )
        if version > FORMAT_VERSION:
            raise BundleError(
                f"manifest version {version} is newer than this runtime ({FORMAT_VERSION}); "
                "re-export with this version or upgrade hired-edge"
            )
        if version < FORMAT_VERSION:
            raise BundleError(
                f"manifest version {version} is older than this runtime ({FORMAT_VERSION}); {REBUILD_HINT}"
            )
        m = build(cls, dict(data), "", skip=("root",))
        missing = [n for n in REQUIRED_FILES if n not in m.files]
        if missing:
            raise BundleError(f"manifest.json lists no file for {', '.join(missing)}; {REBUILD_HINT}")
        for name in m.files:
            if name not in m.sha256:
                raise BundleError(f"manifest.json has no sha256 for {name!r}; {REBUILD_HINT}")
        for g in ("vision", "projector", "decoder"):
            if g not in m.graphs:
                raise BundleError(f"manifest.json has no graphs.{g} entry; {REBUILD_HINT}")
        if m.prompt.template.count(m.prompt.image_placeholder) != 1 or "{prompt}" not in m.prompt.template:
            raise BundleError(
                f"manifest prompt template must hold one {m.prompt.image_placeholder} and one {{prompt}}; {REBUILD_HINT}"
            )
        check_values(m)
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
            raise BundleError(
                f"cannot open the bundle {str(path)[:200]!r} ({e}); pass the bundle folder"
            ) from None
        if not exists:
            raise BundleError(f"no bundle at {p.parent}: {MANIFEST_NAME} is missing; {REBUILD_HINT}")
        try:
            size = p.stat().st_size
            if size > MAX_MANIFEST_BYTES:
                raise BundleError(
                    f"{p} is {size} bytes, more than any manifest needs ({MAX_MANIFEST_BYTES}); it is not a "
                    f"bundle manifest; {REBUILD_HINT}"
                )
            raw = p.read_bytes()
            data = parse_json(raw.decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            raise BundleError(f"{p} is not readable JSON ({first_line(e)}); {REBUILD_HINT}") from None
        m = cls.from_dict(data, root=p.parent)
        if verify:
            m.verify_files(manifest_sha256=hashlib.sha256(raw).hexdigest())
        return m

    def path(self, name: str) -> Path:
        """Absolute path of logical file `name`, refused if it leaves the bundle folder."""
        if self.root is None:
            raise BundleError("manifest has no bundle folder; load it with Manifest.from_file")
        if name not in self.files:
            raise BundleError(f"manifest.json lists no file {name!r}; {REBUILD_HINT}")
        rel = self.files[name]
        check_file_name(name, rel)
        if os.path.isabs(rel) or rel.startswith(("/", "\\")) or ".." in Path(rel).parts:
            raise BundleError(
                f"manifest file {name!r} = {rel!r} points outside the bundle folder; refusing it; {REBUILD_HINT}"
            )
        try:
            full = (self.root / rel).resolve()
        except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a name the file system refuses
            raise BundleError(
                f"manifest files.{name} = {rel!r} cannot be resolved ({first_line(e)}); {REBUILD_HINT}"
            ) from None
        if self.root != full and self.root not in full.parents:
            raise BundleError(
                f"{rel} resolves outside the bundle folder (symlink?); refusing it; copy the file into the "
                f"bundle, or {REBUILD_HINT}"
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
                f"{STAMP_NAME} says {stamped_manifest[:12]}…); {REBUILD_HINT}, or delete {self.root / STAMP_NAME} "
                "if you edited the manifest on purpose"
            )
        new_files = {}
        for name in self.files:
            full = self.path(name)
            rel = self.files[name]
            try:
                if not full.is_file():
                    raise BundleError(f"{rel} is missing from the bundle {self.root}; {REBUILD_HINT}")
                st = full.stat()
                # ctime and inode too: size and mtime alone survive an edit followed by os.utime (or touch -r),
                # and ctime cannot be set back. A copy to another machine changes both: it is hashed once there.
                key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, self.sha256[name]]
                if stamped_files.get(rel) != key:
                    digest = sha256_file(full)
                    if digest != self.sha256[name]:
                        raise BundleError(
                            f"{rel} sha256 mismatch (got {digest[:12]}…, manifest says "
                            f"{self.sha256[name][:12]}…): the file was changed or truncated; {REBUILD_HINT}"
                        )
            except OSError as e:
                raise BundleError(f"{rel} cannot be read ({first_line(e)}); {REBUILD_HINT}") from None
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
