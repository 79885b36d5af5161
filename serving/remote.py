"""RemotePipeline: Pipeline's `generate` against a server (`python -m serving`, or the Triton repository's
`hired` model), over Triton's gRPC or HTTP with tritonclient only (pure Python; numpy 2 is fine).

    from serving import RemotePipeline
    with RemotePipeline("127.0.0.1:8001") as p:                 # "host:port" or "grpc://host:port"; "http://host:port"
        r = p.generate(frame, "What is on the table?", budget=0.2)    # the same GenerationResult as Pipeline's

What travels: a file path or a PIL image is decoded here (runtime.image.load_image, so a bad file raises the
same ImageError as locally) and sent as uint8 RGB; an array is converted here as `color` says (BGR camera
frames, gray, RGBA); encoded bytes are sent as they are (`image_bytes`; the server decodes them, smaller on the
wire). The other keywords are runtime.options.RequestOptions: checked here first (a bad value raises the
local Pipeline's error without a round trip), then the ones given travel as one JSON object, so the server sees
exactly those values and its errors (BudgetError, PromptError, ImageError, ...) arrive here with the same class
and message.
A server that cannot be reached, or that answers something unexpected, raises RemoteError (one line).

Thread safety: one RemotePipeline may be used from many threads (the gRPC client is shared; HTTP clients,
which are not thread-safe, are made one per thread).
"""

from __future__ import annotations

import inspect
import json
import threading
from dataclasses import fields
from types import MappingProxyType
from typing import Any

import numpy as np

from runtime.errors import HiredError, PromptError, RemoteError
from runtime.image import DEFAULT_MAX_PIXELS, load_image
from runtime.options import RequestOptions
from runtime.pipeline import GenerationResult
from serving.protocol import MODEL_NAME, WIRE_OPTIONS, encode_options, parse_error

DEFAULT_TIMEOUT_S = 300.0


def _generate_signature() -> inspect.Signature:
    """generate()'s signature as help() and IDEs show it: RequestOptions' fields as keywords, their defaults."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter(n, kind) for n in ("self", "image")]
    params.append(inspect.Parameter("prompt", kind, annotation="str"))
    params += [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
        for f in fields(RequestOptions)
    ]
    return inspect.Signature(params, return_annotation="GenerationResult")


def parse_address(address: str) -> tuple[str, str]:
    """("grpc" | "http", "host:port") of "host:port" (gRPC), "grpc://host:port" or "http://host:port"."""
    if not isinstance(address, str) or not address.strip():
        raise RemoteError(
            f"address must be 'host:port', 'grpc://host:port' or 'http://host:port', got {address!r}"
        )
    text = address.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "grpc", text
    scheme = scheme.lower()
    if scheme not in ("grpc", "http"):
        raise RemoteError(
            f"unsupported scheme {scheme!r} in {address!r}; use grpc://host:port or http://host:port"
        )
    host, colon, port = rest.rstrip("/").rpartition(":")
    if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535 or "/" in rest.rstrip("/"):
        raise RemoteError(
            f"address {address!r} needs a host and a port, e.g. 127.0.0.1:8001 or http://host:8000"
        )
    return scheme, f"{host}:{port}"


def result_from_dict(d: dict[str, Any]) -> GenerationResult:
    """The GenerationResult whose to_dict() is `d` (the server's result_json)."""
    try:
        return GenerationResult(
            text=d["text"],
            token_ids=tuple(int(t) for t in d["token_ids"]),
            visual_tokens=MappingProxyType(
                {k: (tuple(v) if isinstance(v, list) else v) for k, v in d["visual_tokens"].items()}
            ),
            budget=MappingProxyType(dict(d["budget"])),
            timings_ms=MappingProxyType(dict(d["timings_ms"])),
            provider=d["provider"],
            quant=d.get("quant", "none"),
            selector=d.get("selector", "hired"),
        )
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise RemoteError(
            f"the server's result_json lacks a field or has a wrong type ({e!r}); versions differ?"
        ) from None


class RemotePipeline:
    """`generate` of a served bundle; same signature and result as `Pipeline.generate`."""

    def __init__(
        self,
        address: str,
        *,
        model: str = MODEL_NAME,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        check: bool = True,
    ):
        """address: "host:port" (gRPC), "grpc://host:port" or "http://host:port". `max_pixels` limits images
        decoded here (the server applies its own limit too). With `check`, fail now if the model is not ready."""
        self.protocol, self.url = parse_address(address)
        self.address = f"{self.protocol}://{self.url}"
        self.model = model
        self.timeout_s = float(timeout_s)
        self.max_pixels = max_pixels
        self._local = threading.local()
        self._clients: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False
        if self.protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
        self._tc = tc
        if check:
            self.check_ready()

    # ---- public API ---------------------------------------------------------------------------------
    def generate(self, image, prompt: str, **options) -> GenerationResult:
        """image: path, bytes, PIL image or uint8 array HxW/HxWx3/HxWx4; `options` are RequestOptions' keywords
        (budget, alpha, distribution, newlines, max_new_tokens, ..., color); None takes the bundle's defaults."""
        checked = RequestOptions.from_kwargs(**options)  # the local Pipeline's checks, errors and messages
        if not isinstance(prompt, str):  # the message runtime.prompt gives locally; only str travels as BYTES
            raise PromptError(f"prompt must be a string, got {type(prompt).__name__}")
        options = {name: getattr(checked, name) for name in options if name in WIRE_OPTIONS}
        inputs = [self._image_input(image, checked.color)]
        inputs.append(self._bytes_input("prompt", prompt.encode("utf-8", "surrogatepass")))
        inputs.append(self._bytes_input("options", encode_options(options)))
        result = self._infer(inputs, ["result_json", "error"])
        error = _first_bytes(result, "error")
        if error:
            raise parse_error(error.decode("utf-8", "replace"))
        try:
            data = json.loads(_first_bytes(result, "result_json"))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
            raise RemoteError(
                f"the server's result_json is not JSON ({e}); is {self.address} a hired server?"
            ) from None
        return result_from_dict(data)

    generate.__signature__ = _generate_signature()

    def check_ready(self) -> None:
        """Raise RemoteError unless the server is live and the model is ready."""
        try:
            ready = self._client().is_model_ready(self.model)
        except Exception as e:
            raise RemoteError(self._unreachable(e)) from None
        if not ready:
            raise RemoteError(
                f"{self.address} answers but model {self.model!r} is not ready: still loading (wait for "
                "`python -m serving` to print 'serving') or stopping (send it to another server); see its log"
            )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            clients, self._clients = self._clients, []
        for c in clients:
            try:
                c.close()
            except Exception:
                pass

    def __enter__(self) -> RemotePipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemotePipeline({self.address!r}, model={self.model!r})"

    # ---- transport ----------------------------------------------------------------------------------
    def _client(self):
        if self._closed:
            raise HiredError("this RemotePipeline is closed; make a new one")
        if self.protocol == "grpc":  # thread-safe: one for all threads
            with self._lock:
                if not self._clients:
                    self._clients.append(self._tc.InferenceServerClient(self.url))
                return self._clients[0]
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._tc.InferenceServerClient(
                self.url, connection_timeout=min(self.timeout_s, 10.0), network_timeout=self.timeout_s
            )
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def _image_input(self, image, color: str):
        if isinstance(image, bytes | bytearray | memoryview) and color == "rgb":
            data = image.tobytes() if isinstance(image, memoryview) else bytes(image)
            return self._bytes_input("image_bytes", data)
        rgb = load_image(image, color=color, max_pixels=self.max_pixels)  # uint8 [H, W, 3]
        tensor = self._tc.InferInput("image", [1, *rgb.shape], "UINT8")
        self._set(tensor, np.ascontiguousarray(rgb)[None])
        return tensor

    def _bytes_input(self, name: str, value: bytes):
        tensor = self._tc.InferInput(name, [1, 1], "BYTES")
        self._set(tensor, np.array([[value]], dtype=object))
        return tensor

    def _set(self, tensor, array: np.ndarray) -> None:
        if self.protocol == "http":
            tensor.set_data_from_numpy(array, binary_data=True)
        else:
            tensor.set_data_from_numpy(array)

    def _infer(self, inputs, output_names: list[str]):
        tc = self._tc
        if self.protocol == "http":
            outputs = [tc.InferRequestedOutput(n, binary_data=True) for n in output_names]
        else:
            outputs = [tc.InferRequestedOutput(n) for n in output_names]
        client = self._client()
        try:
            if self.protocol == "grpc":
                return client.infer(self.model, inputs, outputs=outputs, client_timeout=self.timeout_s)
            return client.infer(self.model, inputs, outputs=outputs)
        except Exception as e:
            raise RemoteError(self._unreachable(e)) from None

    def _unreachable(self, e: BaseException) -> str:
        """One line for a transport failure: unreachable (refused, timed out) or refused by Triton."""
        from tritonclient.utils import InferenceServerException

        if isinstance(e, InferenceServerException):
            status, detail = str(e.status() or ""), e.message() or str(e)
            if any(s in status for s in ("UNAVAILABLE", "DEADLINE_EXCEEDED")):
                head = f"cannot reach {self.address} ({detail})"
            else:
                head = f"{self.address} refused the request ({detail})"
        else:
            head = f"cannot reach {self.address} ({type(e).__name__}: {e})"
        head = " ".join(head.split())[:400]
        return f"{head}; is `python -m serving` running there with model {self.model!r}?"


def _first_bytes(result, name: str) -> bytes:
    array = result.as_numpy(name)
    if array is None or array.size == 0:
        raise RemoteError(f"the server's answer has no {name!r} output; is it a hired server?")
    value = array.reshape(-1)[0]
    return value if isinstance(value, bytes) else bytes(value)


__all__ = ["RemotePipeline", "parse_address", "result_from_dict"]
