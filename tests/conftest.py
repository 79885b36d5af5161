"""Session fixtures shared by every test file: the tiny checkpoint and its exported bundle, built once.

    tiny_checkpoint: Path of a `python -m models.build tiny` folder (seeded random weights, offline tokenizer).
    tiny_bundle:     Path of that checkpoint exported with `export.export_model` (fp32, opset 23, unverified;
                     tests/test_export.py verifies it).
    pipe:            a runtime Pipeline on tiny_bundle, one per test module (no request may be left open).

Helpers the tests share (images, memory and descriptor counts, a request pool) live in tests/helpers.py.

Both live in pytest's session temp folder. Set HIRED_TINY_BUNDLE to an existing bundle folder to reuse it
(it must come from the tiny checkpoint with seed 0, e.g. `make export MODEL=tiny` -> artifacts/tiny).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from models.build import build_checkpoint

    return build_checkpoint("tiny", tmp_path_factory.mktemp("checkpoints") / "tiny", seed=0, log=None)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    reuse = os.environ.get("HIRED_TINY_BUNDLE")
    if reuse:
        return Path(reuse)
    from export.pipeline import export_model

    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    return export_model(tiny_checkpoint, out, force=True, verify=False, log=lambda _msg: None)


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
