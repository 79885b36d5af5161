"""The latency governor behind budget="auto": per request, the largest rate in [min_budget, 1.0] whose predicted
time to first token meets the request's target_ttft_ms, from a small cost model kept per Pipeline.

    gov = Governor(manifest, provider, min_budget=0.05)     # reads ~/.cache/hired-edge/governor/<bundle>-<provider>.json
    choice = gov.choose(layouts, cfg, text_tokens=40, target_ms=300, spent_ms=12.0, max_prompt=8000)
    gov.observe(n_images=5, span=602, prompt_tokens=650, timings_s=req.timings)      # after every request

TTFT = preprocess + vision + select + projector + prefill (as bench.eval and GenerationResult.timings_ms count it).
At decision time the request's own preprocessing has run: its measured time (`spent_ms`) is used as is. A request
of several images gets one rate for all of them (n and the span below are its images' sums). The rest, in
milliseconds, is model x k:
- model: vision + select linear in the partition count n (proportional while one count was seen), projector linear
  in the visual span, prefill a polynomial of the prompt length L (text tokens + span; degree 2 when three or more
  lengths were seen, else 1, the lower degree when a fit is not increasing over [0, L_max]). Each is a weighted
  least-squares fit over the last MAX_SAMPLES requests, recent ones weighted more (half weight every HALF_LIFE
  requests), refit with Huber weights so that a request slowed by a burst of load moves it little.
- k, the self-calibrating safety factor: the RATIO_QUANTILE quantile of measured / model over the last
  RATIO_WINDOW requests with an image, against the model as it is now (so a change the fits have taken in is not
  counted twice), weighted by recency (half weight every RATIO_HALF_LIFE requests). It absorbs the model's bias,
  the spread of the measurements and the machine's current load faster than the fits do (up within about two
  requests, down within about six); it is 1 until such a request was seen.
The span a rate gives is runtime.visual.span_bound's (exact for the spatial distribution; an upper bound with
newlines="rows"), so the prediction is monotone in the rate and the choice monotone in the target. Rates whose
prompt + max_new_tokens would not fit the context are never chosen (`max_prompt`). Calibration (`Pipeline.
calibrate`, or lazily on the first auto request) runs the image at CALIBRATION_RATES and the prompt without it,
one new token each, so the prefill fit spans a text-only prompt to the stock span; the model is then updated from
every request and cached per bundle (manifest sha256) and provider in the user's cache folder; a corrupt or
foreign cache is ignored with one warning line and rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hired import AnyresLayout, HiredConfig
from runtime.errors import GenerationError, PromptError
from runtime.visual import span_bound

log = logging.getLogger("hired_edge")

CACHE_FORMAT = "hired-edge-governor/2"
# calibration: the image at these rates, then the prompt alone; on fresh sessions the first run pays their
# warm-up, so it is dropped and run again last
CALIBRATION_RATES = (0.1, 1.0, 0.5)
MAX_SAMPLES = 48  # recent (x, ms) points the fits use
HALF_LIFE = 16.0  # requests after which a point weighs half as much in the fits
HUBER = 1.345  # Huber's constant, in robust standard deviations (1.4826 x the median absolute residual)
RATIO_WINDOW = 12  # recent measured / model ratios k is taken from
RATIO_QUANTILE = 0.75  # k: this quantile of them, weighted by recency:
RATIO_HALF_LIFE = 4.0  # the newest holds < 1 - RATIO_QUANTILE of the weight, so one slow request alone cannot set k
TEXT_ONLY_PROMPT = "Describe the image."  # calibration's run without an image (a plain prompt, no markers)
RATE_STEP = 0.005  # the candidate rates: min_budget, min_budget + step, ..., 1.0
SAVE_EVERY = 8  # observations between cache writes
MODEL_STAGES = ("vision", "projector", "prefill")  # vision includes select


@dataclass(frozen=True)
class Choice:
    """The governor's answer for one request."""

    rate: float
    predicted_ms: float
    reachable: bool  # False: even min_budget is predicted over the target (the request runs at min_budget)
    capped: bool = False  # True: a higher rate was predicted in time but would not fit the context


def cache_folder() -> Path:
    """$XDG_CACHE_HOME/hired-edge/governor, else ~/.cache/hired-edge/governor."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hired-edge" / "governor"


def bundle_key(manifest) -> str:
    """sha256 of the bundle's manifest.json (of its files' hashes when the manifest was built in memory)."""
    root = getattr(manifest, "root", None)
    if root is not None and (Path(root) / "manifest.json").is_file():
        return hashlib.sha256((Path(root) / "manifest.json").read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(dict(manifest.sha256), sort_keys=True).encode()).hexdigest()


def visual_span(layout: AnyresLayout, cfg: HiredConfig, rate: float) -> int:
    """Visual tokens fed to the LLM at `rate` (runtime.visual.span_bound of `cfg` at that rate)."""
    return span_bound(layout, dataclasses.replace(cfg, rate=float(rate)))


def spans_at(layouts: Sequence[AnyresLayout], cfg: HiredConfig, rates: np.ndarray) -> np.ndarray:
    """float64 [len(rates)]: a request's visual tokens at each rate (one rate for all its images of `layouts`)."""
    return np.array([sum(visual_span(layout, cfg, float(r)) for layout in layouts) for r in rates], dtype=np.float64)


def partitions(layouts: Sequence[AnyresLayout]) -> int:
    """Partitions (base images + crops) the vision graph runs for a request's images of `layouts`."""
    return sum(layout.n_images for layout in layouts)


def recency_weights(n: int, half_life: float = HALF_LIFE) -> np.ndarray:
    """[n] weights of points oldest first: the newest 1, halving every `half_life` points back."""
    return 0.5 ** (np.arange(n - 1, -1, -1, dtype=np.float64) / half_life)


def robust_polyfit(xs: np.ndarray, ys: np.ndarray, degree: int, weights: np.ndarray, rounds: int = 4) -> np.ndarray:
    """Weighted least squares [degree + 1] (highest first), refit `rounds` times with Huber weights on the
    residuals (scale: 1.4826 x their median absolute value)."""
    w = weights.copy()
    coef = np.polyfit(xs, ys, degree, w=np.sqrt(w))
    for _ in range(rounds):
        resid = np.abs(ys - np.polyval(coef, xs))
        scale = 1.4826 * float(np.median(resid))
        if scale <= 1e-9 * max(1.0, float(np.abs(ys).max())):
            break
        w = weights * np.minimum(1.0, HUBER * scale / np.maximum(resid, 1e-12))
        coef = np.polyfit(xs, ys, degree, w=np.sqrt(w))
    return coef


def fit_increasing(points: list[tuple[float, float]], max_degree: int, x_max: float,
                   weights: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """Polynomial coefficients (highest first) of ms against x, non-decreasing on [0, x_max]: the highest degree
    <= max_degree whose robust weighted fit (robust_polyfit) is; else the proportional fit ms = x * the weighted
    median of ms / x. `weights` default to recency_weights."""
    xs = np.array([p[0] for p in points], dtype=np.float64)
    ys = np.array([p[1] for p in points], dtype=np.float64)
    w = recency_weights(len(points)) if weights is None else np.asarray(weights, dtype=np.float64)
    for degree in range(min(max_degree, len(np.unique(xs)) - 1), 0, -1):
        coef = robust_polyfit(xs, ys, degree, w)
        slope = np.polyder(coef)
        if np.polyval(slope, 0.0) >= 0 and np.polyval(slope, x_max) >= 0:
            return coef
    keep = xs > 0
    if not keep.any():
        return np.array([0.0, 0.0])
    return np.array([weighted_quantile(ys[keep] / xs[keep], w[keep]), 0.0])


def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float = 0.5) -> float:
    """The value where the sorted values' cumulative weight reaches q x the total."""
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][min(int(np.searchsorted(cum, q * cum[-1])), len(cum) - 1)])


class Governor:
    """The cost model of one Pipeline (bundle + provider); thread-safe."""

    def __init__(self, manifest, provider: str, *, min_budget: float = 0.05, folder: Path | None = None):
        if isinstance(min_budget, bool) or not isinstance(min_budget, int | float) or not 0 < min_budget <= 1:
            raise ValueError(f"min_budget must be a number in (0, 1], got {min_budget!r}")
        self.min_budget = float(min_budget)
        self.bundle = bundle_key(manifest)
        self.provider = provider
        self.max_length = int(manifest.text.max_position_embeddings)
        self.path = (folder or cache_folder()) / f"{self.bundle[:16]}-{provider.replace(',', '+')}.json"
        self.lock = threading.Lock()  # model state
        self.calibrating = threading.Lock()  # one calibration at a time
        self.preprocess: dict[int, float] = {}  # per partition count: the last measured ms (when none is given)
        self.vision: list[tuple[float, float]] = []  # (partitions, vision + select ms)
        self.projector: list[tuple[float, float]] = []  # (span, ms)
        self.prefill: list[tuple[float, float]] = []  # (prompt length, ms)
        self.recent: list[tuple[float, float, float, float]] = []  # (partitions, span, length, ms) for k
        self.last_check: dict | None = None  # the last image request's {"model": {stage: ms}, "measured": ...}
        self.observations = 0
        self.in_use = False  # set by the first auto request or calibration: only then is the cache written
        self._fits: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._load()

    # ---- state ---------------------------------------------------------------------------------------
    @property
    def calibrated(self) -> bool:
        """Enough to predict: a vision time and two distinct prompt lengths."""
        with self.lock:
            return self._calibrated()

    def _calibrated(self) -> bool:
        return bool(self.vision) and len({x for x, _ in self.prefill}) >= 2

    @property
    def safety(self) -> float:
        """k: the recency-weighted RATIO_QUANTILE quantile of the recent measured / model ratios (1.0 before any)."""
        with self.lock:
            return self._safety()

    @property
    def ratios(self) -> list[float]:
        """measured / model (vision + select + projector + prefill) of the last RATIO_WINDOW image requests."""
        with self.lock:
            return self._ratios()

    def _ratios(self) -> list[float]:
        if not self._calibrated():
            return []
        out = []
        for n, span, length, ms in self.recent:
            model = sum(float(v[0]) for v in self._stages(int(n), np.array([span]), length - span).values())
            if model > 0:
                out.append(ms / model)
        return out

    def _safety(self) -> float:
        ratios = np.array(self._ratios())
        if not ratios.size:
            return 1.0
        return weighted_quantile(ratios, recency_weights(ratios.size, RATIO_HALF_LIFE), RATIO_QUANTILE)

    def reset(self) -> None:
        """Forget every measurement (the next auto request calibrates again)."""
        with self.lock:
            self.preprocess, self.vision, self.projector, self.prefill, self.recent = {}, [], [], [], []
            self.last_check, self._fits = None, None

    def observe(self, *, n_images: int, span: int, prompt_tokens: int, timings_s: dict[str, float]) -> None:
        """Update the model from one request's measured stage times (seconds; runtime.pipeline's timings)."""
        ms = {k: 1000.0 * float(v) for k, v in timings_s.items()}
        if not all(math.isfinite(v) and v >= 0 for v in ms.values()):
            return
        with self.lock:
            if n_images and "prefill" in ms:
                measured = {"vision": ms.get("vision", 0.0) + ms.get("select", 0.0),
                            "projector": ms.get("projector", 0.0), "prefill": ms["prefill"]}  # fmt: skip
                if self._calibrated():  # how far off the model was, before it learns from this request
                    model = self._stages(n_images, np.array([float(span)]), prompt_tokens - span)
                    model = {k: float(v[0]) for k, v in model.items()}
                    self.last_check = {"model": model, "measured": measured, "k": self._safety()}
                point = (float(n_images), float(span), float(prompt_tokens), sum(measured.values()))
                _append(self.recent, point, RATIO_WINDOW)
                self.preprocess[n_images] = ms.get("preprocess", 0.0)
                _append(self.vision, (float(n_images), measured["vision"]))
                _append(self.projector, (float(span), measured["projector"]))
            if "prefill" in ms:
                _append(self.prefill, (float(prompt_tokens), ms["prefill"]))
            self._fits = None
            self.observations += 1
            due = self.in_use and self.observations % SAVE_EVERY == 0
        if due:
            self.save()

    # ---- prediction ----------------------------------------------------------------------------------
    def _stages(self, n: int, spans: np.ndarray, text_tokens: int) -> dict[str, np.ndarray]:
        """The model's ms of each MODEL_STAGES stage at each span (lock held)."""
        if self._fits is None:
            self._fits = (
                fit_increasing(self.vision or [(1.0, 0.0)], 1, 64.0),
                fit_increasing(self.projector or [(0.0, 0.0)], 1, self.max_length),
                fit_increasing(self.prefill, 2, self.max_length),
            )
        vision, projector, prefill = self._fits
        return {
            "vision": np.full(spans.shape, max(float(np.polyval(vision, n)), 0.0)),
            "projector": np.maximum(np.polyval(projector, spans), 0.0),
            "prefill": np.maximum(np.polyval(prefill, spans + text_tokens), 0.0),
        }

    def predict_ms(self, layouts: Sequence[AnyresLayout], cfg: HiredConfig, text_tokens: int, rates: np.ndarray,
                   spent_ms: float | None = None) -> np.ndarray:  # fmt: skip
        """Predicted TTFT [len(rates)] in ms of a request with images of `layouts` (one or several) and a prompt of
        `text_tokens` at each rate (rates ascending; the result is made non-decreasing): preprocessing + model x k."""
        return self._predict(partitions(layouts), spans_at(layouts, cfg, rates), text_tokens, spent_ms)

    def _predict(self, n: int, spans: np.ndarray, text_tokens: int, spent_ms: float | None) -> np.ndarray:
        """predict_ms of a request of `n` partitions in all at the (non-decreasing) visual spans `spans`."""
        with self.lock:
            pre = spent_ms if spent_ms is not None else _per_count(self.preprocess, n)
            model = sum(self._stages(n, spans, text_tokens).values())
            out = pre + self._safety() * model
        return np.maximum.accumulate(out)

    def choose(self, layouts: Sequence[AnyresLayout], cfg: HiredConfig, *, text_tokens: int, target_ms: float,
               spent_ms: float | None = None, max_prompt: int | None = None) -> Choice:  # fmt: skip
        """The largest candidate rate in [min_budget, 1.0], applied to every image of `layouts` (one or several),
        predicted to meet `target_ms` whose prompt (text + spans) is at most `max_prompt` tokens; min_budget if
        none meets the target."""
        self.in_use = True
        rates = np.unique(np.round(np.r_[np.arange(self.min_budget, 1.0, RATE_STEP), 1.0], 6))
        spans = spans_at(layouts, cfg, rates)
        predicted = self._predict(partitions(layouts), spans, text_tokens, spent_ms)
        meets = predicted <= target_ms
        fits = meets & (text_tokens + spans <= max_prompt) if max_prompt is not None else meets
        ok = np.flatnonzero(fits)  # min_budget itself fits the context: runtime.pipeline checked it before
        i = int(ok[-1]) if ok.size else 0
        capped = bool(meets[i + 1 :].any())
        return Choice(float(rates[i]), round(float(predicted[i]), 3), bool(meets[0]), capped)

    # ---- cache ---------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        with self.lock:
            return {
                "format": CACHE_FORMAT, "bundle": self.bundle, "provider": self.provider,
                "preprocess": {str(k): v for k, v in self.preprocess.items()},
                "vision": [list(p) for p in self.vision], "projector": [list(p) for p in self.projector],
                "prefill": [list(p) for p in self.prefill], "recent": [list(p) for p in self.recent],
            }  # fmt: skip

    def save(self) -> None:
        """Write the cache atomically; a folder that cannot be written only costs a recalibration next time."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(self.to_json()))
            os.replace(tmp, self.path)
        except OSError as e:
            log.debug("latency cache not written (%s)", e)

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
                raise ValueError("not a latency cache of this version")
            if data.get("bundle") != self.bundle or data.get("provider") != self.provider:
                raise ValueError("written for another bundle or provider")
            preprocess = _counts(data["preprocess"])
            vision, projector, prefill = _points(data["vision"]), _points(data["projector"]), _points(data["prefill"])
            recent = [tuple(float(v) for v in p) for p in list(data["recent"])[-RATIO_WINDOW:]]
            if not all(len(p) == 4 and all(math.isfinite(v) and v >= 0 for v in p) and p[0] >= 1 for p in recent):
                raise ValueError("bad recent requests")
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring the latency cache %s (%s); it is rebuilt on the next auto request", self.path,
                        " ".join(str(e).split())[:120])  # fmt: skip
            return
        self.preprocess, self.vision, self.projector, self.prefill = preprocess, vision, projector, prefill
        self.recent = recent


def calibrate(pipe, image, prompt: str, *, rates: tuple[float, ...] = CALIBRATION_RATES, lazy: bool = False) -> None:
    """Run `image` + `prompt` at each rate, and `prompt` alone, with one new token through `pipe` (its requests
    update its governor), then save the cache; a rate whose span the context cannot hold is skipped. Fresh sessions pay their warm-up on the first run: it is dropped
    and run again last. One calibration at a time; `lazy` (the first auto request's) does nothing when another
    request calibrated meanwhile."""
    gov: Governor = pipe.governor
    gov.in_use = True
    with gov.calibrating:
        if lazy and gov.calibrated:
            return
        cold = gov.observations == 0
        for i, rate in enumerate(rates):
            try:
                pipe.generate(image, prompt, budget=rate, max_new_tokens=1)
            except (PromptError, GenerationError):
                if rate == min(rates):
                    raise
                continue  # a span the context cannot hold: no request runs there either
            if i == 0 and cold:
                gov.reset()  # the first run of fresh sessions pays their warm-up: not a measurement
        pipe.generate(None, TEXT_ONLY_PROMPT, max_new_tokens=1)  # the shortest prompt the prefill fit will see
        if cold and rates:
            pipe.generate(image, prompt, budget=rates[0], max_new_tokens=1)
        gov.save()


def auto_budget(pipe, opts, layouts: Sequence[AnyresLayout], image, prompt, text_tokens: int, spent_s: float):
    """(HiredConfig at the chosen rate, the result's budget additions) of a budget="auto" request whose images
    have `layouts` (none: text only; several: one rate for all of them).

    `pipe` is the Pipeline (its governor, defaults, context, calibration runs; a lazy calibration runs the request's
    own images and prompt); `spent_s` the request's preprocessing time."""
    auto = {"requested": "auto", "target_ttft_ms": opts.target_ttft_ms, "predicted_ttft_ms": None}
    if not layouts:  # text only: no visual tokens to trade
        return opts.hired_config(pipe.defaults), auto
    gov: Governor = pipe.governor
    if not gov.calibrated:
        calibrate(pipe, image, prompt, lazy=True)
    cfg = opts.hired_config(pipe.defaults)
    max_prompt = pipe.max_context - opts.sampling.max_new_tokens
    choice = gov.choose(layouts, cfg, text_tokens=text_tokens, target_ms=opts.target_ttft_ms,
                        spent_ms=1000.0 * spent_s, max_prompt=max_prompt)  # fmt: skip
    auto["predicted_ttft_ms"] = choice.predicted_ms
    if not choice.reachable:
        auto["note"] = (
            f"target {opts.target_ttft_ms:g} ms is below the {choice.predicted_ms:.0f} ms predicted at min_budget "
            f"{gov.min_budget:g}; answered at min_budget"
        )
    elif choice.capped:
        auto["note"] = (
            f"rate capped at {choice.rate:g} so that the prompt + max_new_tokens={opts.sampling.max_new_tokens} fit "
            f"the {pipe.max_context}-token context"
        )
    return opts.hired_config(pipe.defaults, rate=choice.rate), auto


def _append(items: list, item, keep: int = MAX_SAMPLES) -> None:
    items.append(item)
    del items[:-keep]


def _per_count(table: dict[int, float], n: int) -> float:
    if not table:
        return 0.0
    if n in table:
        return table[n]
    nearest = min(table, key=lambda k: (abs(k - n), k))
    return table[nearest] * n / nearest


def _counts(value) -> dict[int, float]:
    out = {int(k): float(v) for k, v in dict(value).items()}
    if not all(k >= 1 and math.isfinite(v) and v >= 0 for k, v in out.items()):
        raise ValueError("bad per-partition times")
    return out


def _points(value) -> list[tuple[float, float]]:
    out = [(float(x), float(y)) for x, y in list(value)[-MAX_SAMPLES:]]
    if not all(math.isfinite(x) and math.isfinite(y) and x >= 0 and y >= 0 for x, y in out):
        raise ValueError("bad samples")
    return out
