"""serving.remote without a server: addresses, the signature and local checks of RemotePipeline.generate, and the
one-line RemoteError of a server that cannot be reached. The served answers are in test_serving_server.py."""

from __future__ import annotations

import inspect
import time

import numpy as np
import pytest

from runtime.errors import HiredError, RemoteError
from runtime.pipeline import Pipeline
from serving import RemotePipeline
from serving.remote import parse_address
from tests.serving_helpers import free_ports, picture

PROMPT = "What is in this picture?"


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


def test_unreachable_server_raises_one_line_remote_error():
    (port,) = free_ports(1)
    for address in (f"127.0.0.1:{port}", f"http://127.0.0.1:{port}"):
        t = time.monotonic()
        with pytest.raises(RemoteError, match=r"cannot reach .*is `python -m serving` running") as info:
            RemotePipeline(address, timeout_s=5)
        assert "\n" not in str(info.value)
        assert time.monotonic() - t < 10


def test_generate_takes_the_pipelines_keywords():
    local = inspect.signature(Pipeline.generate).parameters
    remote = inspect.signature(RemotePipeline.generate).parameters
    assert list(remote) == [name for name in local if name != "trace"]
    assert all(remote[n].default == local[n].default for n in remote)


@pytest.mark.parametrize(
    "options",
    [{"rate": 0.2}, {"temperature": -0.5}, {"max_new_tokens": 10**5000}, {"seed": [1, 2]}, {"color": "hsv"}],
)
def test_bad_options_are_refused_before_the_network_with_the_local_error(pipe, options):
    (port,) = free_ports(1)  # nothing listens: a request that left this process would be a RemoteError
    remote = RemotePipeline(f"127.0.0.1:{port}", check=False, timeout_s=5)
    with pytest.raises(HiredError) as served:
        remote.generate(picture(6, 7), PROMPT, **options)
    with pytest.raises(HiredError) as local:
        pipe.generate(picture(6, 7), PROMPT, **options)
    assert type(served.value) is type(local.value) and type(local.value) is not RemoteError
    assert str(served.value) == str(local.value)
    remote.close()


def test_good_options_do_leave_for_the_server():
    (port,) = free_ports(1)
    with RemotePipeline(f"127.0.0.1:{port}", check=False, timeout_s=5) as remote:
        with pytest.raises(RemoteError, match="cannot reach"):
            remote.generate(np.zeros((4, 4, 3), np.uint8), PROMPT, min_new_tokens=2, max_new_tokens=3)
