"""The serving environment of `python -m serving`: a numpy<2 venv with PyTriton, created once, then re-exec'd.

    python -m serving --artifacts artifacts/tiny     # from the main .venv: prepares .venv-serve, execs into it

Why: PyTriton (nvidia-pytriton, which bundles tritonserver) requires numpy<2 (a numpy 2 stub crashes on string
tensors), while the project's main venv pins numpy 2. So the server runs in its own venv, `.venv-serve` beside
the main one, pip-installed from the exact pins of `constraints-serve.txt` (no torch), with the checkout's own
packages (hired/, runtime/, serving/) on PYTHONPATH. The venv carries a stamp (hash of the pins + Python version);
a changed constraints file or Python rebuilds it. A file lock keeps two servers from building it at once.

pyenv, uv or conda Pythons need their LIBDIR first on LD_LIBRARY_PATH, or Triton's Python stub loads the
distro's libpython of the same version instead of theirs and fails; `serving_environ` sets it.

Only the standard library here: this runs before the serving environment exists.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

ENV_MARKER = "HIRED_SERVE_ENV"  # set in the re-exec'd server: "this interpreter is the serving environment"
ENV_DIR_VAR = "HIRED_SERVE_VENV"  # overrides where the serving venv lives
REPO_ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = REPO_ROOT / "constraints-serve.txt"
STAMP_NAME = ".hired-serve-stamp"  # written last: the venv is complete and built from these pins
OWNER_NAME = ".hired-serve-owner"  # written first: this folder is ours to delete
EXIT_ENV_FAILED = 3  # `python -m serving` exit code when the serving environment cannot be made


class ServeEnvError(RuntimeError):
    """The serving environment could not be created (no network, no venv module, a failed pip install)."""


def default_env_dir() -> Path:
    """Where the serving venv lives: $HIRED_SERVE_VENV, else `.venv-serve` beside the running venv (or the repo)."""
    if os.environ.get(ENV_DIR_VAR):
        return Path(os.environ[ENV_DIR_VAR]).resolve()
    in_venv = sys.prefix != sys.base_prefix
    base = Path(sys.prefix).resolve().parent if in_venv else REPO_ROOT
    return base / ".venv-serve"


def env_python(env_dir: Path) -> Path:
    return env_dir / "bin" / "python"


def serving_ready() -> bool:
    """True when this interpreter can serve: numpy < 2 and pytriton importable (without importing pytriton)."""
    try:
        import numpy
    except ImportError:
        return False
    return int(numpy.__version__.split(".")[0]) < 2 and importlib.util.find_spec("pytriton") is not None


def expected_stamp(constraints: Path = CONSTRAINTS) -> str:
    """One line naming what the venv was built from: the pins' sha256 and the base interpreter's version."""
    digest = hashlib.sha256(constraints.read_bytes()).hexdigest()
    return f"constraints-sha256={digest} python={sys.version_info[0]}.{sys.version_info[1]}.{sys.version_info[2]}"


def env_is_current(env_dir: Path, constraints: Path = CONSTRAINTS) -> bool:
    stamp = env_dir / STAMP_NAME
    try:
        return env_python(env_dir).exists() and stamp.read_text().strip() == expected_stamp(constraints)
    except OSError:
        return False


def ensure_env(
    env_dir: Path | None = None,
    *,
    constraints: Path = CONSTRAINTS,
    say: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True),
) -> Path:
    """Create (once) and return the serving venv; raises ServeEnvError saying what failed and what to do."""
    env_dir = (env_dir or default_env_dir()).resolve()
    if env_is_current(env_dir, constraints):
        return env_dir
    if not constraints.is_file():
        raise ServeEnvError(
            f"{constraints} is missing; it pins the serving environment (restore it from git)"
        )
    env_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = env_dir.parent / (env_dir.name + ".lock")
    with open(lock_path, "w") as lock:
        if _locked(lock):
            say(f"serve env: another process is building it; waiting for {lock_path}")
        fcntl.flock(lock, fcntl.LOCK_EX)
        if env_is_current(env_dir, constraints):  # another process built it while we waited
            return env_dir
        if env_dir.exists() and not _ours(env_dir):
            if env_python(env_dir).exists():  # a venv prepared by hand ($HIRED_SERVE_VENV): trusted as is
                say(f"serve env: using {env_dir} as given (not built from {constraints.name})")
                return env_dir
            raise ServeEnvError(
                f"{env_dir} exists but is neither a venv nor one made by serving.venv; move it away or set "
                f"{ENV_DIR_VAR} to another folder"
            )
        _build(env_dir, constraints, say)
    return env_dir


def _ours(env_dir: Path) -> bool:
    """Made (or being made) by _build: safe to delete and rebuild."""
    return (env_dir / OWNER_NAME).exists() or (env_dir / STAMP_NAME).exists()


def _locked(lock) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(lock, fcntl.LOCK_UN)
    return False


def _build(env_dir: Path, constraints: Path, say: Callable[[str], None]) -> None:
    t0 = time.monotonic()
    if env_dir.exists():
        say(f"serve env: {env_dir} is stale or incomplete (pins or Python changed); rebuilding it")
        shutil.rmtree(env_dir)
    base_python = getattr(sys, "_base_executable", None) or sys.executable
    say(f"serve env: creating {env_dir} with {base_python} (one time, about a minute)")
    env_dir.mkdir(parents=True)
    (env_dir / OWNER_NAME).write_text("made by serving.venv; deleted and rebuilt when stale\n")
    _run([base_python, "-m", "venv", str(env_dir)], "python -m venv", env_dir)
    pins = sum(
        1 for line in constraints.read_text().splitlines() if "==" in line and not line.startswith("#")
    )
    say(
        f"serve env: pip-installing {pins} pinned wheels from {constraints.name} (numpy<2, PyTriton, onnxruntime)"
    )
    pip = [str(env_python(env_dir)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--only-binary=:all:", "-r", str(constraints)]  # fmt: skip
    _run(pip, "pip install", env_dir)
    (env_dir / STAMP_NAME).write_text(expected_stamp(constraints) + "\n")
    say(f"serve env: ready in {time.monotonic() - t0:.0f} s")


def _run(cmd: list[str], what: str, env_dir: Path) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_without_venv(os.environ))
    except OSError as e:
        shutil.rmtree(env_dir, ignore_errors=True)
        raise ServeEnvError(
            f"serve env: {what} could not start ({e}); check the Python installation"
        ) from None
    if proc.returncode != 0:
        shutil.rmtree(env_dir, ignore_errors=True)
        lines = [
            ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip() and "is ignored" not in ln
        ]
        tail = " | ".join(lines[-3:]) or f"exit code {proc.returncode}"
        raise ServeEnvError(
            f"serve env: {what} failed ({tail}); check network access to the package index, or build "
            f"{env_dir} by hand from {CONSTRAINTS.name} and set {ENV_DIR_VAR}"
        )


def _without_venv(environ) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")}


def libpython_dir() -> str | None:
    """The interpreter's LIBDIR when it holds a shared libpython (pyenv/uv/conda builds), else None."""
    libdir = sysconfig.get_config_var("LIBDIR")
    ldlib = sysconfig.get_config_var("LDLIBRARY")
    if not (sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir and ldlib):
        return None
    return libdir if (Path(libdir) / ldlib).exists() else None


def serving_environ(env_dir: Path, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the re-exec'd server: repo on PYTHONPATH, venv bin first on PATH, LIBDIR on LD path."""
    env = dict(os.environ if environ is None else environ)
    env.pop("PYTHONHOME", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH", "")])])
    env["PATH"] = os.pathsep.join([str(env_dir / "bin"), *filter(None, [env.get("PATH", "")])])
    env["VIRTUAL_ENV"] = str(env_dir)
    libdir = libpython_dir()
    if libdir:
        parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *parts])
    env[ENV_MARKER] = str(env_dir)
    return env


def exec_into(env_dir: Path, module: str, argv: list[str]) -> None:
    """Replace this process with `<env>/bin/python -m module argv...` (same PID: signals reach the server)."""
    python = str(env_python(env_dir))
    os.execve(python, [python, "-m", module, *argv], serving_environ(env_dir))


__all__ = [
    "ENV_MARKER",
    "EXIT_ENV_FAILED",
    "ServeEnvError",
    "default_env_dir",
    "ensure_env",
    "env_is_current",
    "exec_into",
    "serving_environ",
    "serving_ready",
]
