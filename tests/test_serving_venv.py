"""serving.venv: the serving venv is stamped with its pins, a venv made by hand is used as is, a foreign folder is
never deleted, and a failed build step says what failed (the venv itself is built by the live-server tests)."""

from __future__ import annotations

import os
import sys

import pytest

from serving import venv as serve_env
from tests.serving_helpers import ROOT


def test_serving_environment_is_stamped_with_its_pins(tmp_path):
    pins = tmp_path / "constraints-serve.txt"
    pins.write_text("numpy==1.26.4\n")
    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").touch()
    assert not serve_env.env_is_current(env, pins)
    (env / serve_env.STAMP_NAME).write_text(serve_env.expected_stamp(pins))
    assert serve_env.env_is_current(env, pins)
    pins.write_text("numpy==1.26.3\n")
    assert not serve_env.env_is_current(env, pins)  # edited pins rebuild the venv
    environ = serve_env.serving_environ(env, {"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/lib"})
    assert environ["PATH"].split(os.pathsep)[0] == str(env / "bin")
    assert environ["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)
    assert environ[serve_env.ENV_MARKER] == str(env)
    libdir = serve_env.libpython_dir()
    if libdir:  # pyenv/uv/conda Pythons: their libpython must win over the distro's one of the same version
        assert environ["LD_LIBRARY_PATH"].split(os.pathsep)[:2] == [libdir, "/opt/lib"]


def test_a_venv_made_by_hand_is_used_as_is(tmp_path):
    env = tmp_path / "my-serve-venv"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").touch()
    said = []
    assert serve_env.ensure_env(env, say=said.append) == env
    assert (env / "bin" / "python").exists()
    assert said == [f"serve env: using {env} as given (not built from constraints-serve.txt)"]


def test_a_foreign_folder_is_never_deleted(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(serve_env.ServeEnvError, match="neither a venv nor one made by serving.venv"):
        serve_env.ensure_env(tmp_path, say=lambda _: None)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_a_failed_build_step_says_what_failed_and_removes_the_half_made_venv(tmp_path):
    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    failing = [
        sys.executable,
        "-c",
        "import sys; print('ERROR: No matching distribution for numpy==9', file=sys.stderr); sys.exit(1)",
    ]
    with pytest.raises(
        serve_env.ServeEnvError, match=r"pip install failed \(ERROR: No matching distribution"
    ) as info:
        serve_env._run(failing, "pip install", env)
    assert "\n" not in str(info.value) and "HIRED_SERVE_VENV" in str(info.value)
    assert not env.exists()
