"""Fetch a registry model's checkpoint from the Hugging Face Hub when this machine has no complete copy.

    python -m models.download llava-next-7b [--download-dir checkpoints/llava-next-7b]
    python -m models.download --repo llava-hf/llava-v1.6-vicuna-7b-hf     # any hub repo, into the HF cache

    from models.download import ensure_checkpoint, missing_files
    folder = ensure_checkpoint("llava-next-7b")   # checkpoints/<name>, a complete HF-cache copy, or a fresh download

Where a registry name is looked for, in order: checkpoints/<name>/ (the current folder, then the repository),
`--download-dir`, the snapshot of its hub id in the Hugging Face cache. A folder counts only when complete:
config.json, the tokenizer files, and every safetensors file of the weight map, each with the hub's size
(online) and a safetensors header that parses and accounts for the file's length (always).
(`snapshot_download(local_files_only=True)` alone also returns partial snapshots.)

Otherwise `huggingface_hub.snapshot_download` fetches only what export reads (*.safetensors, the json configs and
index, tokenizer files; never pickled *.bin weights or remote code), with its progress bars, into the HF cache
(HF_HOME / HF_HUB_CACHE) or `download_dir`. Files already complete are kept, a dropped connection is resumed with
an HTTP Range request, and the folder is checked again afterwards: a partial download is reported, never used,
and the next run fetches only what is missing (into the same folder: a partial checkpoints/<name> that an
earlier `--download-dir` left is finished in place). huggingface_hub 2.4 discards a file's partial bytes when
its process stops, so across runs the unit of resumption is the finished file. HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE are honoured (read by
huggingface_hub when it is imported). Every failure is a `DownloadError` of one line saying what to do.

Imports no torch or transformers.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import struct
import sys
from collections.abc import Callable, Mapping
from fnmatch import fnmatch
from pathlib import Path

from models import registry

REPO_ROOT = Path(__file__).resolve().parent.parent
# What export reads. Never *.bin / *.pt (pickled weights) or *.py (remote code).
ALLOW_PATTERNS = ("*.safetensors", "*.json", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt", "*.jinja")
IGNORE_PATTERNS = ("*.bin.index.json", "*.pt.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the json header


class DownloadError(Exception):
    """The checkpoint could not be found or fetched; one line saying what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def _say(msg: str) -> None:
    print(f"[download] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- completeness


def wanted(path: str) -> bool:
    """True for a repo file that export reads (and so the download fetches)."""
    return any(fnmatch(path, p) for p in ALLOW_PATTERNS) and not any(fnmatch(path, p) for p in IGNORE_PATTERNS)


def weight_files(folder: Path) -> list[str] | None:
    """The safetensors files the checkpoint's weights are in (the index's weight map, else model.safetensors);
    None when the folder names none."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
        except (OSError, ValueError, AttributeError):
            return None
        return sorted(set(weight_map.values())) or None
    if (folder / SAFETENSORS_SINGLE).is_file():
        return [SAFETENSORS_SINGLE]
    return None


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file (None if it is): its 8-byte header length, json header and the
    data offsets must account for the file's size exactly, so a truncated file is caught."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "shorter than a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                return "header length past the end of the file"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"unreadable header ({e.__class__.__name__})"
    if not isinstance(header, dict):
        return "header is not a json object"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            return f"tensor {name!r} has no data_offsets"
    if 8 + n + end != size:
        return f"{size} bytes, the header needs {8 + n + end} (truncated or padded)"
    return None


def missing_files(folder: Path, sizes: Mapping[str, int] | None = None, *, tokenizer: bool = True) -> list[str]:
    """What keeps `folder` from being a complete checkpoint ([] when complete), one short item per problem.

    sizes:     the hub's file sizes (path -> bytes); every wanted file listed there must be present with that size.
    tokenizer: require tokenizer.json or tokenizer.model.
    """
    folder = Path(folder)
    problems = []
    if not (folder / "config.json").is_file():
        problems.append("config.json")
    if tokenizer and not any((folder / t).is_file() for t in TOKENIZER_FILES):
        problems.append("tokenizer (tokenizer.json or tokenizer.model)")
    if sizes is not None:
        for path, size in sorted(sizes.items()):
            if not wanted(path):
                continue
            local = folder / path
            if not local.is_file():
                problems.append(path)
            elif size is not None and local.stat().st_size != size:
                problems.append(f"{path} ({local.stat().st_size} of {size} bytes)")
    shards = weight_files(folder)
    if shards is None:
        problems.append(f"weights ({SAFETENSORS_INDEX} or {SAFETENSORS_SINGLE})")
    for shard in shards or []:
        local = folder / shard
        if not local.is_file():
            problems.append(shard)
        elif (why := safetensors_problem(local)) is not None:
            problems.append(f"{shard} ({why})")
    return list(dict.fromkeys(problems))


def _summary(problems: list[str]) -> str:
    shown = ", ".join(problems[:3])
    return shown + (f" and {len(problems) - 3} more" if len(problems) > 3 else "")


# ----------------------------------------------------------------------------- the hub


def _hub():
    """huggingface_hub with the submodules used here loaded (the package loads its attributes lazily)."""
    import huggingface_hub
    import huggingface_hub.constants
    import huggingface_hub.hf_api
    import huggingface_hub.utils  # noqa: F401

    return huggingface_hub


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub read it."""
    return bool(_hub().constants.HF_HUB_OFFLINE)


def endpoint() -> str:
    return str(_hub().constants.ENDPOINT)


def cache_dir() -> Path:
    return Path(_hub().constants.HF_HUB_CACHE)


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The HF cache's snapshot folder of commit `revision`, or of the commit its ref (default main) names, if present."""
    storage = cache_dir() / ("models--" + repo_id.replace("/", "--"))
    commit = revision or "main"
    if not (len(commit) == 40 and all(c in "0123456789abcdef" for c in commit)):  # a branch or tag: its ref
        try:
            commit = (storage / "refs" / commit).read_text(encoding="utf-8").strip()
        except OSError:
            return None
    snapshot = storage / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def _network_error(e: BaseException) -> bool:
    """A transport failure (no route, refused, reset, timeout, proxy) from httpx, requests or the OS."""
    names = {c.__name__ for c in type(e).__mro__}
    transport = {"TransportError", "ConnectError", "TimeoutException", "RemoteProtocolError", "ConnectionError",
                 "Timeout", "ProxyError", "ReadTimeout", "ConnectTimeout", "ChunkedEncodingError"}  # fmt: skip
    return bool(names & transport) or isinstance(e, ConnectionError | TimeoutError)


def explain(e: BaseException, repo_id: str, where: Path | None = None) -> DownloadError:
    """The one-line DownloadError for an exception raised while listing or fetching `repo_id`."""
    hub = _hub()
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    url = f"{endpoint()}/{repo_id}"
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        place = where if where is not None else cache_dir()
        return DownloadError(
            f"disk full while downloading {repo_id} into {place}: free some space there, or pass --download-dir "
            "on a larger disk (or set HF_HOME), then run again; finished files are kept"
        )
    token = "HF_TOKEN is set but that token has no access" if hub.get_token() else "no HF_TOKEN is set"
    if isinstance(e, GatedRepoError) or (status == 403 and not isinstance(e, RepositoryNotFoundError)):
        return DownloadError(
            f"{repo_id} is gated or private ({status or 'access refused'}; {token}): accept its licence at {url} "
            "while logged in, then set HF_TOKEN to a read token of that account (or run `hf auth login`) and run again"
        )
    if isinstance(e, RevisionNotFoundError):
        return DownloadError(f"{repo_id} has no such revision on {endpoint()} (404): check the revision and run again")
    if isinstance(e, RepositoryNotFoundError) or status in (401, 404):  # the hub answers 401 for a missing repo too
        private = "" if status == 404 else f" or is private ({token})"
        return DownloadError(
            f"{repo_id} was not found on {endpoint()} ({status}){private}: check the model's hub id "
            "(models/registry.py) and HF_ENDPOINT; if it is private or gated, set HF_TOKEN to a read token with access"
        )
    if _network_error(e) or isinstance(e, hub.utils.LocalEntryNotFoundError):
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        return DownloadError(
            f"cannot reach {endpoint()} to download {repo_id} ({type(e).__name__}: {reason}): check the network, "
            "proxy (HTTPS_PROXY) or HF_ENDPOINT and run again, finished files are kept; or set HF_HUB_OFFLINE=1 "
            "and put the checkpoint on disk yourself"
        )
    if isinstance(e, HfHubHTTPError):
        return DownloadError(
            f"{endpoint()} answered {status} while sending {repo_id}: run the same command again later; finished "
            "files are kept and only the rest is fetched"
        )
    return DownloadError(f"downloading {repo_id} failed: {type(e).__name__}: {e}")


def hub_sizes(repo_id: str, revision: str | None = None) -> tuple[str, dict[str, int]]:
    """(commit, {path: size}) of the repo's files at `revision`, from the hub. Raises DownloadError."""
    hub = _hub()
    api = hub.HfApi()
    try:
        commit = api.model_info(repo_id, revision=revision).sha
        files = api.list_repo_tree(repo_id, revision=commit, recursive=True)
        sizes = {f.path: int(f.size) for f in files if isinstance(f, hub.hf_api.RepoFile)}
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one line
        raise explain(e, repo_id) from None
    return str(commit), sizes


def _free_bytes(folder: Path) -> int | None:
    for path in (folder, *folder.parents):
        try:
            return shutil.disk_usage(path).free
        except OSError:
            continue
    return None


def download(
    repo_id: str,
    *,
    download_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    tokenizer: bool = True,
    log: Callable[[str], None] = _say,
) -> Path:
    """Fetch what export reads of `repo_id` into the HF cache (or `download_dir`) and check it; the folder.

    Raises DownloadError: offline, gated/private, not found, network failure, disk full, no safetensors weights,
    or a download that is still incomplete afterwards (the next run fetches only what is missing).
    """
    hub = _hub()
    if offline():
        raise DownloadError(
            f"HF_HUB_OFFLINE is set, so {repo_id} cannot be downloaded; unset it, or put the checkpoint on disk"
        )
    commit, sizes = hub_sizes(repo_id, revision)
    fetch = {p: s for p, s in sizes.items() if wanted(p)}
    if not any(p.endswith(".safetensors") for p in fetch):
        pickled = sorted(p for p in sizes if p.endswith((".bin", ".pt", ".pth", ".ckpt")))
        raise DownloadError(
            f"{repo_id} has no safetensors weights"
            + (f" (only pickled {', '.join(pickled[:2])}, which hired-edge never loads)" if pickled else "")
            + "; convert it on a trusted machine (save_pretrained(dir, safe_serialization=True)) and pass the folder"
        )
    target = Path(download_dir).expanduser() if download_dir is not None else cache_dir()
    have = cached_snapshot(repo_id, commit) if download_dir is None else target
    done = sum(s for p, s in fetch.items() if have is not None and (have / p).is_file()
               and (have / p).stat().st_size == s)  # fmt: skip
    need = sum(fetch.values()) - done
    free = _free_bytes(target)
    if free is not None and need > free:
        raise DownloadError(
            f"{repo_id} needs {need / 2**30:.1f} GiB more but {target} has {free / 2**30:.1f} GiB free: free some "
            "space, or pass --download-dir on a larger disk (or set HF_HOME), then run again"
        )
    log(
        f"downloading {repo_id} ({len(fetch)} files, {sum(fetch.values()) / 2**30:.2f} GiB"
        + (f", {done / 2**30:.2f} GiB already here" if done else "")
        + f") from {endpoint()} into {target}"
    )
    try:
        folder = hub.snapshot_download(
            repo_id,
            revision=commit,
            allow_patterns=list(ALLOW_PATTERNS),
            ignore_patterns=list(IGNORE_PATTERNS),
            local_dir=None if download_dir is None else str(target),
        )
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one line
        raise explain(e, repo_id, target) from None
    if download_dir is None:
        _write_ref(repo_id, revision or "main", commit)
    folder = Path(folder)
    problems = missing_files(folder, fetch, tokenizer=tokenizer)
    if problems:
        raise DownloadError(
            f"the download of {repo_id} into {folder} is incomplete ({_summary(problems)}); "
            "run the same command again to fetch what is missing"
        )
    log(f"{repo_id} is complete in {folder}")
    return folder


def _write_ref(repo_id: str, revision: str, commit: str) -> None:
    """refs/<revision> -> commit in the HF cache (snapshot_download pinned to a commit writes refs/<commit> only)."""
    ref = cache_dir() / ("models--" + repo_id.replace("/", "--")) / "refs" / revision
    try:
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.with_name(f".{ref.name}.tmp")
        tmp.write_text(commit, encoding="utf-8")
        tmp.replace(ref)
    except OSError:
        pass  # a read-only cache: the folder was returned all the same


# ----------------------------------------------------------------------------- resolution


def local_dirs(name: str) -> list[Path]:
    """checkpoints/<name> under the current folder, then under the repository (once if they are the same)."""
    dirs: list[Path] = []
    for d in (Path.cwd() / "checkpoints" / name, REPO_ROOT / "checkpoints" / name):
        if not any(d.resolve() == u.resolve() for u in dirs):
            dirs.append(d)
    return dirs


def _entry(name: str) -> registry.ModelEntry | None:
    if name in registry.names():
        return registry.get(name)
    return registry.find_by_hf_id(name)


def ensure_checkpoint(
    name_or_path: str | os.PathLike,
    *,
    download_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = _say,
) -> str | Path:
    """The folder of a registry model with a hub id, downloaded when no complete copy is on this machine.

    A folder path, or a registry model built locally (tiny, bench), comes back unchanged: models.load resolves
    those. Raises DownloadError saying what to do.
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir() and ((path / "config.json").is_file() or _entry(text) is None):
        return name_or_path
    entry = _entry(text)
    if entry is None or entry.hf_id is None:
        return name_or_path
    needs_tok = entry.tokenizer == registry.TOKENIZER_CHECKPOINT
    into = Path(download_dir).expanduser().resolve() if download_dir is not None else None
    for folder in local_dirs(entry.name):  # your own copy: any revision, checked offline
        if (folder / "config.json").is_file() and folder.resolve() != into:
            problems = missing_files(folder, tokenizer=needs_tok)
            if not problems:
                return folder
            if download_dir is None and (folder / ".cache" / "huggingface").is_dir():  # an earlier --download-dir
                log(f"{folder} is incomplete ({_summary(problems)}); resuming its download")
                download_dir = folder
                into = folder.resolve()
                continue
            log(f"{folder} is incomplete ({_summary(problems)}); looking elsewhere")
    candidates = [Path(download_dir).expanduser()] if download_dir is not None else []
    if offline():
        snapshot = cached_snapshot(entry.hf_id)
        for folder in candidates + ([snapshot] if snapshot is not None else []):
            if not missing_files(folder, tokenizer=needs_tok):
                return folder
        where = f"checkpoints/{entry.name}"
        raise DownloadError(
            f"model {entry.name!r} ({entry.hf_id}) is not on this machine: no complete {where}/ and no complete "
            f"copy in the Hugging Face cache ({cache_dir()}), and HF_HUB_OFFLINE is set so nothing is downloaded. "
            f"Unset HF_HUB_OFFLINE to download it, or download it elsewhere with: hf download {entry.hf_id} "
            f"--local-dir {where}, or pass --random-weights to export it with seeded random weights"
        )
    try:
        commit, sizes = hub_sizes(entry.hf_id)
    except DownloadError as e:  # the hub is out of reach: a copy complete by its headers will do
        snapshot = cached_snapshot(entry.hf_id)
        for folder in candidates + ([snapshot] if snapshot is not None else []):
            if not missing_files(folder, tokenizer=needs_tok):
                log(f"the hub could not be asked ({e}); using {folder}, complete by its safetensors headers")
                return folder
        raise DownloadError(f"{e}; or pass --random-weights to export {entry.name} with seeded random weights") from None
    snapshot = cached_snapshot(entry.hf_id, commit)
    fetch = {p: s for p, s in sizes.items() if wanted(p)}
    for folder in candidates + ([snapshot] if snapshot is not None else []):
        if not missing_files(folder, fetch, tokenizer=needs_tok):
            return folder
    return download(entry.hf_id, download_dir=download_dir, revision=None, tokenizer=needs_tok, log=log)


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m models.download",
        description="Download a registry model's checkpoint (safetensors, configs, tokenizer; no pickled weights, "
        "no remote code) into the Hugging Face cache or --download-dir, unless a complete copy is already here; "
        "prints the folder. Honours HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE.",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("model", nargs="?", metavar="NAME", help=f"registry name ({', '.join(registry.names())})")
    which.add_argument("--repo", metavar="ID", help="a hub repo id, downloaded whatever is cached")
    p.add_argument("--download-dir", metavar="DIR", help="a plain folder for the files instead of the HF cache")
    p.add_argument("--revision", metavar="REV", help="branch, tag or commit of --repo (default main)")
    args = p.parse_args(argv)
    try:
        if args.repo:
            folder = download(args.repo, download_dir=args.download_dir, revision=args.revision)
        else:
            entry = _entry(args.model)
            if entry is None:
                raise DownloadError(f"unknown model {args.model!r}; known models: {', '.join(registry.names())}")
            if entry.hf_id is None:
                raise DownloadError(
                    f"{entry.name} is built locally, not downloaded: python -m models.build {entry.name} "
                    f"--out checkpoints/{entry.name}"
                )
            folder = ensure_checkpoint(args.model, download_dir=args.download_dir)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; finished files are kept and the next run fetches the rest", file=sys.stderr)
        return 130
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
