"""The latency governor behind budget="auto": per request, the largest rate in [min_budget, 1.0] whose predicted
time to first token meets the request's target_ttft_ms, from a small cost model kept per Pipeline.

    gov = Governor(manifest, provider, min_budget=0.05)     # reads ~/.cache/hired-edge/governor/<bundle>-<provider>.json
    choice = gov.choose(layout, cfg, text_tokens=40, target_ms=300, spent_ms=12.0)   # -> Choice(rate, predicted_ms, ...)
    gov.observe(n_images=5, span=602, prompt_tokens=650, timings_s=req.timings)      # after every request

TTFT = preprocess + vision + select + projector + prefill (as bench.eval and GenerationResult.timings_ms count it).
The model, in milliseconds:
- preprocess, vision + select: per partition count n (1 + crops), an exponential moving average of the measured
  times; a count never seen scales the nearest seen one by n / n_seen. At decision time the request's own
  preprocessing has run, so its measured time (`spent_ms`) replaces the estimate.
- projector: linear in the kept tokens; prefill: a polynomial of the prompt length L (text tokens + visual span),
  degree 2 when three or more lengths were seen, else 1, falling back to the lower degree when a fit is not
  increasing over [0, L_max] (least squares over the last MAX_SAMPLES requests).
The span a rate gives is exact (hired's kept count min(T, valid tokens); the stock span at 1.0; with
newlines="rows" one newline per unpadded canvas row is assumed, an upper bound), so the prediction is monotone in
the rate and the choice monotone in the target. Calibration (`Pipeline.calibrate`, or lazily on the first auto
request) runs CALIBRATION_RATES with one new token; the model is then updated from every request and cached per
bundle (manifest sha256) and provider in the user's cache folder; a corrupt or foreign cache is ignored with one
warning line and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hired import AnyresLayout, HiredConfig

log = logging.getLogger("hired_edge")

CACHE_FORMAT = "hired-edge-governor/1"
CALIBRATION_RATES = (0.1, 1.0, 0.4)  # the first run also warms the sessions up (dropped when they were cold)
MAX_SAMPLES = 48  # recent (length, ms) points the fits use
EMA = 0.3  # weight of a new measurement in a per-partition-count average
RATE_STEP = 0.005  # the candidate rates: min_budget, min_budget + step, ..., 1.0
SAVE_EVERY = 8  # observations between cache writes


@dataclass(frozen=True)
class Choice:
    """The governor's answer for one request."""

    rate: float
    predicted_ms: float
    reachable: bool  # False: even min_budget is predicted over the target (the request runs at min_budget)


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
    """Visual tokens fed to the LLM at `rate`: the stock span at 1.0, else min(T, valid) (+ newline rows)."""
    if rate >= 1.0:
        return int(layout.stock_tokens)
    t = layout.tokens_per_image
    kept = min(int(layout.n_images * t * rate), t + int(layout.capacities.sum()))
    return kept + (layout.unpadded_rows if cfg.newlines == "rows" else 0)


def fit_increasing(points: list[tuple[float, float]], max_degree: int, x_max: float) -> np.ndarray:
    """Polynomial coefficients (highest first) of ms against x, non-decreasing on [0, x_max]: the highest degree
    <= max_degree whose least-squares fit is; else the proportional fit ms = x * mean(ms) / mean(x)."""
    xs = np.array([p[0] for p in points], dtype=np.float64)
    ys = np.array([p[1] for p in points], dtype=np.float64)
    for degree in range(min(max_degree, len(np.unique(xs)) - 1), 0, -1):
        coef = np.polyfit(xs, ys, degree)
        slope = np.polyder(coef)
        if np.polyval(slope, 0.0) >= 0 and np.polyval(slope, x_max) >= 0:
            return coef
    mean_x = max(float(xs.mean()), 1.0)
    return np.array([float(ys.mean()) / mean_x, 0.0])


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
        self.preprocess: dict[int, float] = {}
        self.vision: dict[int, float] = {}  # vision + select
        self.projector: list[tuple[float, float]] = []
        self.prefill: list[tuple[float, float]] = []
        self.observations = 0
        self.in_use = False  # set by the first auto request or calibration: only then is the cache written
        self._fits: tuple[np.ndarray, np.ndarray] | None = None
        self._load()

    # ---- state ---------------------------------------------------------------------------------------
    @property
    def calibrated(self) -> bool:
        """Enough to predict: a vision time and two distinct prompt lengths."""
        with self.lock:
            return bool(self.vision) and len({x for x, _ in self.prefill}) >= 2

    def reset(self) -> None:
        """Forget every measurement (the next auto request calibrates again)."""
        with self.lock:
            self.preprocess, self.vision, self.projector, self.prefill = {}, {}, [], []
            self._fits = None

    def observe(self, *, n_images: int, span: int, prompt_tokens: int, timings_s: dict[str, float]) -> None:
        """Update the model from one request's measured stage times (seconds; runtime.pipeline's timings)."""
        ms = {k: 1000.0 * float(v) for k, v in timings_s.items()}
        if not all(math.isfinite(v) and v >= 0 for v in ms.values()):
            return
        with self.lock:
            if n_images:
                _average(self.preprocess, n_images, ms.get("preprocess", 0.0))
                _average(self.vision, n_images, ms.get("vision", 0.0) + ms.get("select", 0.0))
                _append(self.projector, (float(span), ms.get("projector", 0.0)))
            if "prefill" in ms:
                _append(self.prefill, (float(prompt_tokens), ms["prefill"]))
            self._fits = None
            self.observations += 1
            due = self.in_use and self.observations % SAVE_EVERY == 0
        if due:
            self.save()

    # ---- prediction ----------------------------------------------------------------------------------
    def predict_ms(self, layout: AnyresLayout, cfg: HiredConfig, text_tokens: int, rates: np.ndarray,
                   spent_ms: float | None = None) -> np.ndarray:  # fmt: skip
        """Predicted TTFT [len(rates)] in ms of an image with `layout` and a prompt of `text_tokens` at each rate
        (rates ascending; the result is made non-decreasing)."""
        with self.lock:
            if self._fits is None:
                self._fits = (
                    fit_increasing(self.projector or [(0.0, 0.0)], 1, self.max_length),
                    fit_increasing(self.prefill, 2, self.max_length),
                )
            projector, prefill = self._fits
            n = layout.n_images
            pre = spent_ms if spent_ms is not None else _per_count(self.preprocess, n)
            fixed = pre + _per_count(self.vision, n)
        spans = np.array([visual_span(layout, cfg, float(r)) for r in rates], dtype=np.float64)
        out = fixed + np.polyval(projector, spans) + np.polyval(prefill, spans + text_tokens)
        return np.maximum.accumulate(np.maximum(out, 0.0))

    def choose(self, layout: AnyresLayout, cfg: HiredConfig, *, text_tokens: int, target_ms: float,
               spent_ms: float | None = None) -> Choice:  # fmt: skip
        """The largest candidate rate in [min_budget, 1.0] predicted to meet `target_ms`; min_budget if none."""
        self.in_use = True
        rates = np.unique(np.round(np.r_[np.arange(self.min_budget, 1.0, RATE_STEP), 1.0], 6))
        predicted = self.predict_ms(layout, cfg, text_tokens, rates, spent_ms)
        fits = np.flatnonzero(predicted <= target_ms)
        i = int(fits[-1]) if fits.size else 0
        return Choice(float(rates[i]), round(float(predicted[i]), 3), bool(fits.size))

    # ---- cache ---------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        with self.lock:
            return {
                "format": CACHE_FORMAT, "bundle": self.bundle, "provider": self.provider,
                "preprocess": {str(k): v for k, v in self.preprocess.items()},
                "vision": {str(k): v for k, v in self.vision.items()},
                "projector": [list(p) for p in self.projector], "prefill": [list(p) for p in self.prefill],
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
            preprocess, vision = _counts(data["preprocess"]), _counts(data["vision"])
            projector, prefill = _points(data["projector"]), _points(data["prefill"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring the latency cache %s (%s); it is rebuilt on the next auto request", self.path,
                        " ".join(str(e).split())[:120])  # fmt: skip
            return
        self.preprocess, self.vision, self.projector, self.prefill = preprocess, vision, projector, prefill


def calibrate(pipe, image, prompt: str, *, rates: tuple[float, ...] = CALIBRATION_RATES, lazy: bool = False) -> None:
    """Run `image` + `prompt` at each rate with one new token through `pipe` (its requests update its governor),
    then save the cache. One calibration at a time; `lazy` (the first auto request's) does nothing when another
    request calibrated meanwhile."""
    gov: Governor = pipe.governor
    gov.in_use = True
    with gov.calibrating:
        if lazy and gov.calibrated:
            return
        cold = gov.observations == 0
        for i, rate in enumerate(rates):
            pipe.generate(image, prompt, budget=rate, max_new_tokens=1)
            if i == 0 and cold:
                gov.reset()  # the first run of fresh sessions pays their warm-up: not a measurement
        gov.save()


def auto_budget(pipe, opts, layout: AnyresLayout | None, image, prompt, text_tokens: int, spent_s: float):
    """(HiredConfig at the chosen rate, the result's budget additions) of a budget="auto" request.

    `pipe` is the Pipeline (its governor, defaults, calibration runs); `spent_s` the request's preprocessing time."""
    auto = {"requested": "auto", "target_ttft_ms": opts.target_ttft_ms, "predicted_ttft_ms": None}
    if layout is None:  # text only: no visual tokens to trade
        return opts.hired_config(pipe.defaults), auto
    gov: Governor = pipe.governor
    if not gov.calibrated:
        calibrate(pipe, image, prompt, lazy=True)
    cfg = opts.hired_config(pipe.defaults)
    choice = gov.choose(layout, cfg, text_tokens=text_tokens, target_ms=opts.target_ttft_ms, spent_ms=1000.0 * spent_s)
    auto["predicted_ttft_ms"] = choice.predicted_ms
    if not choice.reachable:
        auto["note"] = (
            f"target {opts.target_ttft_ms:g} ms is below the {choice.predicted_ms:.0f} ms predicted at min_budget "
            f"{gov.min_budget:g}; answered at min_budget"
        )
    return opts.hired_config(pipe.defaults, rate=choice.rate), auto


def _average(table: dict[int, float], key: int, value: float) -> None:
    table[key] = value if key not in table else (1 - EMA) * table[key] + EMA * value


def _append(points: list[tuple[float, float]], point: tuple[float, float]) -> None:
    points.append(point)
    del points[:-MAX_SAMPLES]


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
