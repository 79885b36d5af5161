"""Writing a bundle folder safely: a staging folder beside `--out`, moved into place last; what `--force` may replace.

    with Staging(out, force=True, keep=[checkpoint]) as stage:    # refuses an `out` it may not replace
        ... write the bundle into stage.path ...
        stage.commit()                   # old bundle renamed away, new moved in, old deleted

Anything that leaves the `with` block without `commit()` deletes the staging folder, so an interrupted or failed
export leaves the previous bundle (or none) and never a half-written one. A Ctrl-C or SIGTERM inside the block
becomes `ExportInterrupted`, whose message says what is on disk (`stage.on_disk()`).

What may be replaced (`check_out`): an empty folder, or, with `force`, a folder holding a manifest.json this
project wrote (`is_bundle`). Anything else (user files, a checkpoint, a file) is refused with one line, and an
`out` that is or holds one of the `keep` folders (the --model checkpoint) is refused whatever the flags.
Leftovers of a killed export are hidden siblings named `.<out>.export-XXXXXXXX` (staging) and
`.<out>.old-XXXXXXXX` (the previous bundle, renamed away); only folders with exactly these names are ever
cleaned up (`recover_interrupted`), by the next export into the same `out`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from export.errors import ExportError, ExportInterrupted
from runtime.leftovers import leftover_pattern
from runtime.manifest import MANIFEST_NAME

STAGING_PREFIX = ".{name}.export-"
OLD_PREFIX = ".{name}.old-"
DELETING_SUFFIX = ".deleting"  # the previous bundle inside an .old- folder is renamed so before it is deleted
MAX_MANIFEST_BYTES = 64 << 20


def is_bundle(folder: Path) -> bool:
    """True if `folder` holds a manifest.json this project wrote (integer format_version, files, sha256, hired)."""
    path = Path(folder) / MANIFEST_NAME
    try:
        if not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict):
        return False
    version = data.get("format_version")
    tables = all(isinstance(data.get(key), dict) for key in ("files", "sha256", "hired"))
    return isinstance(version, int) and not isinstance(version, bool) and tables


def _inside_or_equal(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_out(out: Path, *, force: bool, keep: Iterable[Path] = ()) -> None:
    """Raise ExportError unless `out` may be written: absent, an empty folder, or (with `force`) a bundle we wrote.

    `out` is refused when it is a file or a symlink, when it is or holds one of the `keep` folders (whatever
    `force` says), and when it is a non-empty folder that is not a bundle of ours.
    """
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"--out {out} exists and is not a folder; remove it or choose another --out")
    resolved = out.expanduser().resolve()
    for folder in keep:
        kept = Path(folder).expanduser().resolve()
        if _inside_or_equal(kept, resolved):
            what = "is" if kept == resolved else "holds"
            raise ExportError(
                f"--out {out} {what} the --model checkpoint {folder}; writing there would delete it, choose an --out "
                "outside the checkpoint (e.g. artifacts/<name>)"
            )
    if not out.is_dir():
        return
    try:
        empty = not any(out.iterdir())
    except OSError as e:
        raise ExportError(f"cannot read --out {out} ({e.strerror or e}); choose another --out") from None
    if empty:
        return
    if not is_bundle(out):
        raise ExportError(
            f"--out {out} is a folder that is neither empty nor a bundle this tool wrote (no hired-edge manifest.json); "
            "--force replaces only bundles, so choose another --out or empty the folder yourself"
        )
    if not force:
        raise ExportError(f"--out {out} already exists; pass --force to replace it")


def recover_interrupted(out: Path) -> list[str]:
    """Undo what a killed export left beside `out`; returns the names of the folders it removed or restored.

    A previous bundle caught between the two renames of a commit (out missing, `.old-*/<out>` complete) is put
    back; a partly deleted previous bundle and stale staging folders are deleted. Only folders named exactly as
    this module names them are touched. (Two exports into the same --out at once are not supported.)
    """
    out = Path(out)
    if not out.parent.is_dir():
        return []
    pattern = leftover_pattern(out.name)
    done = []
    for entry in sorted(out.parent.iterdir()):
        match = pattern.match(entry.name)
        if match is None or entry.is_symlink() or not entry.is_dir():
            continue
        if match.group(1) == "old" and not out.exists() and (entry / out.name).is_dir():
            os.replace(entry / out.name, out)
        shutil.rmtree(entry, ignore_errors=True)
        done.append(entry.name)
    return done


def _free_name(target: Path) -> Path:
    """`target` if it may be replaced (absent, empty or a bundle), else the first free `<target>-2`, `-3`, ..."""
    candidate, n = target, 1
    while candidate.is_symlink() or (candidate.exists() and not (candidate.is_dir() and _replaceable(candidate))):
        n += 1
        candidate = target.with_name(f"{target.name}-{n}")
    return candidate


def _replaceable(folder: Path) -> bool:
    try:
        return not any(folder.iterdir()) or is_bundle(folder)
    except OSError:
        return False


class Staging:
    """A temp folder beside `out` that becomes `out` on `commit()` and is deleted otherwise.

    Refuses (ExportError) what `check_out` refuses and a parent folder that cannot be written, before any work.
    """

    def __init__(self, out: str | os.PathLike, *, force: bool, keep: Iterable[Path] = ()):
        self.out = Path(out)
        self.old_root: Path | None = None  # the .old- folder of the previous bundle while it is being deleted
        self.done = False  # True once the new bundle is in place
        self.had_bundle = False
        recover_interrupted(self.out)
        check_out(self.out, force=force, keep=keep)
        self.had_bundle = self.out.is_dir()
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX.format(name=self.out.name), dir=self.out.parent))
        except OSError as e:
            raise ExportError(f"cannot write to {self.out.parent} ({e.strerror or e}); choose a writable --out") from None
        _make_world_readable(self.path)

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        note = self.on_disk() if interrupted and not isinstance(exc, ExportInterrupted) else None
        if not self.done:
            self.discard()
        if note is not None:
            raise ExportInterrupted(f"interrupted; {note}") from exc

    def on_disk(self) -> str:
        """One sentence: what `out` holds now (for the message of an interrupted export)."""
        if not self.done:
            if self.had_bundle:
                return f"nothing was written: {self.out} still holds the previous bundle"
            return f"nothing was written: no bundle at {self.out}"
        if self.old_root is not None and self.old_root.exists():
            return (
                f"{self.out} holds the new, complete bundle; the previous one was being deleted and its remains in "
                f"{self.old_root} are removed by the next export or load of {self.out}"
            )
        return f"{self.out} holds the new, complete bundle"

    def commit(self) -> Path:
        """Move the staged bundle to `out`: rename an old bundle away, move the new one in, delete the old."""
        self._move_in(self.out)
        self._delete_old()
        return self.out

    def keep_as(self, target: Path) -> Path:
        """Move the staged folder to `target` instead of `out` (e.g. a bundle that failed checks); `target` is
        replaced only if empty or a bundle, else the next free `<target>-N` is used. Returns where it went."""
        target = _free_name(Path(target))
        self._move_in(target)
        self._delete_old()
        return target

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def close(self) -> None:
        if not self.done:
            self.discard()

    def _move_in(self, target: Path) -> None:
        """Rename an existing `target` into a fresh .old- folder, then the staging folder to `target`.

        If the second rename did not happen, the first is undone, so `target` is never left missing.
        """
        old = None
        try:
            if target.exists() or target.is_symlink():
                self.old_root = Path(tempfile.mkdtemp(prefix=OLD_PREFIX.format(name=target.name), dir=target.parent))
                old = self.old_root / target.name
                os.replace(target, old)
            os.replace(self.path, target)
        except BaseException:
            if self.path.exists():  # the new bundle did not move: put the previous one back
                if old is not None and old.exists() and not target.exists():
                    os.replace(old, target)
                if self.old_root is not None:
                    shutil.rmtree(self.old_root, ignore_errors=True)
                    self.old_root = None
            else:
                self.done = True
            raise
        self.done = True

    def _delete_old(self) -> None:
        """Delete the previous bundle; first rename it so a leftover is never mistaken for a complete bundle."""
        if self.old_root is None:
            return
        for child in list(self.old_root.iterdir()):
            if not child.name.endswith(DELETING_SUFFIX):
                os.replace(child, child.with_name(child.name + DELETING_SUFFIX))
        shutil.rmtree(self.old_root, ignore_errors=True)
        if not self.old_root.exists():
            self.old_root = None


def _make_world_readable(folder: Path) -> None:
    """mkdtemp makes a 0700 folder; give it the mode a plain mkdir would have."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
