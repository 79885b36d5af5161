"""Serving: `python -m runtime.serve` (PyTriton) on loopback with the tiny bundle, RemotePipeline and plain
tritonclient give the local Pipeline's tokens, typed errors cross the wire, metrics count, SIGTERM leaves nothing.

The first run creates the serving venv `.venv-serve` (numpy<2 + PyTriton, about a minute) and later runs reuse
it; when it cannot be created (no package index), the served tests skip naming what failed.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest
from PIL import Image

from bench.serve_bench import free_ports
from runtime import errors as runtime_errors
from runtime.errors import BudgetError, GenerationError, HiredError, ImageError, PromptError, RemoteError
from runtime.pipeline import GenerationResult, Pipeline
from runtime.remote import RemotePipeline, parse_address, result_from_dict
from runtime.serve import (
    INPUTS,
    OUTPUTS,
    answer_requests,
    encode_options,
    encode_outcomes,
    format_error,
    main,
    parse_args,
    parse_error,
    parse_row,
)

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "What is in this picture?"
NEW = 8
READY_TIMEOUT_S = 120


def picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A seeded uint8 [H, W, 3] picture with blocks, so attention is not uniform."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    for _ in range(5):
        y0, x0 = rng.integers(0, height), rng.integers(0, width)
        img[y0 : y0 + height // 4, x0 : x0 + width // 4] = rng.integers(0, 256, 3)
    return img.astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def comparable(result: GenerationResult) -> dict:
    """Everything of a result but the timings, which differ run to run."""
    d = result.to_dict()
    d.pop("timings_ms")
    return d


# ---- the protocol, without a server ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:8001", ("grpc", "127.0.0.1:8001")),
        ("grpc://robot-server:9001", ("grpc", "robot-server:9001")),
        ("http://127.0.0.1:8000/", ("http", "127.0.0.1:8000")),
        ("HTTP://[::1]:8000", ("http", "[::1]:8000")),
    ],
)
def test_address_forms_pick_the_protocol(address, expected):
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["", "127.0.0.1", "https://h:8000", "h:99999", "http://h:80/v2", 8001])
def test_bad_addresses_raise_remote_error(address):
    with pytest.raises(RemoteError, match="address|scheme"):
        parse_address(address)


@pytest.mark.parametrize("cls", [getattr(runtime_errors, n) for n in runtime_errors.__all__])
def test_typed_errors_cross_the_wire_with_class_and_message(cls):
    sent = cls("image is 0x5 pixels (width x height); pass an image with both sides >= 1 pixel")
    got = parse_error(format_error(sent))
    assert type(got) is cls
    assert str(got) == str(sent)


def test_unexpected_server_exceptions_become_remote_errors():
    text = format_error(KeyError("boom"))
    assert text.startswith("RemoteError: the server failed on this request (KeyError: 'boom')")
    assert isinstance(parse_error(text), RemoteError)
    assert isinstance(parse_error("NotAnError: x"), RemoteError)
    assert "NotAnError: x" in str(parse_error("NotAnError: x"))


def _request(**tensors) -> dict[str, np.ndarray]:
    data = {"prompt": np.array([[PROMPT.encode()]], dtype=object), "image": picture(4, 5)[None]}
    data.update(tensors)
    return {k: v for k, v in data.items() if v is not None}


def test_plain_tensors_and_json_options_become_generate_keywords():
    data = _request(
        options=np.array(
            [[encode_options({"budget": 0.1 + 0.2, "seed": np.int64(7), "distribution": None})]], object
        ),
        alpha=np.array([[0.25]]),
        max_new_tokens=np.array([[5]], dtype=np.int32),
        newlines=np.array([[b"rows"]], dtype=object),
    )
    call = parse_row(data, 0)
    assert call.prompt == PROMPT and call.image.shape == (4, 5, 3)
    assert call.options == {
        "budget": 0.1 + 0.2, "seed": 7, "distribution": None, "alpha": 0.25, "max_new_tokens": 5, "newlines": "rows"
    }  # fmt: skip
    assert type(call.options["max_new_tokens"]) is int and type(call.options["alpha"]) is float


@pytest.mark.parametrize(
    ("tensors", "error", "message"),
    [
        ({"image": None}, ImageError, "has no image"),
        ({"image_bytes": np.array([[b"\x89PNG"]], dtype=object)}, ImageError, "both image and image_bytes"),
        ({"prompt": np.array([[b"\xff\xfe"]], dtype=object)}, PromptError, "not valid UTF-8"),
        ({"options": np.array([[b"{budget: 1}"]], dtype=object)}, GenerationError, "not valid JSON"),
        ({"options": np.array([[b"[0.2]"]], dtype=object)}, GenerationError, "must be a JSON object"),
        ({"options": np.array([[b'{"rate": 0.2}']], dtype=object)}, GenerationError, "unknown option"),
        (
            {"options": np.array([[b'{"budget": 0.2}']], dtype=object), "budget": np.array([[0.3]])},
            GenerationError,
            "both as a tensor and in options",
        ),
    ],
)
def test_malformed_requests_raise_typed_errors(tensors, error, message):
    with pytest.raises(error, match=message):
        parse_row(_request(**tensors), 0)


def _result(ids: tuple[int, ...]) -> GenerationResult:
    return GenerationResult(
        text="a cat",
        token_ids=ids,
        visual_tokens=MappingProxyType({"before": 1560, "kept": 345, "per_image": (172, 87, 86)}),
        budget=MappingProxyType(
            {"rate": 0.2, "alpha": 0.5, "total": 345, "distribution": "spatial", "newlines": "none"}
        ),
        timings_ms=MappingProxyType({"total": 1.5}),
        provider="CPUExecutionProvider",
    )


def test_result_json_rebuilds_an_equal_generation_result():
    r = _result((5, 6, 2))
    out = encode_outcomes([r])
    assert result_from_dict(json.loads(out["result_json"][0, 0])) == r


def test_rows_of_one_request_pad_token_ids_and_keep_errors_per_row():
    out = encode_outcomes(
        [_result((5, 6, 2)), BudgetError("budget must be in (0, 1], got 2.0"), _result((9,))]
    )
    assert out["token_ids"].tolist() == [[5, 6, 2], [-1, -1, -1], [9, -1, -1]]
    assert out["error"][:, 0].tolist() == [b"", b"BudgetError: budget must be in (0, 1], got 2.0", b""]
    assert out["visual_tokens_kept"][:, 0].tolist() == [345, 0, 345]
    assert out["text"][:, 0].tolist() == [b"a cat", b"", b"a cat"]
    assert {k for k in out} == {s.name for s in OUTPUTS}


def test_answer_requests_runs_every_row_on_its_own_and_keeps_order():
    seen = []

    def generate(image, prompt, **options):
        seen.append(prompt)
        if prompt == "bad":
            raise PromptError("prompt is empty; ask something about the image")
        return _result((len(prompt),))

    req_a = _request(
        prompt=np.array([[b"ab"], [b"bad"]], dtype=object), image=np.zeros((2, 3, 3, 3), np.uint8)
    )
    req_b = _request(prompt=np.array([[b"abcd"]], dtype=object))
    with ThreadPoolExecutor(4) as ex:
        out_a, out_b = answer_requests(generate, [req_a, req_b], ex)
    assert sorted(seen) == ["ab", "abcd", "bad"]
    assert out_a["token_ids"].tolist() == [[2], [-1]]
    assert out_a["error"][1, 0].startswith(b"PromptError: prompt is empty")
    assert out_b["token_ids"].tolist() == [[4]]


def test_inputs_declare_one_required_prompt_and_optional_rest():
    assert [s.name for s in INPUTS if not s.optional] == ["prompt"]
    assert {s.name: s.dtype for s in INPUTS}["budget"] == "FP64"  # 0.3 must arrive as 0.3


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


def test_a_taken_port_is_refused_before_anything_starts(tiny_bundle, capsys):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        t = time.monotonic()
        assert main(["--artifacts", str(tiny_bundle), "--grpc-port", str(taken)]) == 2
    assert time.monotonic() - t < 5
    assert f"--grpc-port {taken}: cannot listen on 127.0.0.1:{taken}" in capsys.readouterr().err


def test_unreachable_server_raises_one_line_remote_error():
    (port,) = free_ports(1)
    for address in (f"127.0.0.1:{port}", f"http://127.0.0.1:{port}"):
        t = time.monotonic()
        with pytest.raises(RemoteError, match=r"cannot reach .*is `python -m runtime.serve` running") as info:
            RemotePipeline(address, timeout_s=5)
        assert "\n" not in str(info.value)
        assert time.monotonic() - t < 10


def test_serving_environment_is_stamped_with_its_pins(tmp_path):
    from runtime import serve_env

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
    if libdir:  # pyenv/uv/conda Pythons: their libpython must win over the distro's (pitfall 2)
        assert environ["LD_LIBRARY_PATH"].split(os.pathsep)[:2] == [libdir, "/opt/lib"]


def test_a_venv_made_by_hand_is_used_as_is(tmp_path):
    from runtime import serve_env

    env = tmp_path / "my-serve-venv"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").touch()
    said = []
    assert serve_env.ensure_env(env, say=said.append) == env
    assert (env / "bin" / "python").exists()
    assert said == [f"serve env: using {env} as given (not built from constraints-serve.txt)"]


def test_a_foreign_folder_is_never_deleted(tmp_path):
    from runtime import serve_env

    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(serve_env.ServeEnvError, match="neither a venv nor one made by runtime.serve"):
        serve_env.ensure_env(tmp_path, say=lambda _: None)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_a_failed_build_step_says_what_failed_and_removes_the_half_made_venv(tmp_path):
    from runtime import serve_env

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


# ---- a real server --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    with Pipeline.load(tiny_bundle) as p:
        yield p


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    from runtime import serve_env

    try:
        serve_env.ensure_env()
    except serve_env.ServeEnvError as e:
        pytest.skip(f"the serving venv could not be created: {e}")
    shm_before = _shm()
    http, grpc, metrics = free_ports(3)
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    log = open(log_path, "w")
    cmd = [sys.executable, "-m", "runtime.serve", "--artifacts", str(tiny_bundle), "--http-port", str(http),
           "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--max-batch", "8"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    info = {
        "proc": proc,
        "http": http,
        "grpc": grpc,
        "metrics": metrics,
        "log": log_path,
        "shm_before": shm_before,
    }
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"runtime.serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                RemotePipeline(f"127.0.0.1:{grpc}", timeout_s=5).close()
                break
            except RemoteError:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"runtime.serve not ready in {READY_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}"
                    )
                time.sleep(0.3)
        yield info
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def test_remote_pipeline_gives_the_local_tokens_over_grpc_and_http(server, pipe, tmp_path):
    rgb = picture(300, 500)
    path = tmp_path / "frame.png"
    path.write_bytes(png_bytes(rgb))
    cases = [
        (rgb, {}),
        (png_bytes(rgb), {"budget": 0.3, "alpha": 0.25}),  # encoded bytes: decoded by the server
        (str(path), {"budget": 0.1 + 0.2, "distribution": "official", "newlines": "rows"}),
        (rgb[:, :, ::-1].copy(), {"color": "bgr", "budget": 1.0}),  # a camera frame
    ]
    wants = [pipe.generate(image, PROMPT, max_new_tokens=NEW, **options) for image, options in cases]
    for address in (f"127.0.0.1:{server['grpc']}", f"http://127.0.0.1:{server['http']}"):
        with RemotePipeline(address) as remote:
            for (image, options), want in zip(cases, wants):
                got = remote.generate(image, PROMPT, max_new_tokens=NEW, **options)
                assert type(got) is GenerationResult
                assert comparable(got) == comparable(want), (address, options)
                assert len(got.token_ids) == NEW or got.token_ids[-1] == pipe.manifest.tokens.eos


def _plain_request(tc, rgb: np.ndarray, http: bool):
    image = tc.InferInput("image", [1, *rgb.shape], "UINT8")
    prompt = tc.InferInput("prompt", [1, 1], "BYTES")
    budget = tc.InferInput("budget", [1, 1], "FP64")
    new = tc.InferInput("max_new_tokens", [1, 1], "INT32")
    arrays = [
        rgb[None],
        np.array([[PROMPT.encode()]], dtype=object),
        np.array([[0.3]]),
        np.array([[NEW]], np.int32),
    ]
    for tensor, array in zip((image, prompt, budget, new), arrays):
        tensor.set_data_from_numpy(array, **({"binary_data": True} if http else {}))
    return [image, prompt, budget, new]


def test_plain_tritonclient_over_http_and_grpc_gets_plain_tensors(server, pipe):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    rgb = picture(240, 320, seed=3)
    want = pipe.generate(rgb, PROMPT, budget=0.3, max_new_tokens=NEW)
    for tc, url, http in (
        (httpclient, f"127.0.0.1:{server['http']}", True),
        (grpcclient, f"127.0.0.1:{server['grpc']}", False),
    ):
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


def _success_count(server) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server['metrics']}/metrics", timeout=10).read().decode()
    m = re.search(r'^nv_inference_request_success\{model="hired",version="1"\} (\d+)', text, re.M)
    assert m, "no nv_inference_request_success line for model hired in /metrics"
    return int(m.group(1))


def test_metrics_count_every_request(server):
    before = _success_count(server)
    with RemotePipeline(f"127.0.0.1:{server['grpc']}") as remote:
        for i in range(3):
            remote.generate(picture(64, 64, seed=i), PROMPT, max_new_tokens=2)
    deadline = time.monotonic() + 5  # the counter is bumped as the response leaves; allow a moment
    while (counted := _success_count(server) - before) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert counted == 3


def test_bad_input_raises_the_local_typed_error_with_the_same_message(server, pipe):
    cases = [
        (b"not an image at all", {}),  # decoded (and refused) by the server
        (picture(32, 32), {"budget": 2.0}),
        (picture(32, 32), {"alpha": float("nan")}),
        (picture(32, 32), {"distribution": "uniform"}),
        (picture(32, 32), {"max_new_tokens": 0}),
        (picture(32, 32), {"temperature": -1.0}),
    ]
    with RemotePipeline(f"http://127.0.0.1:{server['http']}") as remote:
        for image, options in cases:
            with pytest.raises(HiredError) as local:
                pipe.generate(image, PROMPT, **options)
            with pytest.raises(HiredError) as served:
                remote.generate(image, PROMPT, **options)
            assert type(served.value) is type(local.value), options
            assert str(served.value) == str(local.value)
        for prompt in ("a <image> here", "   ", "broken \ud800 text"):
            with pytest.raises(PromptError) as served:
                remote.generate(picture(32, 32), prompt)
            with pytest.raises(PromptError) as local:
                pipe.generate(picture(32, 32), prompt)
            assert str(served.value) == str(local.value)


def _tree(pid: int) -> list:
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def test_sigterm_stops_everything_it_started(server):
    import psutil

    proc = server["proc"]
    tree = _tree(proc.pid)
    names = {p.name() for p in tree}
    assert any("tritonserver" in n for n in names), names
    workspaces = {Path(a).parents[1] for p in tree for a in p.cmdline() if a.endswith("model-store")}
    model_copies = {Path(a).parents[1] for p in tree for a in p.cmdline() if a.endswith("/1/model.py")}
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
    assert not [w for w in workspaces | model_copies if w.exists()], (
        "the workspace or model copy was left behind"
    )
    assert "stopped on SIGTERM" in server["log"].read_text()
