"""The `/v1/chat/completions` request: pydantic schema, OpenAI's neutral fields, and the translation to a runtime call.

    req = parse_request(json_bytes)        # -> ChatRequest, or APIError(400) naming the field
    call = to_call(req, allow=ImagePolicy(...))   # -> Call(image source or None, prompt str | Chat, options, stop, ...)

The HiRED extra-body object `hired` takes exactly the request options of runtime.options.RequestOptions that are
neither sampling nor image options (today budget, alpha, distribution, newlines), checked by RequestOptions itself.
Fields of OpenAI's API that this server does not implement are accepted at their neutral values only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

from hired import HiredConfig
from runtime.errors import HiredError
from runtime.options import RequestOptions, SamplingConfig
from runtime.prompt import Chat

# The `hired` object's keys: the request options that are not sampling options and not how arrays are read.
HIRED_KEYS = tuple(
    n for n in RequestOptions.names() if n not in {f.name for f in fields(SamplingConfig)} | {"color"}
)
MAX_STOP = 4


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):  # fmt: skip
        super().__init__(" ".join(str(message).split()))
        self.status, self.type, self.param, self.code = status, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ---- schema ---------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ImageURL(_Strict):
    url: StrictStr
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(_Strict):
    role: StrictStr
    content: StrictStr | list[dict[str, Any]] | None = None
    name: StrictStr | None = None


class StreamOptions(_Strict):
    include_usage: StrictBool | None = None
    include_obfuscation: StrictBool | None = None


Number = StrictInt | StrictFloat


class ChatRequest(_Strict):
    model: StrictStr | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    hired: dict[str, Any] | None = None
    # OpenAI fields accepted at their neutral values only (NEUTRAL below)
    frequency_penalty: Number | None = None
    presence_penalty: Number | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    response_format: dict[str, Any] | None = None
    logit_bias: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[StrictStr] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    store: StrictBool | None = None
    service_tier: StrictStr | None = None
    user: StrictStr | None = None
    metadata: dict[str, Any] | None = None
    safety_identifier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None


# field -> the values at which it changes nothing here (None = absent is always neutral)
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "response_format": ({"type": "text"},),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none", "auto"),
    "functions": ([],),
    "function_call": ("none", "auto"),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "reasoning_effort": (),
    "verbosity": (),
    "web_search_options": (),
    "store": (False,),
}


def parse_request(body: bytes) -> ChatRequest:
    """The JSON body as a ChatRequest; any malformed or unimplemented field is a 400 naming it."""
    try:
        req = ChatRequest.model_validate_json(body)  # parsed and checked in one pass (pydantic-core)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "json_invalid":
            raise bad_request(f"the request body is not valid JSON ({err['msg']})") from None
        if err["type"] == "model_type" and not loc:
            raise bad_request("the request body must be a JSON object") from None
        if err["type"] == "extra_forbidden":
            raise bad_request(f"unrecognized request argument supplied: {loc}", param=loc) from None
        raise bad_request(f"{loc}: {err['msg']}", param=loc or None) from None
    for name, neutral in NEUTRAL.items():
        value = getattr(req, name)
        if value is not None and value not in neutral:
            raise bad_request(
                f"{name}={_short(value)} is not supported by this server"
                + (f" (only {', '.join(_short(v) for v in neutral)})" if neutral else " (leave it out)"),
                param=name,
                code="unsupported_parameter",
            )
    if req.n not in (None, 1):
        raise bad_request(f"n={req.n} is not supported; this server returns one choice (n=1)", param="n")
    return req


# ---- translation ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    """What the runtime is asked: image sources (URL strings, in order; none for text only), prompt (str or Chat)
    and options."""

    image_urls: tuple[str, ...]
    prompt: str | Chat
    options: RequestOptions
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def to_call(req: ChatRequest, hired_defaults: dict[str, Any] | None = None) -> Call:
    """The runtime call of a request. The text parts of a message are joined with a newline in order; the images
    (one or several, in message order) fill the image slot of the first image's turn, or replace the text's
    `<image>` markers when there is one per image; one user message without a system message is the plain
    `Pipeline.generate(images, text)` prompt."""
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    image_urls, image_turn = [], None
    for i, msg in enumerate(req.messages):
        where = f"messages.{i}"
        role = "system" if msg.role == "developer" else msg.role
        if role not in ("system", "user", "assistant"):
            raise bad_request(
                f"{where}.role {msg.role!r} is not supported; use system, user or assistant",
                param=f"{where}.role",
            )
        texts, urls = _content(msg.content, where, role)
        if urls and not image_urls:
            image_turn = len(turns) if not (turns and turns[-1][0] == role) else len(turns) - 1
        image_urls += urls
        text = "\n".join(texts)
        if role == "system":
            if turns:
                raise bad_request("a system message must come before the user and assistant messages", where)
            system.append(text)
        elif turns and turns[-1][0] == role:  # two user (or assistant) messages in a row: one turn
            turns[-1] = (role, turns[-1][1] + "\n" + text)
        else:
            turns.append((role, text))
    if not turns or turns[-1][0] != "user":
        raise bad_request("the last message must be a user message (the model answers it)", param="messages")
    if turns[0][0] != "user":
        raise bad_request(
            "the first message after any system message must be a user message", param="messages"
        )
    if len(turns) == 1 and not system:
        prompt: str | Chat = turns[0][1]
    else:
        try:
            prompt = Chat(tuple(turns), system="\n".join(system) if system else None, image_turn=image_turn)
        except HiredError as e:
            raise bad_request(str(e), param="messages") from None
    return Call(
        image_urls=tuple(image_urls),
        prompt=prompt,
        options=options_of(req, hired_defaults),
        stop=_stops(req.stop),
        stream=bool(req.stream),
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
    )


def options_of(req: ChatRequest, hired_defaults: dict[str, Any] | None = None) -> RequestOptions:
    """RequestOptions from the sampling fields and the `hired` object (over the server's `hired_defaults`, e.g.
    `--budget`), checked by RequestOptions."""
    if (
        req.max_tokens is not None
        and req.max_completion_tokens is not None
        and req.max_tokens != req.max_completion_tokens
    ):
        raise bad_request("max_tokens and max_completion_tokens differ; send one of them", param="max_tokens")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    hired = {**(hired_defaults or {}), **(req.hired or {})}
    unknown = sorted(set(hired) - set(HIRED_KEYS))
    if unknown:
        raise bad_request(
            f"unknown hired option(s) {', '.join(unknown)}; the options are {', '.join(HIRED_KEYS)}",
            param=f"hired.{unknown[0]}",
        )
    # absent fields take the runtime's defaults (greedy, 128 new tokens), so a bare request == Pipeline.generate
    given = {
        "max_new_tokens": max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "seed": req.seed,
    }
    sampling = {k: v for k, v in given.items() if v is not None}
    try:
        options = RequestOptions.from_kwargs(**hired, **sampling)
        options.hired_config(HiredConfig())  # the ranges of the values given (the bundle fills the others later)
        return options
    except HiredError as e:
        message = str(e)
        if message.startswith("max_new_tokens") and max_tokens is not None:  # the name this client sent
            message = ("max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens") + message[14:]
        raise bad_request(message, param=_param_of(str(e), hired)) from None


def _param_of(message: str, hired: dict) -> str | None:
    names = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed"}
    for key in hired:
        if message.startswith(key) or (key == "budget" and message.startswith("rate")):  # HiredConfig says rate
            return f"hired.{key}"
    for key, field in names.items():
        if message.startswith(key):
            return field
    return None


def _content(content, where: str, role: str) -> tuple[list[str], list[str]]:
    """(text parts, image URLs in order) of one message's content."""
    if content is None:
        if role == "assistant":
            return [""], []
        raise bad_request(f"{where}.content is missing", param=f"{where}.content")
    if isinstance(content, str):
        return [content], []
    texts, urls = [], []
    for j, part in enumerate(content):
        at = f"{where}.content.{j}"
        kind = part.get("type")
        try:
            if kind == "text":
                texts.append(TextPart.model_validate(part).text)
            elif kind == "image_url":
                if role != "user":
                    raise bad_request(f"{at}: images go in user messages only", param=at)
                urls.append(ImagePart.model_validate(part).image_url.url)
            else:
                raise bad_request(
                    f"{at}.type {kind!r} is not supported; use 'text' or 'image_url'", param=f"{at}.type"
                )
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join([at, *(str(p) for p in err["loc"])])
            raise bad_request(f"{loc}: {err['msg']}", param=loc) from None
    return texts, urls


def _stops(stop) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOP:
        raise bad_request(f"stop takes at most {MAX_STOP} strings, got {len(stops)}", param="stop")
    if any(not s for s in stops):
        raise bad_request("stop strings must not be empty", param="stop")
    return stops


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
