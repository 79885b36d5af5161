"""Session fixtures shared by every test file: the tiny checkpoint and its exported bundle, built once.

    tiny_checkpoint: Path of a `python -m models.build tiny` folder (seeded random weights, offline tokenizer).
    tiny_bundle:     Path of that checkpoint exported with `export.export_model` (fp32, opset 23, unverified;
                     tests/test_export.py verifies it).
    pipe:            a runtime Pipeline on tiny_bundle, one per test module (no request may be left open).

Helpers the tests share (images, memory and descriptor counts, a request pool) live in tests/helpers.py.

Both live in pytest's session temp folder. Set HIRED_TINY_BUNDLE to an existing bundle folder to reuse it
(it must come from the tiny checkpoint with seed 0, e.g. `make export MODEL=tiny` -> artifacts/tiny).
`make test-fast` sets HIRED_TEST_CACHE=.test-cache: the checkpoint and bundle are then built once per version
of the code that makes them (a hash of models/, export/ and runtime/ sources) and reused by later runs;
`make test` (CI) always builds them fresh.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHED_FROM = ("models", "export", "runtime", "hired")  # the code that builds and checks the tiny fixtures


def _cache_folder() -> Path | None:
    """HIRED_TEST_CACHE/<hash of the sources that build the fixtures>, or None when no cache is asked for."""
    root = os.environ.get("HIRED_TEST_CACHE")
    if not root:
        return None
    digest = hashlib.sha256()
    for pkg in CACHED_FROM:
        for path in sorted((ROOT / pkg).rglob("*")):
            if path.suffix in (".py", ".json") and path.is_file():
                digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return Path(root).resolve() / digest.hexdigest()[:16]


def _cached(name: str, build) -> Path:
    """`build(folder)` into the cache once (atomically: a killed build leaves no half folder), else reuse."""
    folder = _cache_folder() / name
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
        build(tmp / name)
        try:
            os.replace(tmp / name, folder)
        except OSError:  # another run got there first
            pass
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _build_checkpoint(out: Path) -> Path:
    from models.build import build_checkpoint

    return build_checkpoint("tiny", out, seed=0, log=None)


# `make test-fast` (pytest -m "not slow") is the inner loop: the algorithm, the manifest and bundle checks, images,
# preprocessing, prompts, options, the runtime on the tiny bundle (with its parity against transformers), the
# decoder's cache, the wire protocol and the code's structure. Besides the tests marked slow one by one (soak,
# generated fuzz groups, export kills, live servers), these whole modules are slow: each of their tests exports a
# bundle, builds a model, starts a server or runs the tiny model tens to hundreds of times.
SLOW_MODULES = {
    "test_bench", "test_bundle_security", "test_concurrency", "test_download", "test_eval", "test_export",
    "test_export_interrupt", "test_fuzz", "test_governor", "test_llava15", "test_llm_peer", "test_models",
    "test_multi_image", "test_openai", "test_quantize", "test_reference", "test_serving_server",
    "test_serving_triton_repo", "test_soak",
}  # fmt: skip


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rpartition(".")[2] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    if _cache_folder() is not None:
        return _cached("checkpoint-tiny", _build_checkpoint)
    return _build_checkpoint(tmp_path_factory.mktemp("checkpoints") / "tiny")


@pytest.fixture(scope="session")
def tiny_bundle(request, tmp_path_factory) -> Path:
    reuse = os.environ.get("HIRED_TINY_BUNDLE")
    if reuse:
        return Path(reuse)
    checkpoint = request.getfixturevalue("tiny_checkpoint")  # only when no bundle is given to reuse
    from export.pipeline import export_model

    def build(out: Path) -> Path:
        return export_model(checkpoint, out, force=True, verify=False, log=lambda _msg: None)

    if _cache_folder() is not None:
        return _cached("bundle-tiny", build)
    return build(tmp_path_factory.mktemp("artifacts") / "tiny")


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    """One Pipeline on the tiny bundle per test module. At the end no request may still be open (a request a
    test forgot, or one the runtime never released), and close() must return."""
    from runtime.pipeline import Pipeline

    p = Pipeline.load(tiny_bundle)
    yield p
    open_requests = p.active_requests
    p.close(timeout=60)
    assert open_requests == 0, f"{open_requests} request(s) were never released by the end of the module"
