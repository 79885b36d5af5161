"""The numbers the benchmark derives from raw runs: medians, time to first token, ideal vs measured speed-up.

    from bench.metrics import ideal_speedup, summarize_runs, speedups
    ideal_speedup(vision_ms=100, prefill_full_ms=900, kept_tokens_total=600, full_tokens_total=3000)  # 4.17
    row = summarize_runs(runs)                 # medians of every stage over N runs
    table = speedups(rows)                     # per image and budget: measured, ideal, measured / ideal

Pure functions on plain dicts; no onnxruntime, no torch.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence

# The stages up to the first token's logits, in pipeline order; their sum is the time to first token.
TTFT_STAGES: tuple[str, ...] = ("preprocess", "vision", "select", "projector", "prefill")


def median(values: Iterable[float]) -> float:
    """Median of `values`; raises ValueError when there are none."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("median of no values: run at least one measured iteration (--runs >= 1)")
    return float(statistics.median(vals))


def ttft_ms(timings_ms: Mapping[str, float]) -> float:
    """Time to first token = preprocess + vision + select + projector + prefill (ms)."""
    missing = [k for k in TTFT_STAGES if k not in timings_ms]
    if missing:
        raise KeyError(f"timings lack the stage(s) {missing}; expected all of {list(TTFT_STAGES)}")
    return float(sum(timings_ms[k] for k in TTFT_STAGES))


def ideal_speedup(
    *, vision_ms: float, prefill_full_ms: float, kept_tokens_total: int, full_tokens_total: int
) -> float:
    """TTFT speed-up that token counts alone predict, if prefill time were proportional to its length:

        ideal = (vision + prefill_full) / (vision + prefill_full * kept_tokens_total / full_tokens_total)

    vision_ms, prefill_full_ms: the vision and prefill stage times at budget 1.0.
    kept_tokens_total, full_tokens_total: the LLM's prefill length (text tokens + visual span) at this
    budget and at budget 1.0; the text tokens are counted in both.
    """
    if full_tokens_total <= 0 or kept_tokens_total < 0:
        raise ValueError(
            f"token totals must be positive (kept {kept_tokens_total}, full {full_tokens_total}); "
            "count the text tokens in both"
        )
    if vision_ms < 0 or prefill_full_ms < 0 or vision_ms + prefill_full_ms <= 0:
        raise ValueError(
            f"stage times must be >= 0 and not both 0, got vision {vision_ms}, prefill {prefill_full_ms}"
        )
    return (vision_ms + prefill_full_ms) / (
        vision_ms + prefill_full_ms * kept_tokens_total / full_tokens_total
    )


def summarize_runs(runs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Median over `runs` of every numeric key they all share (stage ms, ttft_ms, decode_tok_s, ...)."""
    if not runs:
        raise ValueError("no measured runs to summarize: use --runs >= 1")
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float) and not isinstance(v, bool)]
    return {k: median(r[k] for r in runs) for k in keys if all(k in r for r in runs)}


def speedups(rows: Sequence[Mapping]) -> list[dict]:
    """For each row (one image size at one budget, with medians), the TTFT speed-up over budget 1.0 of
    the same image, next to the ideal from token counts; rows of images without a 1.0 row are skipped.

    A row needs: image, budget, ttft_ms, vision_ms, prefill_ms, prefill_tokens (text + visual span).
    Returns dicts: image, budget, prefill_tokens, measured, ideal, ratio (= measured / ideal).
    """
    full = {r["image"]: r for r in rows if float(r["budget"]) >= 1.0}
    out = []
    for r in rows:
        base = full.get(r["image"])
        if base is None:
            continue
        measured = base["ttft_ms"] / r["ttft_ms"]
        ideal = ideal_speedup(
            vision_ms=base["vision_ms"],
            prefill_full_ms=base["prefill_ms"],
            kept_tokens_total=int(r["prefill_tokens"]),
            full_tokens_total=int(base["prefill_tokens"]),
        )
        out.append(
            {
                "image": r["image"],
                "budget": float(r["budget"]),
                "prefill_tokens": int(r["prefill_tokens"]),
                "measured": measured,
                "ideal": ideal,
                "ratio": measured / ideal,
            }
        )
    return out
