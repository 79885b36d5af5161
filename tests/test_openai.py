"""The OpenAI-compatible front door, with the official `openai` client against a real uvicorn server on loopback.

Greedy answers equal Pipeline.generate for the same image, prompt and HiRED options (streamed or not); 16
concurrent clients each get what they get alone; every error is its status with OpenAI's error body; a client
that leaves mid-stream frees its slot; `python -m serving.openai` exits 0 on SIGTERM.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from runtime.errors import RemoteError  # noqa: E402
from runtime.prompt import Chat  # noqa: E402
from serving.openai.app import Settings, create_app  # noqa: E402
from serving.openai.backend import LocalBackend  # noqa: E402
from serving.openai.images import ImagePolicy  # noqa: E402
from tests.helpers import scene_array  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-key"
PROMPT = "What is in this picture?"


def png(width: int, height: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(scene_array(width, height, seed)).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def user(text: str, image: bytes | None = None) -> dict:
    parts = [{"type": "text", "text": text}]
    if image is not None:
        parts.append({"type": "image_url", "image_url": {"url": data_url(image)}})
    return {"role": "user", "content": parts}


class LiveServer:
    """A uvicorn server for `app` on a free loopback port, in a thread of this process."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])))
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("the test server did not become ready in 60 s")

    def client(self, key: str = KEY, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, **kw)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=5).json()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()


class Borrowed(LocalBackend):
    """The module's Pipeline; the server must not close it (conftest checks it is left with no open request)."""

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def image() -> bytes:
    return png(320, 240)


@pytest.fixture(scope="module")
def files(tmp_path_factory, image) -> Path:
    d = tmp_path_factory.mktemp("allowed")
    (d / "cat.png").write_bytes(image)
    return d


@pytest.fixture(scope="module")
def live(pipe, files):
    settings = Settings(api_key=KEY, max_concurrency=4, max_queue=64, max_body=2 * 1024 * 1024,
                        images=ImagePolicy(allow_files=files))  # fmt: skip
    server = LiveServer(create_app(lambda: Borrowed(pipe), settings))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    with live.client() as c:
        yield c


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# ---- answers equal the Pipeline's ---------------------------------------------------------------------
HIRED_CASES = [{}, {"budget": 0.2}, {"budget": 1.0}, {"budget": 0.3, "alpha": 0.2, "distribution": "official"},
               {"budget": 0.5, "newlines": "rows"}]  # fmt: skip


@pytest.mark.parametrize("hired", HIRED_CASES, ids=lambda h: ",".join(f"{k}={v}" for k, v in h.items()) or "default")
def test_greedy_answer_equals_pipeline_generate(client, pipe, image, hired):
    want = pipe.generate(image, PROMPT, max_new_tokens=12, **hired)
    r = client.chat.completions.create(model="tiny", messages=[user(PROMPT, image)], max_tokens=12, temperature=0,
                                       extra_body={"hired": hired} if hired else None)  # fmt: skip
    assert r.object == "chat.completion" and r.model == "tiny" and len(r.choices) == 1
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.usage.completion_tokens == len(want.token_ids)
    before, after = pipe.prompt.encode(PROMPT)
    assert r.usage.prompt_tokens == len(before) + len(after) + want.visual_tokens["kept"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    eos = pipe.manifest.tokens.eos
    assert r.choices[0].finish_reason == ("stop" if want.token_ids[-1] == eos else "length")
    facts = r.model_extra["hired"]
    assert facts["visual_tokens"] == json.loads(json.dumps(dict(want.to_dict()["visual_tokens"])))
    assert facts["budget"] == want.to_dict()["budget"]
    assert set(facts["timings_ms"]) == set(want.timings_ms)


@pytest.mark.parametrize("hired", HIRED_CASES[:2], ids=["default", "budget=0.2"])
def test_streamed_chunks_concatenate_to_the_pipeline_text(client, pipe, image, hired):
    want = pipe.generate(image, PROMPT, max_new_tokens=12, **hired)
    stream = client.chat.completions.create(
        model="tiny", messages=[user(PROMPT, image)], max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"hired": hired} if hired else None,
    )  # fmt: skip
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop" if want.token_ids[-1] == pipe.manifest.tokens.eos else "length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].model_extra["hired"]["visual_tokens"]["kept"] == want.visual_tokens["kept"]


def test_stream_ends_with_done_and_without_usage_unless_asked(live, image):
    body = {"messages": [user(PROMPT, image)], "max_tokens": 3, "stream": True}
    r = httpx.post(f"{live.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=60)  # fmt: skip
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: ") :] for line in r.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    assert all("usage" not in json.loads(e) for e in events[:-1])


def test_sixteen_concurrent_clients_each_get_what_they_get_alone(live, pipe):
    jobs = [(png(64 + 40 * (i % 4), 48 + 30 * (i % 3), seed=i), f"Question {i}: what is here?",
             {"budget": (0.1, 0.2, 0.5, 1.0)[i % 4]}) for i in range(16)]  # fmt: skip
    alone = [pipe.generate(img, q, max_new_tokens=6, **h) for img, q, h in jobs]

    def ask(job):
        img, q, h = job
        with live.client() as c:
            if hash(q) % 2:
                r = c.chat.completions.create(model="tiny", messages=[user(q, img)], max_tokens=6,
                                              extra_body={"hired": h})  # fmt: skip
                return r.choices[0].message.content, r.usage.completion_tokens
            s = c.chat.completions.create(model="tiny", messages=[user(q, img)], max_tokens=6, stream=True,
                                          stream_options={"include_usage": True}, extra_body={"hired": h})  # fmt: skip
            chunks = list(s)
            return "".join(x.choices[0].delta.content or "" for x in chunks if x.choices), chunks[-1].usage.completion_tokens

    with ThreadPoolExecutor(16) as ex:
        got = list(ex.map(ask, jobs))
    assert got == [(w.text, len(w.token_ids)) for w in alone]
    assert wait_for(lambda: live.health()["running"] == 0)


def test_text_only_and_multi_turn_are_rendered_in_the_model_chat_format(client, pipe, image):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Say hello."}],
                                       max_tokens=8)  # fmt: skip
    want = pipe.generate(None, "Say hello.", max_new_tokens=8)
    assert r.choices[0].message.content == want.text and r.usage.completion_tokens == len(want.token_ids)
    assert r.model_extra["hired"]["visual_tokens"]["kept"] == 0
    ids, _ = pipe.prompt.encode("Say hello.", image=False)
    assert r.usage.prompt_tokens == len(ids)

    messages = [{"role": "system", "content": "Answer briefly."}, user("Describe it.", image),
                {"role": "assistant", "content": "A picture."}, {"role": "user", "content": "Its colours?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8)
    chat = Chat((("user", "Describe it."), ("assistant", "A picture."), ("user", "Its colours?")),
                system="Answer briefly.", image_turn=0)  # fmt: skip
    want = pipe.generate(image, chat, max_new_tokens=8)
    assert r.choices[0].message.content == want.text


def test_several_image_parts_are_pipeline_generate_with_a_list_of_images(client, pipe, image):
    """In one message or spread over two, the images go in order into the first image's turn, or replace the
    text's <image> markers: Pipeline.generate([a, b], text)."""
    second = png(300, 500, seed=3)
    both = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                        {"type": "image_url", "image_url": {"url": data_url(second)}},
                                        {"type": "text", "text": "What changed?"}]}  # fmt: skip
    want = pipe.generate([image, second], "What changed?", budget=0.2, max_new_tokens=6)
    r = client.chat.completions.create(model="tiny", messages=[both], max_tokens=6, extra_body={"hired": {"budget": 0.2}})
    assert r.choices[0].message.content == want.text
    assert r.model_extra["hired"]["visual_tokens"] == json.loads(json.dumps(want.to_dict()["visual_tokens"]))
    assert r.usage.prompt_tokens == sum(map(len, pipe.prompt.encode_slots("What changed?", 2))) + want.visual_tokens["kept"]
    marked = [user("Before: <image>", image), user("after: <image>. What changed?", second)]
    want = pipe.generate([image, second], "Before: <image>\nafter: <image>. What changed?", max_new_tokens=6)
    r = client.chat.completions.create(model="tiny", messages=marked, max_tokens=6)
    assert r.choices[0].message.content == want.text


def test_text_parts_are_joined_with_a_newline(client, pipe, image):
    msg = {"role": "user", "content": [{"type": "text", "text": "First line."},
                                       {"type": "image_url", "image_url": {"url": data_url(image)}},
                                       {"type": "text", "text": "Second line."}]}  # fmt: skip
    r = client.chat.completions.create(model="tiny", messages=[msg], max_tokens=6)
    assert r.choices[0].message.content == pipe.generate(image, "First line.\nSecond line.", max_new_tokens=6).text


def test_stop_strings_cut_the_text(client, pipe, image):
    full = pipe.generate(image, PROMPT, max_new_tokens=16).text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), f"pick another cut of {full!r}"
    want = full[: full.index(stop)]
    r = client.chat.completions.create(model="tiny", messages=[user(PROMPT, image)], max_tokens=16, stop=[stop])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    kept = pipe.generate(image, PROMPT, max_new_tokens=1).visual_tokens["kept"]
    before, after = pipe.prompt.encode(PROMPT)
    assert r.usage.prompt_tokens == len(before) + len(after) + kept  # the stream ended early: from its trace
    assert 1 <= r.usage.completion_tokens < 16
    s = client.chat.completions.create(model="tiny", messages=[user(PROMPT, image)], max_tokens=16, stop=stop,
                                       stream=True)  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == want


def test_file_urls_under_allow_files_and_neutral_openai_fields(client, pipe, image, files):
    want = pipe.generate(image, PROMPT, max_new_tokens=4).text
    msg = {"role": "user", "content": [{"type": "text", "text": PROMPT},
                                       {"type": "image_url", "image_url": {"url": (files / "cat.png").as_uri()}}]}
    r = client.chat.completions.create(
        model="tiny", messages=[msg], max_completion_tokens=4, frequency_penalty=0, presence_penalty=0.0,
        logprobs=False, response_format={"type": "text"}, user="u1", metadata={"k": "v"}, n=1, seed=3, top_p=1,
    )  # fmt: skip
    assert r.choices[0].message.content == want


def test_server_hired_defaults_apply_to_requests_that_send_none(pipe, image):
    server = LiveServer(create_app(lambda: Borrowed(pipe), Settings(hired_defaults={"budget": 1.0})))
    try:
        with server.client() as c:
            r = c.chat.completions.create(model="tiny", messages=[user(PROMPT, image)], max_tokens=4)
            assert r.model_extra["hired"]["budget"]["rate"] == 1.0
            assert r.choices[0].message.content == pipe.generate(image, PROMPT, max_new_tokens=4, budget=1.0).text
            r = c.chat.completions.create(model="tiny", messages=[user(PROMPT, image)], max_tokens=4,
                                          extra_body={"hired": {"budget": 0.2}})  # fmt: skip
            assert r.model_extra["hired"]["budget"]["rate"] == 0.2
    finally:
        server.stop()


# ---- errors ---------------------------------------------------------------------------------------------
def err_case(**changes):
    def build(image):
        body = {"model": "tiny", "messages": [user(PROMPT, image)], "max_tokens": 2}
        for k, v in changes.items():
            if v is None:
                body.pop(k, None)
            else:
                body[k] = v(image) if callable(v) else v
        return body

    return build


ERRORS = [
    ("an <image> marker per image but one image", err_case(messages=lambda img: [user("<image> <image> a", img)]),
     400, None),
    ("bad image bytes", err_case(messages=lambda img: [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]),
     400, None),  # fmt: skip
    ("bad base64", err_case(messages=lambda img: [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, {"type": "text", "text": "hi"}]}]),
     400, "messages"),  # fmt: skip
    ("unknown content type", err_case(messages=[{"role": "user", "content": [{"type": "audio", "x": 1}]}]), 400,
     "messages.0.content.0.type"),
    ("no user message", err_case(messages=[{"role": "system", "content": "be nice"}]), 400, "messages"),
    ("assistant last", err_case(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]),
     400, "messages"),
    ("empty messages", err_case(messages=[]), 400, "messages"),
    ("unknown role", err_case(messages=[{"role": "tool", "content": "x"}]), 400, "messages.0.role"),
    ("invisible prompt", err_case(messages=[{"role": "user", "content": "\u200b\x00 "}]), 400, None),
    ("image placeholder in text", err_case(messages=[{"role": "user", "content": "look <image>"}]), 400, None),
    ("budget out of range", err_case(hired={"budget": 1.5}), 400, "hired.budget"),
    ("bad distribution", err_case(hired={"distribution": "diagonal"}), 400, None),
    ("unknown hired key", err_case(hired={"budgte": 0.2}), 400, "hired.budgte"),
    ("hired not an object", err_case(hired=0.2), 400, "hired"),
    ("n=2", err_case(n=2), 400, "n"),
    ("negative temperature", err_case(temperature=-1), 400, "temperature"),
    ("top_p 0", err_case(top_p=0), 400, "top_p"),
    ("max_tokens 0", err_case(max_tokens=0), 400, "max_tokens"),
    ("max_tokens as text", err_case(max_tokens="5"), 400, "max_tokens"),
    ("frequency_penalty", err_case(frequency_penalty=0.5), 400, "frequency_penalty"),
    ("logprobs", err_case(logprobs=True), 400, "logprobs"),
    ("tools", err_case(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    ("json response_format", err_case(response_format={"type": "json_object"}), 400, "response_format"),
    ("unknown field", err_case(temprature=0.5), 400, "temprature"),
    ("http url refused", err_case(messages=[{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "http://169.254.169.254/x.png"}}]}]),
     400, "messages"),  # fmt: skip
    ("file url outside", err_case(messages=[{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]),
     400, "messages"),  # fmt: skip
    ("too many stops", err_case(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("wrong model", err_case(model="gpt-4o"), 404, "model"),
]


def check_error_body(body: dict, status: int) -> dict:
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"]
    assert "Traceback" not in err["message"]
    assert err["type"] == {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                           413: "invalid_request_error", 429: "rate_limit_error"}[status]  # fmt: skip
    return err


@pytest.mark.parametrize(("name", "build", "status", "param"), ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_requests_get_their_status_and_an_openai_error(live, client, image, name, build, status, param):
    body = build(image)
    r = httpx.post(f"{live.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=60)  # fmt: skip
    assert r.status_code == status, r.text
    err = check_error_body(r.json(), status)
    if param is not None:
        assert err["param"] == param
    # the official client raises its typed error, and the server keeps serving
    known = set(inspect.signature(client.chat.completions.create).parameters)
    kwargs = {k: v for k, v in body.items() if k in known}
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(**kwargs, extra_body={k: v for k, v in body.items() if k not in known})
    assert e.value.status_code == status
    assert live.health()["status"] == "ready"


ODD_VALUES = [("messages", v) for v in (None, 1, "hi", {}, [None], [1], [{}], [{"role": "user"}],
                                       [{"role": None, "content": "x"}], [{"role": "user", "content": 5}],
                                       [{"role": "user", "content": [5]}], [{"role": "user", "content": [{}]}],
                                       [{"role": "user", "content": [{"type": "text"}]}],
                                       [{"role": "user", "content": [{"type": "text", "text": ["x"]}]}],
                                       [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
                                       [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}],
                                       [{"role": "user", "content": "\ud800"}], [{"role": "user", "content": ""}])] + [
    ("max_tokens", v) for v in (-1, 1.5, 10**30, True, [], "8")] + [
    ("temperature", v) for v in ("hot", float("nan"), float("inf"), 1e400, True)] + [
    ("top_p", v) for v in (1.5, -0.1, 0, "x")] + [
    ("seed", v) for v in (-1, 2**200, 1.5, "1")] + [
    ("stop", v) for v in (5, [5], [""], {"a": 1})] + [
    ("hired", v) for v in ([], "0.2", {"budget": "0.2"}, {"budget": None, "alpha": 2}, {"newlines": 1},
                           {"budget": {"x": 1}}, {"alpha": -0.5})] + [
    ("stream", "yes"), ("stream_options", {"include_usage": "yes"}), ("n", 0), ("model", 5), ("user", 5),
    ("metadata", "x"), ("presence_penalty", 2), ("top_logprobs", 3), ("logit_bias", {"1": 5}),
]  # fmt: skip


@pytest.mark.parametrize(("field", "value"), ODD_VALUES, ids=[f"{f}={str(v)[:30]}" for f, v in ODD_VALUES])
def test_odd_values_of_every_field_are_a_4xx_never_a_500(live, image, field, value):
    body = {"model": "tiny", "messages": [user(PROMPT, image)], "max_tokens": 2, field: value}
    r = httpx.post(f"{live.url}/v1/chat/completions", content=json.dumps(body, allow_nan=True).encode(),
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}, timeout=60)  # fmt: skip
    assert r.status_code in (400, 404), r.text
    check_error_body(r.json(), r.status_code)


@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic " + KEY, f"Bearer {KEY}x"])
def test_a_missing_or_wrong_api_key_is_401(live, image, auth):
    headers = {"Authorization": auth} if auth else {}
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
        r = httpx.request(method, f"{live.url}{path}", json=err_case()(image), headers=headers, timeout=30)
        assert r.status_code == 401
        check_error_body(r.json(), 401)
    with live.client(key="wrong") as c, pytest.raises(openai.AuthenticationError):
        c.models.list()


def test_raw_body_errors_malformed_json_and_over_the_size_limit(live):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{live.url}/v1/chat/completions", content=b"{not json", headers=headers, timeout=30)
    assert r.status_code == 400 and check_error_body(r.json(), 400)
    r = httpx.post(f"{live.url}/v1/chat/completions", content=b"[1, 2]", headers=headers, timeout=30)
    assert r.status_code == 400 and check_error_body(r.json(), 400)
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (3 * 1024 * 1024)}]}).encode()
    r = httpx.post(f"{live.url}/v1/chat/completions", content=big, headers=headers, timeout=30)
    assert r.status_code == 413 and check_error_body(r.json(), 413)

    def chunked():  # no Content-Length: the limit holds on the bytes received
        for _ in range(6):
            yield b" " * (512 * 1024)

    r = httpx.post(f"{live.url}/v1/chat/completions", content=chunked(), headers=headers, timeout=30)
    assert r.status_code == 413
    r = httpx.get(f"{live.url}/v1/nothing", headers=headers, timeout=30)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert live.health()["status"] == "ready"


def test_models_health_and_metrics(live, client):
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    h = live.health()
    assert h["status"] == "ready" and h["model"] == "tiny" and h["backend"] == "local"
    text = httpx.get(f"{live.url}/metrics", timeout=10).text
    for name in ("hired_openai_requests_total", "hired_openai_errors_total", "hired_openai_ttft_seconds_bucket",
                 "hired_openai_completion_tokens_bucket", "hired_openai_running"):  # fmt: skip
        assert name in text
    ok = [line for line in text.splitlines() if line.startswith('hired_openai_requests_total{status="ok"}')]
    assert ok and float(ok[0].split()[-1]) > 0


# ---- slots, queue, disconnects --------------------------------------------------------------------------
class GatedBackend:
    """A fake backend whose streams yield one piece per `step` and end when told (or closed)."""

    name, streams = "fake", True

    def __init__(self, pipe, result):
        self.manifest, self.prompt, self.result = pipe.manifest, pipe.prompt, result
        self.release = threading.Event()
        self.opened = 0
        self.closed = threading.Semaphore(0)

    def open(self, image, prompt, options, trace=None):
        self.opened += 1

        def gen():
            try:
                while not self.release.wait(0.01):
                    yield "a"
                yield self.result.text
                return self.result
            finally:
                self.closed.release()

        return gen()

    def check_ready(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def gated(pipe, image):
    backend = GatedBackend(pipe, pipe.generate(image, PROMPT, max_new_tokens=2))
    server = LiveServer(create_app(lambda: backend, Settings(max_concurrency=1, max_queue=1)))
    yield server, backend
    backend.release.set()
    server.stop()


def test_running_and_queue_full_is_429_then_everyone_is_served(gated):
    server, backend = gated
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with ThreadPoolExecutor(2) as ex:
        first = ex.submit(httpx.post, f"{server.url}/v1/chat/completions", json=body, timeout=60)
        assert wait_for(lambda: server.health()["running"] == 1)
        second = ex.submit(httpx.post, f"{server.url}/v1/chat/completions", json=body, timeout=60)
        assert wait_for(lambda: server.health()["waiting"] == 1)
        with server.client() as c, pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="tiny", messages=body["messages"])
        check_error_body(e.value.response.json(), 429)
        backend.release.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
    assert server.health()["running"] == 0 and server.health()["waiting"] == 0


def test_a_client_leaving_mid_stream_frees_its_slot(gated):
    server, backend = gated
    with server.client() as c:
        stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True)
        next(stream), next(stream)
        stream.close()  # the connection goes away while the backend still generates
        assert backend.closed.acquire(timeout=10), "the backend stream was not closed"
        assert wait_for(lambda: server.health()["running"] == 0)
        backend.release.set()  # the next request gets the (only) slot at once
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], timeout=10)
        assert r.choices[0].message.content == backend.result.text


def test_a_client_leaving_a_non_streamed_request_frees_its_slot(gated):
    server, backend = gated
    with pytest.raises(httpx.ReadTimeout):  # the client gives up while the backend still generates
        httpx.post(f"{server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                   timeout=httpx.Timeout(10, read=1.0))  # fmt: skip
    assert backend.closed.acquire(timeout=10), "the backend stream was not closed"
    assert wait_for(lambda: server.health()["running"] == 0)


def test_a_client_leaving_a_pipeline_stream_ends_the_pipeline_request(pipe, image):
    server = LiveServer(create_app(lambda: Borrowed(pipe), Settings(max_concurrency=1, max_queue=0)))
    try:
        with server.client() as c:
            stream = c.chat.completions.create(model="tiny", messages=[user(PROMPT, image)], max_tokens=4000,
                                               stream=True)  # fmt: skip
            next(stream), next(stream)
            stream.close()
            assert wait_for(lambda: pipe.active_requests == 0 and server.health()["running"] == 0, 20)
            r = c.chat.completions.create(model="tiny", messages=[user(PROMPT, image)], max_tokens=2)
            assert r.choices[0].message.content == pipe.generate(image, PROMPT, max_new_tokens=2).text
    finally:
        server.stop()


# ---- the command line ---------------------------------------------------------------------------------
def test_a_non_loopback_host_needs_allow_remote(capsys):
    from serving.openai.__main__ import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--artifacts", "x", "--host", "0.0.0.0"])
    assert e.value.code == 2 and "--allow-remote" in capsys.readouterr().err
    assert parse_args(["--artifacts", "x", "--host", "0.0.0.0", "--allow-remote"]).host == "0.0.0.0"
    assert parse_args(["--artifacts", "x", "--host", "::1"]).host == "::1"


def test_the_command_serves_and_exits_0_on_sigterm_with_a_request_in_flight(tiny_bundle, image, tmp_path):
    from tests.serving_helpers import free_ports

    (port,) = free_ports(1)
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "serving.openai", "--artifacts", str(tiny_bundle), "--port",
                             str(port), "--shutdown-grace", "30"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _ready(url), 120), (tmp_path / "server.log").read_text()
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        stream = c.chat.completions.create(model="tiny", messages=[user(PROMPT, image)], max_tokens=40, stream=True)
        first = next(stream)
        proc.send_signal(signal.SIGTERM)
        rest = list(stream)  # the request in flight is finished, not cut
        assert first.choices[0].delta.role == "assistant" and rest[-1].choices[0].finish_reason in ("stop", "length")
        assert proc.wait(60) == 0, (tmp_path / "server.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_the_server_imports_no_torch_transformers_or_onnx():
    code = ("import sys, serving.openai.__main__, serving.openai.app, serving.openai.backend\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'onnx')))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- image URL policy -----------------------------------------------------------------------------------
def test_image_policy_limits_files_urls_and_sizes(tmp_path, image):
    from serving.openai.schema import APIError

    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "a.png").write_bytes(image)
    (tmp_path / "secret.png").write_bytes(image)
    (tmp_path / "ok" / "link.png").symlink_to(tmp_path / "secret.png")
    policy = ImagePolicy(allow_files=tmp_path / "ok", max_bytes=len(image))
    assert policy.fetch(data_url(image)) == image
    assert policy.fetch((tmp_path / "ok" / "a.png").as_uri()) == image
    for url in [(tmp_path / "secret.png").as_uri(), (tmp_path / "ok" / "link.png").as_uri(),
                (tmp_path / "ok" / ".." / "secret.png").as_uri(), "http://example.com/a.png", "ftp://x/y.png",
                "data:text/plain;base64,aGk=", "data:image/png,rawbytes"]:  # fmt: skip
        with pytest.raises(APIError) as e:
            policy.fetch(url)
        assert e.value.status == 400
    with pytest.raises(APIError, match="limit"):
        ImagePolicy(max_bytes=10).fetch(data_url(image))
    with pytest.raises(APIError, match="disabled"):
        ImagePolicy().fetch((tmp_path / "ok" / "a.png").as_uri())
    with pytest.raises(APIError, match="public"):  # fetching on: still never loopback/private hosts
        ImagePolicy(allow_url_fetch=True).fetch("http://127.0.0.1:9/a.png")


def test_url_fetch_has_a_size_limit_and_no_redirects(tmp_path, image):
    import http.server

    from serving.openai.schema import APIError

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "/a.png")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(image)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        policy = ImagePolicy(allow_url_fetch=True, allow_private_hosts=True)
        assert policy.fetch(f"{base}/a.png") == image
        with pytest.raises(APIError, match="302"):
            policy.fetch(f"{base}/moved")
        with pytest.raises(APIError, match="limit"):
            ImagePolicy(allow_url_fetch=True, allow_private_hosts=True, max_bytes=100).fetch(f"{base}/a.png")
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_gateway_backend_sends_a_streamed_answer_as_one_chunk(pipe, image):
    from serving.openai.backend import RemoteBackend

    class FakeRemote:  # RemotePipeline's generate, answered by the local Pipeline
        address = "grpc://fake:8001"

        def generate(self, image, prompt, **options):
            return pipe.generate(image, prompt, **options)

        down = False

        def check_ready(self):
            if self.down:
                raise RemoteError("cannot reach grpc://fake:8001")

        def close(self):
            pass

    backend = RemoteBackend.__new__(RemoteBackend)
    backend.manifest, backend.prompt, backend.remote, backend.address = pipe.manifest, pipe.prompt, FakeRemote(), "x"
    server = LiveServer(create_app(lambda: backend, Settings()))
    try:
        with server.client() as c:
            want = pipe.generate(image, PROMPT, max_new_tokens=8, budget=0.2)
            s = c.chat.completions.create(model="tiny", messages=[user(PROMPT, image)], max_tokens=8, stream=True,
                                          extra_body={"hired": {"budget": 0.2}})  # fmt: skip
            pieces = [x.choices[0].delta.content for x in s if x.choices and x.choices[0].delta.content]
            assert pieces == [want.text]
            with pytest.raises(openai.BadRequestError, match="one image and one user message"):
                c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
            backend.remote.down = True  # the fleet went away: /health says so (503)
            r = httpx.get(f"{server.url}/health", timeout=10)
            assert r.status_code == 503 and r.json()["status"] == "backend unavailable"
    finally:
        server.stop()
        assert pipe.active_requests == 0
