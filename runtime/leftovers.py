"""The hidden folders an export leaves beside a bundle when it is killed, and their cleaning at load.

    leftover_pattern("tiny")        # matches .tiny.export-XXXXXXXX (staging) and .tiny.old-XXXXXXXX (previous bundle)
    remove_old_bundles(folder)      # after `folder` loaded: delete its .<name>.old-* leftovers

An export writes into `.<out>.export-XXXXXXXX` and, when it commits, renames the previous bundle into
`.<out>.old-XXXXXXXX` before deleting it (export.staging). A kill during that delete leaves a partial `.old-`
folder. Once the bundle in `folder` has loaded (its manifest and hashes checked), the new bundle is complete, so
its `.old-` leftovers are garbage; staging folders are left to the next export (one may be running now).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path


def leftover_pattern(name: str) -> re.Pattern[str]:
    """The names tempfile.mkdtemp gives an export's staging (`export`) and old-bundle (`old`) folders of `name`."""
    return re.compile(rf"^\.{re.escape(name)}\.(export|old)-[a-z0-9_]{{8}}$")


def remove_old_bundles(folder: Path) -> list[str]:
    """Delete the `.<name>.old-*` folders beside the loaded bundle `folder`; returns their names. Never raises."""
    folder = Path(folder)
    pattern = leftover_pattern(folder.name)
    removed = []
    try:
        entries = sorted(folder.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or match.group(1) != "old" or entry.is_symlink() or not entry.is_dir():
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry.name)
    return removed
