"""`python -m serving` (PyTriton) on loopback with the tiny bundle: its flags are checked before anything starts;
served, RemotePipeline and plain tritonclient get the local Pipeline's tokens, typed errors cross the wire (an empty
image, no prompt, absurd options included), metrics count, and SIGTERM drains: requests in flight are answered,
new ones refused, and nothing is left behind.

The live tests are `slow`. The first run creates the serving venv `.venv-serve` (numpy<2 + PyTriton, about a
minute) and later runs reuse it; when it cannot be created (no package index), they skip naming what failed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import BudgetError, GenerationError, HiredError, ImageError, PromptError, RemoteError
from runtime.pipeline import GenerationResult
from serving import RemotePipeline
from serving.protocol import encode_options, parse_error
from serving.triton_server import _remove_left_folders, _stub_temp_folders, main, parse_args
from tests.serving_helpers import comparable, picture, png_bytes, start_server

PROMPT = "What is in this picture?"
NEW = 8
slow = pytest.mark.slow


# ---- flags, checked before anything starts ------------------------------------------------------------------
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.5"])
def test_loopback_hosts_need_no_flag(host):
    assert parse_args(["--artifacts", "x", "--host", host]).host == host


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "robot-server"])
def test_other_hosts_need_allow_remote(host, capsys):
    with pytest.raises(HiredError, match="--allow-remote"):
        parse_args(["--artifacts", "x", "--host", host])
    assert parse_args(["--artifacts", "x", "--host", host, "--allow-remote"]).allow_remote
    assert main(["--artifacts", "x", "--host", host]) == 2  # refused before any environment work
    assert "add --allow-remote" in capsys.readouterr().err


def test_clashing_ports_are_refused():
    with pytest.raises(HiredError, match="ports must differ"):
        parse_args(["--artifacts", "x", "--http-port", "9000", "--grpc-port", "9000"])


@pytest.mark.parametrize(("value", "ok"), [("0", True), ("2.5", True), ("-1", False), ("1e9", False)])
def test_drain_timeout_is_checked(value, ok, capsys):
    argv = ["--artifacts", "x", "--drain-timeout", value]
    if ok:
        assert parse_args(argv).drain_timeout == float(value)
        assert parse_args(["--artifacts", "x"]).drain_timeout == 30.0
    else:
        assert main(argv) == 2
        assert f"--drain-timeout must be in 0..3600 seconds, got {float(value)}" in capsys.readouterr().err


def test_a_taken_port_is_refused_before_anything_starts(tiny_bundle, capsys):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        t = time.monotonic()
        assert main(["--artifacts", str(tiny_bundle), "--grpc-port", str(taken)]) == 2
    assert time.monotonic() - t < 5
    assert f"--grpc-port {taken}: cannot listen on 127.0.0.1:{taken}" in capsys.readouterr().err


def test_the_stubs_temp_folders_are_found_and_only_ours_are_removed(tmp_path):
    copy = (
        tmp_path / "folderAbC123"
    )  # what Triton's Python backend makes: a model copy + an empty python_env_*
    (copy / "1").mkdir(parents=True)
    (copy / "config.pbtxt").write_text('name: "hired"\nbackend: "python"\n')
    env = tmp_path / "python_env_XyZ789"
    env.mkdir()
    other = tmp_path / "folderOther1"  # another model's copy: never ours to delete
    other.mkdir()
    (other / "config.pbtxt").write_text('name: "detector"\n')
    stub = f'exec -a /opt/tritonserver/backends/python/triton_python_backend_stub {sys.executable} -c "import time; time.sleep(60)" {copy}/1/model.py'
    proc = subprocess.Popen(["bash", "-c", stub])  # a child of this process, as the stub is of the server's
    try:
        deadline = time.monotonic() + 10
        while not (found := _stub_temp_folders()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(found) == sorted([copy, env])
    finally:
        proc.kill()
        proc.wait()
    said = []
    _remove_left_folders([*found, other], said.append)
    assert not copy.exists() and not env.exists() and other.exists()
    assert said == [f"removed 2 temp folder(s) the stopped tritonserver left: {copy}, {env}"]


# ---- a real server ------------------------------------------------------------------------------------------
def _shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    shm_before = _shm()
    proc = start_server(tiny_bundle, tmp_path_factory.mktemp("serve") / "serve.log", "--max-batch", "8")
    try:
        yield {"proc": proc.proc, "http": proc.http, "grpc": proc.grpc, "metrics": proc.metrics, "log": proc.log,
               "shm_before": shm_before}  # fmt: skip
    finally:
        proc.stop(30)


@slow
def test_remote_pipeline_gives_the_local_tokens_over_grpc_and_http(server, pipe, tmp_path):
    rgb = picture(300, 500)
    path = tmp_path / "frame.png"
    path.write_bytes(png_bytes(rgb))
    cases = [
        (rgb, {}),
        (png_bytes(rgb), {"budget": 0.3, "alpha": 0.25}),  # encoded bytes: decoded by the server
        (str(path), {"budget": 0.1 + 0.2, "distribution": "official", "newlines": "rows"}),
        (rgb[:, :, ::-1].copy(), {"color": "bgr", "budget": 1.0}),  # a camera frame
        (rgb, {"max_new_tokens": 5, "min_new_tokens": 5, "seed": 3, "temperature": 0.7}),
    ]
    wants = [pipe.generate(image, PROMPT, **{"max_new_tokens": NEW, **options}) for image, options in cases]
    for address in (f"127.0.0.1:{server['grpc']}", f"http://127.0.0.1:{server['http']}"):
        with RemotePipeline(address) as remote:
            for (image, options), want in zip(cases, wants):
                got = remote.generate(image, PROMPT, **{"max_new_tokens": NEW, **options})
                assert type(got) is GenerationResult
                assert comparable(got) == comparable(want), (address, options)
                n = options.get("max_new_tokens", NEW)
                assert len(got.token_ids) == n or got.token_ids[-1] == pipe.manifest.tokens.eos


def _plain_inputs(tc, http: bool, tensors: dict[str, tuple[np.ndarray, str]]):
    inputs = []
    for name, (array, dtype) in tensors.items():
        tensor = tc.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array, **({"binary_data": True} if http else {}))
        inputs.append(tensor)
    return inputs


def _plain_request(tc, rgb: np.ndarray, http: bool):
    return _plain_inputs(tc, http, {
        "image": (rgb[None], "UINT8"),
        "prompt": (np.array([[PROMPT.encode()]], dtype=object), "BYTES"),
        "budget": (np.array([[0.3]]), "FP64"),
        "max_new_tokens": (np.array([[NEW]], np.int32), "INT32"),
    })  # fmt: skip


def _plain_clients(server):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    return [
        (httpclient, f"127.0.0.1:{server['http']}", True),
        (grpcclient, f"127.0.0.1:{server['grpc']}", False),
    ]


@slow
def test_plain_tritonclient_over_http_and_grpc_gets_plain_tensors(server, pipe):
    rgb = picture(240, 320, seed=3)
    want = pipe.generate(rgb, PROMPT, budget=0.3, max_new_tokens=NEW)
    for tc, url, http in _plain_clients(server):
        client = tc.InferenceServerClient(url)
        try:
            res = client.infer("hired", _plain_request(tc, rgb, http))
        finally:
            client.close()
        assert res.as_numpy("error")[0, 0] == b""
        assert res.as_numpy("token_ids")[0].tolist() == list(want.token_ids)
        assert res.as_numpy("text")[0, 0].decode() == want.text
        assert res.as_numpy("visual_tokens_kept")[0, 0] == want.visual_tokens["kept"]
        assert res.as_numpy("visual_tokens_before")[0, 0] == want.visual_tokens["before"]
        assert json.loads(res.as_numpy("result_json")[0, 0])["budget"] == dict(want.budget)


@slow
def test_sixteen_concurrent_clients_all_get_their_own_answer(server, pipe):
    frames = [picture(200 + 40 * (i % 2), 300, seed=i) for i in range(4)]  # two sizes: some requests batch
    want = [pipe.generate(f, PROMPT, max_new_tokens=NEW).token_ids for f in frames]
    remote_grpc = RemotePipeline(f"127.0.0.1:{server['grpc']}")
    remote_http = RemotePipeline(f"http://127.0.0.1:{server['http']}")

    def ask(i: int):
        remote = remote_grpc if i % 2 else remote_http
        return remote.generate(frames[i % 4], PROMPT, max_new_tokens=NEW).token_ids

    try:
        with ThreadPoolExecutor(16) as ex:
            got = list(ex.map(ask, range(16)))
    finally:
        remote_grpc.close()
        remote_http.close()
    assert got == [want[i % 4] for i in range(16)]


def _metric(metrics_port: int, name: str) -> int | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    m = re.search(rf'^{name}\{{model="hired",version="1"\}} (\d+)', text, re.M)
    return int(m.group(1)) if m else None


def _success_count(server) -> int:
    count = _metric(server["metrics"], "nv_inference_request_success")
    assert count is not None, "no nv_inference_request_success line for model hired in /metrics"
    return count


@slow
def test_metrics_count_every_request(server):
    before = _success_count(server)
    with RemotePipeline(f"127.0.0.1:{server['grpc']}") as remote:
        for i in range(3):
            remote.generate(picture(64, 64, seed=i), PROMPT, max_new_tokens=2)
    deadline = time.monotonic() + 5  # the counter is bumped as the response leaves; allow a moment
    while (counted := _success_count(server) - before) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert counted == 3


@slow
def test_bad_input_raises_the_local_typed_error_with_the_same_message(server, pipe):
    cases = [
        (b"not an image at all", {}),  # decoded (and refused) by the server
        (picture(32, 32), {"budget": 2.0}),
        (picture(32, 32), {"alpha": float("nan")}),
        (picture(32, 32), {"distribution": "uniform"}),
        (picture(32, 32), {"max_new_tokens": 0}),
        (picture(32, 32), {"temperature": -1.0}),
        (picture(32, 32), {"max_new_tokens": 10**4400}),  # past Python's str <-> int limit
        (picture(32, 32), {"alpha": 7 * 10**5000}),
    ]
    with RemotePipeline(f"http://127.0.0.1:{server['http']}") as remote:
        for image, options in cases:
            with pytest.raises(HiredError) as local:
                pipe.generate(image, PROMPT, **options)
            with pytest.raises(HiredError) as served:
                remote.generate(image, PROMPT, **options)
            assert type(served.value) is type(local.value), options
            assert str(served.value) == str(local.value)
        for prompt in ("a <image> here <image>", "   ", "broken \ud800 text"):
            with pytest.raises(PromptError) as served:
                remote.generate(picture(32, 32), prompt)
            with pytest.raises(PromptError) as local:
                pipe.generate(picture(32, 32), prompt)
            assert str(served.value) == str(local.value)


@slow
def test_plain_clients_get_typed_one_line_errors_for_malformed_requests(server, pipe):
    """Empty images, no prompt, options nested thousands deep or with thousands of digits, sent as raw tensors."""
    prompt = (np.array([[b"Describe it."]], dtype=object), "BYTES")
    image = (picture(16, 16)[None], "UINT8")
    cases = [
        ({"image": (np.zeros((1, 0, 13, 3), np.uint8), "UINT8"), "prompt": prompt}, ImageError),
        ({"image": (np.zeros((1, 9, 0, 3), np.uint8), "UINT8"), "prompt": prompt}, ImageError),
        ({"image": image}, PromptError),
        ({"image_bytes": (np.array([[png_bytes(picture(8, 8))]], dtype=object), "BYTES")}, PromptError),
        ({"image": image, "prompt": prompt, "options": (np.array([[b'{"alpha": ' + b"[" * 40_000 + b"]" * 40_000
          + b"}"]], dtype=object), "BYTES")}, BudgetError),  # fmt: skip
        ({"image": image, "prompt": prompt,
          "options": (np.array([[encode_options({"seed": 5 * 10**6000})]], dtype=object), "BYTES")}, GenerationError),
    ]  # fmt: skip
    with pytest.raises(ImageError) as local_empty:
        pipe.generate(np.zeros((0, 13, 3), np.uint8), "Describe it.")
    for tc, url, http in _plain_clients(server):
        client = tc.InferenceServerClient(url)
        try:
            for tensors, error in cases:
                res = client.infer("hired", _plain_inputs(tc, http, tensors))
                text = res.as_numpy("error")[0, 0].decode()
                assert "\n" not in text and type(parse_error(text)) is error, (http, list(tensors), text)
            first = (
                client.infer("hired", _plain_inputs(tc, http, cases[0][0])).as_numpy("error")[0, 0].decode()
            )
            assert first == f"ImageError: {local_empty.value}"
        finally:
            client.close()


def _tree(pid: int) -> list:
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _model_copies(tree) -> set[Path]:
    """The folders tritonserver copied the model into (in the system temp dir), from its Python stubs' arguments."""
    return {Path(a).parents[1] for p in tree for a in p.cmdline() if a.endswith("/1/model.py")}


def _stub_temp_dirs(copies: set[Path]) -> set[Path]:
    """The `python_env_*` folders the Python backend made beside each model copy, at the same moment."""
    found = set()
    for copy in copies:
        made = copy.stat().st_ctime
        for candidate in copy.parent.glob("python_env_*"):
            try:
                if abs(candidate.stat().st_ctime - made) < 2:
                    found.add(candidate)
            except FileNotFoundError:
                pass
    return found


def _two_requests_inside(server, jobs: dict) -> tuple[list[threading.Thread], dict[str, object]]:
    """Send jobs "running" (gRPC) and "queued" (HTTP) and return once Triton holds both (one waits in its queue)."""
    got: dict[str, object] = {}

    def ask(name: str, address: str) -> None:
        image, options = jobs[name]
        try:
            with RemotePipeline(address, timeout_s=120) as remote:
                got[name] = remote.generate(image, PROMPT, **options)
        except Exception as e:  # reported by the callers' assertions
            got[name] = e

    threads = [threading.Thread(target=ask, args=("running", f"127.0.0.1:{server.grpc}"))]
    threads[0].start()
    time.sleep(0.5)
    threads.append(threading.Thread(target=ask, args=("queued", f"http://127.0.0.1:{server.http}")))
    threads[1].start()
    deadline = time.monotonic() + 60
    while not _metric(server.metrics, "nv_inference_pending_request_count"):
        assert time.monotonic() < deadline and not got, f"no request was ever queued: {got}"
        time.sleep(0.02)
    return threads, got


def _jobs() -> dict:
    return {
        # long enough to still run when the second request arrives 0.5 s later, on a fast decoder too
        "running": (picture(500, 700, seed=5), {"max_new_tokens": 2000, "min_new_tokens": 2000}),
        "queued": (picture(200, 260, seed=6), {"max_new_tokens": 6}),  # another shape: not batched with it
    }


@slow
def test_sigterm_answers_the_requests_in_flight_then_exits_clean(tiny_bundle, pipe, tmp_path):
    """A request running and one queued behind it when SIGTERM arrives both get their real answer; a request sent
    after it is refused at once; the server exits 0 and leaves no temp folder of its own."""
    server = start_server(tiny_bundle, tmp_path / "serve.log", "--drain-timeout", "120")
    try:
        copies = _model_copies(_tree(server.proc.pid))
        stub_dirs = _stub_temp_dirs(copies)
        assert copies, "no Python stub with a model copy under the server"
        jobs = _jobs()
        want = {name: pipe.generate(image, PROMPT, **options) for name, (image, options) in jobs.items()}
        threads, got = _two_requests_inside(server, jobs)
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while "draining:" not in server.log_text():
            assert time.monotonic() < deadline, server.log_text()[-2000:]
            time.sleep(0.05)
        t = time.monotonic()
        with pytest.raises(RemoteError, match="refused|not ready|cannot reach"):
            RemotePipeline(f"127.0.0.1:{server.grpc}", check=False, timeout_s=30).generate(
                picture(40, 40), PROMPT, max_new_tokens=2
            )
        assert time.monotonic() - t < 10  # refused at once, not queued
        for th in threads:
            th.join(120)
        for name in jobs:
            assert isinstance(got[name], GenerationResult), (name, got[name])
            assert comparable(got[name]) == comparable(want[name]), name
        assert server.proc.wait(120) == 0, server.log_text()[-2000:]
    finally:
        server.stop()
    log = server.log_text()
    assert "drained in" in log and "stopped on SIGTERM" in log
    assert "Traceback" not in log and "KeyError" not in log, log[-3000:]
    left = [p for p in copies | stub_dirs if p.exists()]
    assert not left, f"left in the temp dir: {left}"


@slow
def test_a_drain_past_its_timeout_still_exits_0_and_cleans_up(tiny_bundle, tmp_path):
    """--drain-timeout bounds the wait: the server stops with requests still running, says so, exits 0 and
    removes the temp folders the interrupted tritonserver could not; the clients get one-line RemoteErrors."""
    server = start_server(tiny_bundle, tmp_path / "serve.log", "--drain-timeout", "0.5")
    try:
        copies = _model_copies(_tree(server.proc.pid))
        stub_dirs = _stub_temp_dirs(copies)
        threads, got = _two_requests_inside(server, _jobs())
        t = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(120) == 0, server.log_text()[-2000:]
        took = time.monotonic() - t
        for th in threads:
            th.join(120)
    finally:
        server.stop()
    log = server.log_text()
    assert "--drain-timeout 0.5 s passed with requests still running; stopping anyway" in log, log[-2000:]
    assert took < 60, f"stopping took {took:.1f} s"
    for (
        name,
        outcome,
    ) in got.items():  # answered in tritonserver's own last seconds, or cut: one line either way
        assert isinstance(outcome, GenerationResult | RemoteError), (name, outcome)
        assert "\n" not in str(outcome)
    left = [p for p in copies | stub_dirs if p.exists()]
    assert not left, f"left in the temp dir: {left}"


@slow
def test_sigterm_stops_everything_it_started(server):
    import psutil

    proc = server["proc"]
    tree = _tree(proc.pid)
    names = {p.name() for p in tree}
    assert any("tritonserver" in n for n in names), names
    workspaces = {Path(a).parents[1] for p in tree for a in p.cmdline() if a.endswith("model-store")}
    model_copies = _model_copies(tree)
    stub_dirs = _stub_temp_dirs(model_copies)
    shm_own = _shm() - server["shm_before"]
    assert workspaces, "no tritonserver --model-repository under the server's workspace"

    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    took = time.monotonic() - t
    assert proc.returncode == 0, server["log"].read_text()[-2000:]
    assert took < 15, f"stopping took {took:.1f} s"
    deadline = time.monotonic() + 5
    while (alive := [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert not alive, f"left running: {[(p.pid, p.name()) for p in alive]}"
    assert not (shm_own & _shm()), f"left in /dev/shm: {shm_own & _shm()}"
    assert not [n for n in _shm() if n.startswith(f"pytrtion{proc.pid}-")]
    assert not [w for w in workspaces | model_copies | stub_dirs if w.exists()], (
        "the workspace, model copy or stub temp folder was left behind"
    )
    assert "stopped on SIGTERM" in server["log"].read_text()
