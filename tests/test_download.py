"""models.download against a fake hub on 127.0.0.1 (tests/fake_hub.py) serving the tiny checkpoint, sharded.

Each download runs in a child process: huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_TOKEN and HF_HUB_OFFLINE
when it is imported. `tiny-hub` is a registry entry the children add: tiny's config with hub id test/tiny.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

from models.download import explain, missing_files, safetensors_problem
from tests.fake_hub import FakeHub

REPO = "test/tiny"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
NOT_FETCHED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "modeling_evil.py")
REGISTER = (
    "import sys\n"
    "from dataclasses import replace\n"
    "from models import registry\n"
    "entries = registry._entries()\n"
    f"entries['tiny-hub'] = replace(entries['tiny'], name='tiny-hub', hf_id={REPO!r}, tokenizer='checkpoint')\n"
    f"registry._TABLE['tiny-hub'] = ({REPO!r}, registry.MISTRAL_TEMPLATE, 'checkpoint')\n"
)


def _shard(folder: Path) -> dict[str, bytes]:
    """The checkpoint's files with its weights split into two shards and an index, plus files never fetched."""
    from safetensors.numpy import load_file, save

    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != "model.safetensors"}
    tensors = load_file(str(folder / "model.safetensors"))
    names = sorted(tensors)
    half = {SHARDS[0]: names[: len(names) // 2], SHARDS[1]: names[len(names) // 2 :]}
    weight_map = {}
    for shard, keys in half.items():
        files[shard] = save({k: tensors[k] for k in keys})
        weight_map.update({k: shard for k in keys})
    total = sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    files["pytorch_model.bin"] = b"not a pickle, never fetched"
    files["pytorch_model.bin.index.json"] = b'{"weight_map": {}}'
    files["modeling_evil.py"] = b"raise SystemExit('remote code ran')\n"
    return files


@pytest.fixture(scope="module")
def hub(tiny_checkpoint):
    files = _shard(tiny_checkpoint)
    with FakeHub({REPO: files, "test/gated": dict(files)}, lifetime=600) as h:
        h.gated["test/gated"] = "secret"
        yield h


@pytest.fixture
def fresh(hub):
    """The hub with no faults and an empty request log."""
    hub.cut.clear()
    hub.fail.clear()
    with hub.lock:
        hub.log.clear()
    return hub


def _run(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def _error_line(proc: subprocess.CompletedProcess) -> str:
    """The last stderr line, which must be the one-line error."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines, f"no stderr (rc {proc.returncode}); stdout: {proc.stdout[-500:]}"
    assert lines[-1].startswith("error: "), proc.stderr[-2000:]
    return lines[-1]


def _snapshot(hf_home: Path, hub: FakeHub, repo: str = REPO) -> Path:
    return hf_home / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots" / hub.sha[repo]


def _same_files(folder: Path, hub: FakeHub, repo: str = REPO) -> None:
    for path, data in hub.repos[repo].items():
        if path in NOT_FETCHED:
            assert not (folder / path).exists(), f"{path} was downloaded"
        else:
            assert (folder / path).read_bytes() == data, f"{path} differs from the hub's"


# ----------------------------------------------------------------------------- no network


def test_truncated_shard_is_not_complete(tiny_checkpoint, tmp_path):
    files = _shard(tiny_checkpoint)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    assert missing_files(tmp_path) == []
    sizes = {name: len(data) for name, data in files.items()}
    assert missing_files(tmp_path, sizes) == []
    shard = tmp_path / SHARDS[1]
    shard.write_bytes(files[SHARDS[1]][:-100])
    assert "truncated" in safetensors_problem(shard)
    problems = missing_files(tmp_path, sizes)
    assert any(p.startswith(SHARDS[1]) for p in problems), problems
    shard.unlink()
    assert SHARDS[1] in missing_files(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    assert "tokenizer (tokenizer.json or tokenizer.model)" in missing_files(tmp_path)


def test_full_disk_is_one_line_naming_what_to_do():
    msg = str(explain(OSError(errno.ENOSPC, "No space left on device"), REPO, Path("/data/hf")))
    assert "\n" not in msg and "disk full" in msg and "/data/hf" in msg and "--download-dir" in msg


# ----------------------------------------------------------------------------- against the fake hub


@pytest.mark.slow  # about 90 s on a loaded 2-core box: most of it is the export
def test_registry_model_is_downloaded_then_exported(fresh, tmp_path):
    """`python -m export --model tiny-hub`: nothing on disk, so the checkpoint comes from the hub into the HF cache
    (no pickled weights, no remote code), is verified, and exports; the next run downloads nothing."""
    env = fresh.env(tmp_path / "hf")
    code = REGISTER + "from export.__main__ import main\nsys.exit(main(sys.argv[1:]))\n"
    out = tmp_path / "bundle"
    proc = _run(["-c", code, "--model", "tiny-hub", "--out", str(out)], env, tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "downloading test/tiny (" in proc.stderr and "test/tiny is complete in" in proc.stderr
    _same_files(_snapshot(tmp_path / "hf", fresh), fresh)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["name"] == "tiny"  # the checkpoint's build info travels with it
    fetched = {p for m, _, p, _, _ in fresh.log if m == "GET" and p}
    assert not fetched & set(NOT_FETCHED)

    with fresh.lock:
        fresh.log.clear()
    code = REGISTER + "from models.download import ensure_checkpoint\nprint(ensure_checkpoint('tiny-hub'))\n"
    again = _run(["-c", code], env, tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert Path(again.stdout.strip()) == _snapshot(tmp_path / "hf", fresh)
    assert not [p for m, _, p, _, _ in fresh.log if m == "GET" and p in SHARDS]  # listed, not fetched again


def test_registry_name_downloads_into_download_dir_once(fresh, tmp_path):
    """ensure_checkpoint('tiny-hub', download_dir=...): fetched once into the plain folder, which the next call
    (online: checked against the hub's sizes) takes as it is."""
    into = tmp_path / "checkpoints" / "mine"
    code = REGISTER + f"from models.download import ensure_checkpoint\nprint(ensure_checkpoint('tiny-hub', download_dir={str(into)!r}))\n"
    env = fresh.env(tmp_path / "hf")
    for run in range(2):
        proc = _run(["-c", code], env, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert Path(proc.stdout.strip()).resolve() == into.resolve()
        assert ("downloading test/tiny (" in proc.stderr) == (run == 0), proc.stderr[-2000:]
    _same_files(into, fresh)
    assert [len(fresh.gets(s)) for s in SHARDS] == [1, 1]
    assert not (tmp_path / "hf" / "hub" / "models--test--tiny" / "snapshots").exists()  # nothing in the cache


def test_dropped_connection_resumes_with_range(fresh, tmp_path):
    """The server drops the connection 25 MB into a 37 MB shard; huggingface_hub asks for the rest with a Range
    request (from the last whole chunk it wrote, 10 MiB chunks in 2.4) and the result verifies."""
    cut = 25_000_000
    assert len(fresh.repos[REPO][SHARDS[0]]) > cut
    fresh.cut[REPO] = {SHARDS[0]: cut}
    into = tmp_path / "ckpt"
    proc = _run(["-m", "models.download", "--repo", REPO, "--download-dir", str(into)], fresh.env(tmp_path / "hf"),
                tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip()) == into.resolve()
    ranges = fresh.gets(SHARDS[0])
    assert len(ranges) == 2 and ranges[0] is None and ranges[1].startswith("bytes="), ranges
    assert 0 < int(ranges[1][len("bytes=") : -1]) <= cut
    _same_files(into, fresh)
    assert missing_files(into, {p: len(d) for p, d in fresh.repos[REPO].items()}) == []


def test_interrupted_download_is_reported_then_completed(fresh, tmp_path):
    """A shard that fails leaves a snapshot that no one takes for complete; the next run fetches only the rest."""
    hf_home = tmp_path / "hf"
    env = fresh.env(hf_home)
    fresh.fail[REPO] = {SHARDS[1]: 1}
    first = _run(["-m", "models.download", "--repo", REPO], env, tmp_path)
    assert first.returncode == 2
    line = _error_line(first)
    assert "500" in line and "command again" in line, line
    snapshot = _snapshot(hf_home, fresh)
    assert (snapshot / SHARDS[0]).is_file() and not (snapshot / SHARDS[1]).exists()
    assert SHARDS[1] in missing_files(snapshot)

    check = REGISTER + (
        "from models.load import hf_cache_snapshot\n"
        f"assert hf_cache_snapshot({REPO!r}) is None, 'partial snapshot taken as complete'\n"
        "from models.download import ensure_checkpoint\n"
        "print(ensure_checkpoint('tiny-hub'))\n"
    )
    offline = _run(["-c", check], {**env, "HF_HUB_OFFLINE": "1"}, tmp_path)
    assert offline.returncode != 0
    assert "HF_HUB_OFFLINE" in offline.stderr.splitlines()[-1]

    resume = REGISTER + "from models.download import ensure_checkpoint\nprint(ensure_checkpoint('tiny-hub'))\n"
    second = _run(["-c", resume], env, tmp_path)  # online: the partial snapshot is completed, not used as it is
    assert second.returncode == 0, second.stderr[-3000:]
    assert Path(second.stdout.strip()) == snapshot
    assert len(fresh.gets(SHARDS[0])) == 1  # kept from the first run
    assert len(fresh.gets(SHARDS[1])) == 2
    _same_files(snapshot, fresh)


def test_offline_with_nothing_cached_says_so(fresh, tmp_path):
    env = fresh.env(tmp_path / "hf", HF_HUB_OFFLINE="1")
    code = REGISTER + "from export.__main__ import main\nsys.exit(main(sys.argv[1:]))\n"
    proc = _run(["-c", code, "--model", "tiny-hub", "--out", str(tmp_path / "b")], env, tmp_path)
    assert proc.returncode == 2
    line = _error_line(proc)
    assert "not on this machine" in line and "HF_HUB_OFFLINE" in line and "--random-weights" in line
    assert fresh.log == [] and not (tmp_path / "b").exists()


@pytest.mark.parametrize("token", [None, "wrong"])
def test_gated_repo_names_the_token(fresh, tmp_path, token):
    extra = {"HF_TOKEN": token} if token else {}
    proc = _run(["-m", "models.download", "--repo", "test/gated"], fresh.env(tmp_path / "hf", **extra), tmp_path)
    assert proc.returncode == 2
    line = _error_line(proc)
    assert "gated or private" in line and "HF_TOKEN" in line and "test/gated" in line, line
    assert ("401" if token is None else "403") in line


def test_gated_repo_with_its_token_downloads(fresh, tmp_path):
    env = fresh.env(tmp_path / "hf", HF_TOKEN="secret")
    proc = _run(["-m", "models.download", "--repo", "test/gated"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(auth == "Bearer secret" for *_, auth in fresh.log)
    _same_files(Path(proc.stdout.strip()), fresh, "test/gated")


@pytest.mark.parametrize("token", [None, "any"])
def test_missing_repo_is_one_line(fresh, tmp_path, token):
    extra = {"HF_TOKEN": token} if token else {}
    proc = _run(["-m", "models.download", "--repo", "test/nothing"], fresh.env(tmp_path / "hf", **extra), tmp_path)
    assert proc.returncode == 2
    line = _error_line(proc)
    assert "test/nothing was not found" in line and "HF_TOKEN" in line, line
    assert ("(401) or is private (no HF_TOKEN is set)" in line) if token is None else ("(404):" in line), line


def test_full_disk_during_the_transfer_is_one_line(fresh, tmp_path):
    code = (
        "import errno, sys\n"
        "import huggingface_hub.file_download as fd\n"
        "def full(*args, **kwargs):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "fd.http_get = full\n"
        "from models.download import main\n"
        f"sys.exit(main(['--repo', {REPO!r}]))\n"
    )
    proc = _run(["-c", code], fresh.env(tmp_path / "hf"), tmp_path)
    assert proc.returncode == 2
    line = _error_line(proc)
    assert "disk full while downloading test/tiny" in line and "--download-dir" in line, line


def test_unreachable_hub_is_one_line(fresh, tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = fresh.env(tmp_path / "hf", HF_ENDPOINT=f"http://127.0.0.1:{port}")
    proc = _run(["-m", "models.download", "--repo", REPO], env, tmp_path)
    assert proc.returncode == 2
    line = _error_line(proc)
    assert "cannot reach" in line and str(port) in line, line


def test_too_little_disk_is_refused_before_downloading(fresh, tmp_path):
    code = (
        "import shutil, sys\n"
        "from collections import namedtuple\n"
        "shutil.disk_usage = lambda p: namedtuple('u', 'total used free')(10**6, 10**6, 1000)\n"
        "from models.download import main\n"
        f"sys.exit(main(['--repo', {REPO!r}]))\n"
    )
    proc = _run(["-c", code], fresh.env(tmp_path / "hf"), tmp_path)
    assert proc.returncode == 2
    line = _error_line(proc)
    assert "GiB free" in line and "--download-dir" in line, line
    assert not [p for m, _, p, _, _ in fresh.log if m == "GET" and p in SHARDS]


def test_random_weights_never_ask_the_hub_and_a_bad_out_is_refused_before_downloading(fresh, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    code = REGISTER + "from export.__main__ import main\nsys.exit(main(sys.argv[1:]))\n"
    env = fresh.env(tmp_path / "hf")
    for extra in (["--random-weights"], []):
        proc = _run(["-c", code, "--model", "tiny-hub", "--out", str(taken), *extra], env, tmp_path)
        assert proc.returncode == 2
        assert "neither empty nor a bundle" in _error_line(proc)
    assert fresh.log == []  # neither run asked the hub anything
    assert (taken / "notes.txt").read_text() == "mine"


def test_partial_download_in_checkpoints_folder_is_resumed_there(fresh, tmp_path):
    """An interrupted `--download-dir checkpoints/<name>` is neither used nor abandoned: the next run, without
    the flag, finishes it in place."""
    env = fresh.env(tmp_path / "hf")
    fresh.fail[REPO] = {SHARDS[1]: 1}
    ensure = REGISTER + "from models.download import main\nsys.exit(main(sys.argv[1:]))\n"
    first = _run(["-c", ensure, "tiny-hub", "--download-dir", "checkpoints/tiny-hub"], env, tmp_path)
    assert first.returncode == 2 and "command again" in _error_line(first)
    folder = tmp_path / "checkpoints" / "tiny-hub"
    assert (folder / "config.json").is_file() and SHARDS[1] in missing_files(folder)
    second = _run(["-c", ensure, "tiny-hub"], env, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "is incomplete (" in second.stderr and "resuming its download" in second.stderr
    assert Path(second.stdout.strip()).resolve() == folder.resolve()
    assert [len(fresh.gets(s)) for s in SHARDS] == [1, 2]
    _same_files(folder, fresh)
