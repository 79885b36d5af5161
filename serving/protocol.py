"""The wire protocol of the Triton model `hired`: its tensors, request rows -> generate() calls, outcomes -> tensors.

    from serving.protocol import INPUTS, answer_requests
    outputs = answer_requests(pipe.generate, [request.data for request in requests])   # one dict per request

Pure (numpy, runtime's errors and request options): shared by the PyTriton server (serving.triton_server), the
Triton repository's Python-backend entry point (serving.triton_repo copies it there) and the client
(serving.remote). Every malformed request becomes one of runtime's typed one-line errors, the one the local
Pipeline raises for the same input, never an exception of this module.

The model `hired` (Triton's KServe v2 protocol; max_batch_size > 0, so every tensor has a leading batch dim):
  inputs   image          UINT8  [-1, -1, 3]  RGB, channels last        } exactly one of the two
           image_bytes    BYTES  [1]          an encoded PNG/JPEG/...   }
           prompt         BYTES  [1]          UTF-8 text
           options        BYTES  [1]          optional JSON object of generate() keywords (RemotePipeline sends this)
           one optional plain tensor per wire option, for plain tritonclient users: budget, alpha, temperature,
           top_p FP64 [1]; max_new_tokens, min_new_tokens INT32 [1]; seed INT64 [1]; distribution, newlines
           BYTES [1]
  outputs  text BYTES [1]; token_ids INT64 [-1] (-1 pads rows of a multi-row request); visual_tokens_kept,
           visual_tokens_before INT32 [1]; result_json BYTES [1] (GenerationResult.to_dict() as JSON);
           error BYTES [1]: "" when ok, else "<ErrorClass>: <message>" of runtime.errors (ImageError, ...)
Floats are FP64 so that budget=0.3 arrives as 0.3 and the server computes what the local Pipeline computes.
The wire options are runtime.options.RequestOptions' fields but `color`: the image tensor is RGB by definition,
so a client converts BGR camera frames before sending (RemotePipeline does, from its own `color=`).
"""

from __future__ import annotations

import json
import logging
import numbers
import re
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from runtime import errors as _errors
from runtime.errors import GenerationError, HiredError, ImageError, PromptError, RemoteError
from runtime.options import RequestOptions

log = logging.getLogger("hired_edge.serving")

MODEL_NAME = "hired"
CLIENT_OPTIONS = ("color",)  # applied by the client before sending; the image tensor is always RGB
WIRE_OPTIONS = tuple(name for name in RequestOptions.names() if name not in CLIENT_OPTIONS)
MAX_OPTIONS_BYTES = 1 << 20  # an options object is a few dozen bytes; 1 MiB is far more than any real one
MAX_OPTION_DEPTH = 32  # JSON nesting kept from the parser (whose recursion a deeper document would exhaust)
_COUNT_OPTIONS = ("max_new_tokens", "min_new_tokens")  # INT32 tensors, as plain clients have always sent them


@dataclass(frozen=True)
class WireTensor:
    """One input or output tensor of the `hired` model; dims exclude the batch dim."""

    name: str
    dtype: str  # Triton's name: UINT8, BYTES, FP64, INT32, INT64
    dims: tuple[int, ...]
    optional: bool = False


def _option_dtype(name: str) -> str:
    """The Triton type of an option's plain tensor, from RequestOptions' annotation (float, int or str)."""
    kind = str({f.name: f.type for f in fields(RequestOptions)}[name]).split("|")[0].strip()
    if kind == "int":
        return "INT32" if name in _COUNT_OPTIONS else "INT64"
    return {"float": "FP64", "str": "BYTES"}[kind]


INPUTS = (
    WireTensor("image", "UINT8", (-1, -1, 3), optional=True),
    WireTensor("image_bytes", "BYTES", (1,), optional=True),
    WireTensor("prompt", "BYTES", (1,)),
    WireTensor("options", "BYTES", (1,), optional=True),
    *(WireTensor(name, _option_dtype(name), (1,), optional=True) for name in WIRE_OPTIONS),
)
OUTPUTS = (
    WireTensor("text", "BYTES", (1,)),
    WireTensor("token_ids", "INT64", (-1,)),
    WireTensor("visual_tokens_kept", "INT32", (1,)),
    WireTensor("visual_tokens_before", "INT32", (1,)),
    WireTensor("result_json", "BYTES", (1,)),
    WireTensor("error", "BYTES", (1,)),
)
NUMPY_DTYPES = {
    "UINT8": np.uint8,
    "BYTES": np.bytes_,
    "FP64": np.float64,
    "INT32": np.int32,
    "INT64": np.int64,
}


# ---- request rows -> generate() arguments -------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    """One generation asked for by one row of a request; `options` are checked Python values."""

    image: Any  # uint8 [H, W, 3] or encoded bytes
    prompt: str
    options: dict[str, Any]


def batch_size(data: dict[str, np.ndarray]) -> int:
    """Rows of a request: the prompt's leading dim, else any input's (a request without prompt still gets answers)."""
    for name in ("prompt", *data):
        if name in data and np.ndim(data[name]) >= 1:
            return int(np.shape(data[name])[0])
    return 1


def parse_row(data: dict[str, np.ndarray], row: int) -> Call:
    """The generate() arguments of row `row` of a request's inputs (arrays with a leading batch dim).

    Raises the typed error the local Pipeline raises for the same mistake: ImageError (no, two or an empty
    image), PromptError (no prompt, not UTF-8), GenerationError/BudgetError (bad options, as RequestOptions)."""
    has_array, has_bytes = "image" in data, "image_bytes" in data
    if has_array and has_bytes:
        raise ImageError(
            "the request has both image and image_bytes; send one image: the array or the encoded file"
        )
    if not has_array and not has_bytes:
        raise ImageError(
            "the request has no image; send image (uint8 [1, H, W, 3]) or image_bytes (a PNG/JPEG file)"
        )
    if has_array:
        image = _row(data, "image", row, ImageError)  # uint8 [H, W, 3], possibly 0 x W: load_image refuses it
    else:
        image = _bytes(_row(data, "image_bytes", row, ImageError), "image_bytes", ImageError)
    if "prompt" not in data:
        raise PromptError("the request has no prompt; send prompt (BYTES [1, 1], UTF-8 text)")
    raw_prompt = _bytes(_row(data, "prompt", row, PromptError), "prompt", PromptError)
    try:  # surrogatepass: a lone surrogate (sent by RemotePipeline) reaches the Pipeline's own PromptError
        prompt = raw_prompt.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as e:
        raise PromptError(
            f"prompt is not valid UTF-8 ({e.reason} at byte {e.start}); send UTF-8 text"
        ) from None
    options = {}
    if "options" in data:
        options = parse_options(
            _bytes(_row(data, "options", row, GenerationError), "options", GenerationError)
        )
    for key in WIRE_OPTIONS:
        if key not in data:
            continue
        if key in options:
            raise GenerationError(f"{key} was sent both as a tensor and in options; send it once")
        cell = np.asarray(_row(data, key, row, GenerationError)).reshape(-1)
        if cell.size != 1:
            raise GenerationError(f"{key} holds {cell.size} values in row {row}; send exactly one")
        value = cell[0]
        options[key] = (
            _bytes(value, key, GenerationError).decode("utf-8", "replace")
            if cell.dtype.kind in "SOU"
            else value.item()
        )
    checked = RequestOptions.from_kwargs(**options)  # the Pipeline's own checks and messages, Python numbers
    return Call(image=image, prompt=prompt, options={k: getattr(checked, k) for k in options})


def _row(data: dict[str, np.ndarray], name: str, row: int, error: type[HiredError]) -> Any:
    array = data[name]
    rows = np.shape(array)[0] if np.ndim(array) else 0
    if row >= rows:
        raise error(f"{name} has {rows} row(s) but the request has {row + 1}; send one {name} per row")
    return array[row]


def _bytes(value: Any, name: str, error: type[HiredError]) -> bytes:
    """The bytes of one BYTES element (PyTriton hands them as np.bytes_, object arrays of bytes, or [1] arrays)."""
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise error(f"{name} holds {value.size} elements; send exactly one")
        value = value.reshape(-1)[0]
    if isinstance(value, bytes):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    raise error(f"{name} must be a BYTES element, got {type(value).__name__}")


# ---- the options JSON -----------------------------------------------------------------------------------------
class _TooDeep:
    """Stands for a JSON value nested too deeply to parse: RequestOptions refuses it like any non-number."""

    def __init__(self, depth: int):
        self.depth = depth

    def __repr__(self) -> str:
        return f"a JSON value nested over {self.depth} levels deep"


def parse_options(text: bytes) -> dict[str, Any]:
    """The options object of a request; GenerationError (or the option's own error) for anything else.

    Integers of any length are read exactly (5,000 digits is past Python's str->int limit); nesting deeper than
    MAX_OPTION_DEPTH is never handed to the recursive JSON parser."""
    if len(text) > MAX_OPTIONS_BYTES:
        raise GenerationError(
            f"options is {len(text)} bytes, over the {MAX_OPTIONS_BYTES}-byte limit; send a small JSON object "
            'such as {"budget": 0.2}'
        )
    if not text.strip():
        return {}
    try:
        source = text.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GenerationError(
            f"options is not valid UTF-8 ({e.reason} at byte {e.start}); send UTF-8 JSON"
        ) from None
    too_deep = _too_deep_key(source)
    if too_deep is not None:
        key, depth = too_deep
        if key is None:
            raise GenerationError(
                f'options nests over {depth} levels deep; send a flat JSON object such as {{"budget": 0.2}}'
            )
        if key not in WIRE_OPTIONS:
            _refuse_unknown([key])
        RequestOptions.from_kwargs(**{key: _TooDeep(depth)})  # raises the option's own error
        raise GenerationError(f"option {key} is nested over {depth} levels deep; send a number or a string")
    try:
        options = json.loads(source, parse_int=_parse_int)
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        raise GenerationError(
            f'options is not valid JSON ({str(e)[:120]}); send a JSON object such as {{"budget": 0.2}}'
        ) from None
    if not isinstance(options, dict):
        raise GenerationError(f"options must be a JSON object, got {type(options).__name__}")
    _refuse_unknown(options)
    return options


def _refuse_unknown(keys) -> None:
    local = sorted(set(keys) & set(CLIENT_OPTIONS))
    if local:
        raise GenerationError(
            f"{', '.join(local)} is not a wire option: the image tensor is RGB; convert BGR frames before sending "
            "(RemotePipeline does, from its own color=)"
        )
    unknown = sorted(set(keys) - set(WIRE_OPTIONS))
    if unknown:
        shown = ", ".join(k if len(k) <= 40 else k[:37] + "..." for k in unknown[:5])
        raise GenerationError(f"unknown option(s) {shown}; the options are {', '.join(WIRE_OPTIONS)}")


def _parse_int(digits: str) -> int:
    """int() of a JSON integer of any length (int() alone refuses more than 4,300 digits)."""
    sign, digits = (-1, digits[1:]) if digits.startswith("-") else (1, digits)
    value = 0
    for i in range(0, len(digits), 4000):
        chunk = digits[i : i + 4000]
        value = value * 10 ** len(chunk) + int(chunk)
    return sign * value


_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}:]')  # a whole string, or a bracket or colon outside one


def _too_deep_key(source: str) -> tuple[str | None, int] | None:
    """(top-level key, MAX_OPTION_DEPTH) of the first value nested deeper than MAX_OPTION_DEPTH, else None.

    A linear scan of brackets outside strings; the key is None when the document itself is the deep value."""
    depth, key, last_string = 0, None, None
    for match in _JSON_TOKEN.finditer(source):
        token = match.group()
        if token[0] == '"':
            last_string = token
        elif token in "[{":
            depth += 1
            if depth > MAX_OPTION_DEPTH + 1:  # the top-level object is level 1
                return key, MAX_OPTION_DEPTH
        elif token in "]}":
            depth -= 1
        elif depth == 1 and last_string is not None:  # ":" after a top-level key
            try:
                key = json.loads(last_string)
            except ValueError:
                key = last_string
    return None


def encode_options(options: dict[str, Any]) -> bytes:
    """JSON of generate() keywords: floats exact (repr round-trips), numpy scalars as Python numbers, integers of
    any length; anything else as its type name, which the server refuses with the option's usual error."""
    parts = [f"{json.dumps(str(key))}:{_json_value(value)}" for key, value in options.items()]
    return ("{" + ",".join(parts) + "}").encode("utf-8", "surrogatepass")


def _json_value(value: Any) -> str:
    if value is None or isinstance(value, bool | str):
        return json.dumps(value)
    if isinstance(value, numbers.Integral):
        return _decimal(int(value))
    if isinstance(value, numbers.Real):
        return json.dumps(float(value), allow_nan=True)
    return json.dumps(f"<{type(value).__name__}>")


def _decimal(n: int) -> str:
    """str(n) for any size (str() alone refuses more than 4,300 digits)."""
    if abs(n) < 10**4000:
        return str(n)
    high, low = divmod(abs(n), 10**4000)
    return ("-" if n < 0 else "") + _decimal(high) + str(low).zfill(4000)


# ---- errors ---------------------------------------------------------------------------------------------------
def format_error(exc: BaseException) -> str:
    """'ImageError: <message>' for the runtime's typed errors (a subclass travels as its runtime.errors base);
    anything else is a RemoteError naming the bug."""
    if isinstance(exc, HiredError):
        for cls in type(exc).__mro__:
            if getattr(_errors, cls.__name__, None) is cls:
                return f"{cls.__name__}: {exc}"
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return (
        f"RemoteError: the server failed on this request ({type(exc).__name__}: {first}); see the server log"
    )


def parse_error(text: str) -> HiredError:
    """The typed error of an `error` output: the same class and message as the server raised."""
    name, sep, message = text.partition(": ")
    cls = getattr(_errors, name, None) if sep else None
    if isinstance(cls, type) and issubclass(cls, HiredError):
        return cls(message)
    return RemoteError(f"the server answered an unknown error: {text}")


# ---- outcomes -> output tensors ---------------------------------------------------------------------------------
def encode_outcomes(outcomes: Sequence[Any]) -> dict[str, np.ndarray]:
    """Output tensors of one request from its rows' outcomes (GenerationResult or exception), batch dim first."""
    n = len(outcomes)
    ok = [o for o in outcomes if not isinstance(o, BaseException)]
    width = max([1, *(len(o.token_ids) for o in ok)])  # PyTriton cannot send a zero-size tensor: -1 pads
    out = {
        "text": np.empty((n, 1), dtype=object),
        "token_ids": np.full((n, width), -1, dtype=np.int64),
        "visual_tokens_kept": np.zeros((n, 1), dtype=np.int32),
        "visual_tokens_before": np.zeros((n, 1), dtype=np.int32),
        "result_json": np.empty((n, 1), dtype=object),
        "error": np.empty((n, 1), dtype=object),
    }
    for i, o in enumerate(outcomes):
        if isinstance(o, BaseException):
            out["text"][i, 0] = out["result_json"][i, 0] = b""
            out["error"][i, 0] = format_error(o).encode("utf-8", "replace")
            continue
        out["text"][i, 0] = o.text.encode("utf-8")
        out["token_ids"][i, : len(o.token_ids)] = o.token_ids
        out["visual_tokens_kept"][i, 0] = o.visual_tokens["kept"]
        out["visual_tokens_before"][i, 0] = o.visual_tokens["before"]
        out["result_json"][i, 0] = json.dumps(o.to_dict(), separators=(",", ":")).encode("utf-8")
        out["error"][i, 0] = b""
    return out


def run_call(generate: Callable[..., Any], data: dict[str, np.ndarray], row: int) -> Any:
    """One row through `generate` (Pipeline.generate); returns the GenerationResult or the exception raised."""
    try:
        call = parse_row(data, row)
        return generate(call.image, call.prompt, **call.options)
    except HiredError as e:
        return e
    except Exception as e:  # a bug, not bad input: keep serving, tell the client, log the traceback here
        log.error("request failed:\n%s", traceback.format_exc())
        return e


def answer_requests(
    generate: Callable[..., Any], requests: Sequence[dict[str, np.ndarray]], executor: Executor | None = None
) -> list[dict[str, np.ndarray]]:
    """Output dicts for a group of requests; every row is its own generate() call, run on `executor` if given."""
    rows = [(r, i) for r, data in enumerate(requests) for i in range(batch_size(data))]
    if executor is None:
        outcomes = [run_call(generate, requests[r], i) for r, i in rows]
    else:
        futures = [executor.submit(run_call, generate, requests[r], i) for r, i in rows]
        outcomes = [f.result() for f in futures]
    per_request: list[list[Any]] = [[] for _ in requests]
    for (r, _), outcome in zip(rows, outcomes):
        per_request[r].append(outcome)
    return [encode_outcomes(o) for o in per_request]


__all__ = [
    "CLIENT_OPTIONS",
    "INPUTS",
    "MODEL_NAME",
    "OUTPUTS",
    "WIRE_OPTIONS",
    "Call",
    "WireTensor",
    "answer_requests",
    "batch_size",
    "encode_options",
    "encode_outcomes",
    "format_error",
    "parse_error",
    "parse_options",
    "parse_row",
    "run_call",
]
