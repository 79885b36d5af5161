"""What answers the questions: a local bundle (`runtime.Pipeline`) or a served model (OpenAI-compatible endpoint).

    model = LocalModel("artifacts/tiny")                       # or EndpointModel("http://127.0.0.1:8080/v1")
    model.identity()                                           # what the run-config records, before any loading
    reply = model.answer(rgb, "What colour is the circle?", budget=0.2, alpha=None, max_new_tokens=16)
    reply.text, reply.kept, reply.ttft_ms, reply.alpha

Both decode greedily (temperature 0). TTFT is preprocess + vision + select + projector + prefill, the runtime's
own stage timings (as `make bench` defines it); through an endpoint, the same stages as the server reports them
in its `hired` facts (None when it reports none).
A question's own failure (an image or prompt the model refuses) raises `QuestionError`: recorded, run goes on.
Anything else (a broken bundle, an unreachable server) propagates and stops the run; it resumes later.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.eval.data import EvalError

TTFT_STAGES = ("preprocess", "vision", "select", "projector", "prefill")


class QuestionError(EvalError):
    """This question cannot be answered (its image or prompt was refused); recorded in the answers file."""


@dataclass(frozen=True)
class Reply:
    text: str
    kept: int | None  # visual tokens fed to the LLM (newline slots included)
    ttft_ms: float | None
    alpha: float | None  # the alpha the model used (the manifest's default when none was sent)


def read_image(path: Path) -> np.ndarray:
    """uint8 [H, W, 3] RGB of an image file, or QuestionError saying why not (missing, unreadable, too large)."""
    from runtime.errors import ImageError
    from runtime.image import load_image

    if not path.is_file():
        raise QuestionError(f"image not found: {path}")
    try:
        return load_image(path)
    except ImageError as err:
        raise QuestionError(f"ImageError: {err}") from None


class LocalModel:
    """A bundle folder run in this process by runtime.Pipeline (loaded on the first answer)."""

    def __init__(self, artifacts: str | Path, *, provider: str = "cpu"):
        self.artifacts = Path(artifacts)
        self.provider = provider
        self._pipeline = None
        manifest = self.artifacts / "manifest.json"
        try:
            raw = manifest.read_bytes()
            meta = json.loads(raw)
        except FileNotFoundError:
            raise EvalError(f"--artifacts {self.artifacts}: no manifest.json; export a bundle first (make export)") from None
        except (OSError, ValueError) as err:
            raise EvalError(f"--artifacts {self.artifacts}: manifest.json unreadable ({err})") from None
        self._sha = hashlib.sha256(raw).hexdigest()  # the manifest holds every file's sha256: it names the bundle
        model = meta.get("model") if isinstance(meta, dict) else None
        self.model_id = str(model.get("name")) if isinstance(model, dict) and model.get("name") else self.artifacts.name

    def identity(self) -> dict[str, Any]:
        return {"kind": "bundle", "model_id": self.model_id, "manifest_sha256": self._sha}

    @property
    def pipeline(self):
        if self._pipeline is None:
            from runtime import Pipeline

            self._pipeline = Pipeline.load(self.artifacts, provider=self.provider)
        return self._pipeline

    def default_alpha(self) -> float:
        return float(self.pipeline.defaults.alpha)

    def answer(self, image: np.ndarray, prompt: str, *, budget: float, alpha: float | None,
               max_new_tokens: int, path: Path | None = None, selector: str = "hired",
               seed: int | None = None) -> Reply:  # fmt: skip
        """`image`: the question's picture as read_image returned it (`path`, its file, is not needed here)."""
        from runtime.errors import ImageError, PromptError

        try:
            r = self.pipeline.generate(image, prompt, budget=budget, alpha=alpha, max_new_tokens=max_new_tokens,
                                       temperature=0.0, selector=selector, seed=seed)  # fmt: skip
        except (ImageError, PromptError) as err:
            raise QuestionError(f"{type(err).__name__}: {err}") from None
        ttft = sum(float(r.timings_ms[k]) for k in TTFT_STAGES)
        return Reply(r.text, int(r.visual_tokens["kept"]), round(ttft, 3), float(r.budget["alpha"]))

    def close(self) -> None:
        if self._pipeline is not None:
            self._pipeline.close()
            self._pipeline = None


class EndpointModel:
    """A model served behind an OpenAI-compatible `/v1/chat/completions` (`python -m serving.openai`).

    The budget and alpha go in the HiRED extra-body object `hired`; the reply's `hired` facts give the kept tokens
    and stage timings. The API key, when the server wants one, comes from $HIRED_API_KEY or $OPENAI_API_KEY."""

    def __init__(self, url: str, *, model: str | None = None, timeout_s: float = 600.0):
        try:
            import openai
        except ImportError:
            raise EvalError("--endpoint needs the openai client: pip install openai") from None
        self._openai = openai
        self.url = url.rstrip("/")
        key = os.environ.get("HIRED_API_KEY") or os.environ.get("OPENAI_API_KEY") or "none"
        self.client = openai.OpenAI(base_url=self.url, api_key=key, timeout=timeout_s, max_retries=0)
        try:
            models = [m.id for m in self.client.models.list()]
        except openai.APIError as err:
            raise EvalError(f"--endpoint {self.url}: cannot list models ({type(err).__name__}: {err})") from None
        if model is None and not models:
            raise EvalError(f"--endpoint {self.url}: the server lists no model")
        self.model_id = model or models[0]

    def identity(self) -> dict[str, Any]:
        return {"kind": "endpoint", "model_id": self.model_id, "url": self.url}

    def default_alpha(self) -> float | None:
        return None

    def answer(self, image: np.ndarray, prompt: str, *, budget: float, alpha: float | None,
               max_new_tokens: int, path: Path | None = None, selector: str = "hired",
               seed: int | None = None) -> Reply:  # fmt: skip
        """Sends the image file's own bytes (`path`) as a data URL, or `image` encoded as PNG without a path."""
        url = _data_url(image, path)
        hired = {"budget": budget} | ({} if alpha is None else {"alpha": alpha})
        if selector != "hired":  # servers that predate selectors still take HiRED requests
            hired["selector"] = selector
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]
        try:
            resp = self.client.chat.completions.create(
                model=self.model_id, messages=[{"role": "user", "content": content}], max_tokens=max_new_tokens,
                temperature=0.0, extra_body={"hired": hired}, **({} if seed is None else {"seed": seed}),
            )  # fmt: skip
        except self._openai.BadRequestError as err:  # this question was refused (image, prompt): record it
            raise QuestionError(f"endpoint refused the request: {_api_message(err)}") from None
        except self._openai.APIError as err:
            raise EvalError(f"--endpoint {self.url}: {type(err).__name__}: {_api_message(err)}") from None
        text = resp.choices[0].message.content or ""
        facts = _hired_facts(resp)
        kept, ttft, used_alpha = _read_facts(facts)
        return Reply(text, kept, None if ttft is None else round(ttft, 3), used_alpha)

    def close(self) -> None:
        self.client.close()


def _data_url(image: np.ndarray, path: Path | None) -> str:
    """data:image/...;base64 URL of the file as it is on disk (PNG re-encoding of `image` when unknown)."""
    from PIL import Image

    if path is not None:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            media = Image.MIME.get(im.format or "", "")
        if media.startswith("image/"):
            return f"data:{media};base64," + base64.b64encode(data).decode("ascii")
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _api_message(err) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(err)


def _hired_facts(resp) -> dict:
    """The reply's `hired` object (an extra field the openai client keeps in model_extra), or {}."""
    facts = (getattr(resp, "model_extra", None) or {}).get("hired")
    if facts is None:
        facts = getattr(resp, "hired", None)
    return facts if isinstance(facts, dict) else {}


def _read_facts(facts: dict) -> tuple[int | None, float | None, float | None]:
    """(kept visual tokens, TTFT ms, alpha) from a `hired` facts object shaped like GenerationResult.to_dict()."""
    vt = facts.get("visual_tokens")
    kept = vt.get("kept") if isinstance(vt, dict) else facts.get("kept")
    tm = facts.get("timings_ms")
    ttft = facts.get("ttft_ms")
    if ttft is None and isinstance(tm, dict) and all(k in tm for k in TTFT_STAGES):
        ttft = sum(float(tm[k]) for k in TTFT_STAGES)
    budget = facts.get("budget")
    alpha = budget.get("alpha") if isinstance(budget, dict) else facts.get("alpha")
    return (
        int(kept) if isinstance(kept, int | float) else None,
        float(ttft) if isinstance(ttft, int | float) else None,
        float(alpha) if isinstance(alpha, int | float) else None,
    )
