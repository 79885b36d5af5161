"""Answers files -> per-budget accuracy, its bootstrap interval, cost in time: summary.json, summary.md, summary.png.

    s = summarize(questions, {1.0: lines_full, 0.2: lines_02}, model_id="tiny")
    write_summary(Path("out/eval"), s)

Per budget (per (selector, budget) when answers are keyed by (selector, budget): bench.eval --selectors; each row
then starts with its `selector`, and budget 1.0, the stock model for every selector, is the reference of all): `n` questions answered and scored, `errors` (questions whose image or prompt was refused: not
scored), `score` (mean per-question score in [0, 1]: exact/choice/yesno 0 or 1, vqa soft), `ci95` (percentile
bootstrap over questions, 2000 resamples, seed 0), `relative_to_full` (score / budget 1.0's score), `loyalty`
(share of questions whose answer text is identical to budget 1.0's, over questions both answered),
`ttft_ms_median`, `ttft_ms_p90`, `kept_mean` (visual tokens fed to the LLM). Values that cannot be computed
(no budget 1.0, nothing answered) are null. With several metrics in one file the metric is "mixed" and
`by_metric` gives each one's n and score; with yes/no questions `pope` gives POPE's accuracy, precision,
recall, F1 and yes-ratio over them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.eval.data import Question
from bench.eval.scorers import choice_score, exact_score, vqa_score, yesno_score, yesno_stats

BOOTSTRAP_RESAMPLES = 2000


def score_question(q: Question, text: str) -> float:
    """One answer's score under its question's metric (set by data.prepare)."""
    if q.metric == "vqa":
        return vqa_score(text, q.answers if q.answers is not None else [q.answer if q.answer is not None else q.label])
    if q.metric == "exact":
        keys = q.answers or ([q.answer] if q.answer is not None else [q.label])
        return max(exact_score(text, k) for k in keys)
    if q.metric == "choice":
        return choice_score(text, q.answer, q.options)
    if q.metric == "yesno":
        return yesno_score(text, q.label if q.label is not None else q.answer)
    raise ValueError(f"question {q.question_id!r} has no metric; call data.prepare first")


def bootstrap_ci(scores: Sequence[float], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> list[float] | None:
    """Percentile 95% interval of the mean of `scores` over `resamples` bootstrap resamples (None when empty)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = s[rng.integers(0, s.size, size=(resamples, s.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return [float(lo), float(hi)]


def summarize(questions: Sequence[Question], answers: Mapping[Any, Sequence[Mapping[str, Any]]], *,
              model_id: str) -> dict[str, Any]:  # fmt: skip
    """summary.json's object from the questions (prepared) and each run's answer lines (in question order); a run
    is a budget (HiRED) or a (selector, budget) pair."""
    metrics = sorted({q.metric for q in questions})
    keyed = {_run_key(k): v for k, v in answers.items()}
    selectors = list(dict.fromkeys(s for s, _ in keyed))
    full_key = next((k for k in keyed if k[1] == 1.0), None)  # the stock model, whatever the selector
    full = keyed[full_key] if full_key is not None else None
    full_text = {i: rec["text"] for i, rec in enumerate(full or []) if "error" not in rec.get("metadata", {})}
    per_budget = {k: _budget_entry(k[1], questions, lines, full_text if full is not None else None)
                  for k, lines in keyed.items()}  # fmt: skip
    full_score = per_budget[full_key]["score"] if full_key is not None else None
    for entry in per_budget.values():
        entry["relative_to_full"] = (
            None if full_score in (None, 0) or entry["score"] is None else entry["score"] / full_score
        )
    rows = []
    for k in sorted(per_budget, key=lambda k: (selectors.index(k[0]), -k[1])):
        e = per_budget[k]
        extra = {k: e.pop(k) for k in ("by_metric", "pope") if k in e}
        if len(metrics) == 1:
            extra.pop("by_metric", None)
        rows.append(
            ({"selector": k[0]} if selectors != ["hired"] else {})
            | {f: e[f] for f in ("budget", "n", "errors", "score", "ci95", "relative_to_full", "loyalty",
                                 "ttft_ms_median", "ttft_ms_p90", "kept_mean")} | extra  # fmt: skip
        )
    return {"metric": metrics[0] if len(metrics) == 1 else "mixed", "model_id": model_id, "budgets": rows}


def _run_key(key: Any) -> tuple[str, float]:
    """A budget -> ("hired", budget); a (selector, budget) pair as it is."""
    return (str(key[0]), float(key[1])) if isinstance(key, tuple) else ("hired", float(key))


def _label(b: dict[str, Any], several: bool) -> str:
    """A row's name in tables and plots: the budget, with its selector when a run compares several."""
    return f"{b.get('selector', 'hired')} {b['budget']!r}" if several else repr(b["budget"])


def _several(s: dict[str, Any]) -> bool:
    return len({b.get("selector", "hired") for b in s["budgets"]}) > 1


def _budget_entry(budget: float, questions: Sequence[Question], lines: Sequence[Mapping[str, Any]],
                  full_text: dict[int, str] | None) -> dict[str, Any]:  # fmt: skip
    scores, ttft, kept, errors, same, both = [], [], [], 0, 0, 0
    by_metric: dict[str, list[float]] = {}
    pope_answers, pope_labels = [], []
    for i, rec in enumerate(lines):
        meta = rec.get("metadata", {})
        if "error" in meta:
            errors += 1
            continue
        q = questions[i]
        s = score_question(q, rec["text"])
        scores.append(s)
        by_metric.setdefault(q.metric, []).append(s)
        if q.metric == "yesno":
            pope_answers.append(rec["text"])
            pope_labels.append(q.label if q.label is not None else q.answer)
        if meta.get("ttft_ms") is not None:
            ttft.append(float(meta["ttft_ms"]))
        if meta.get("visual_tokens_kept") is not None:
            kept.append(float(meta["visual_tokens_kept"]))
        if full_text is not None and i in full_text:
            both += 1
            same += rec["text"].strip() == full_text[i].strip()
    entry: dict[str, Any] = {
        "budget": float(budget),
        "n": len(scores),
        "errors": errors,
        "score": float(np.mean(scores)) if scores else None,
        "ci95": bootstrap_ci(scores),
        "loyalty": same / both if both else None,
        "ttft_ms_median": float(np.median(ttft)) if ttft else None,
        "ttft_ms_p90": float(np.percentile(ttft, 90)) if ttft else None,
        "kept_mean": float(np.mean(kept)) if kept else None,
        "by_metric": {m: {"n": len(v), "score": float(np.mean(v))} for m, v in sorted(by_metric.items())},
    }
    if pope_answers:
        entry["pope"] = yesno_stats(pope_answers, pope_labels)
    return entry


# ---- writing ---------------------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ",.0f") -> str:
    return "-" if x is None else format(x, fmt)


def summary_markdown(s: dict[str, Any]) -> str:
    """The table of summary.md (also printed at the end of a run)."""
    n = max((b["n"] + b["errors"] for b in s["budgets"]), default=0)
    several = _several(s)
    out = [
        f"# Accuracy against budget: {s['model_id']}, metric {s['metric']}, {n} questions",
        "",
        f"| {'selector budget' if several else 'budget'} | n | errors | score (95% CI) | vs full | loyalty | "
        "TTFT median ms | TTFT p90 ms | kept mean |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for b in s["budgets"]:
        ci = "" if b["ci95"] is None else f" ({_pct(b['ci95'][0])} - {_pct(b['ci95'][1])})"
        out.append(
            f"| {_label(b, several)} | {b['n']} | {b['errors']} | {_pct(b['score'])}{ci} | {_pct(b['relative_to_full'])} "
            f"| {_pct(b['loyalty'])} | {_num(b['ttft_ms_median'], ',.1f')} | {_num(b['ttft_ms_p90'], ',.1f')} "
            f"| {_num(b['kept_mean'], ',.1f')} |"
        )
    names = sorted({m for b in s["budgets"] for m in b.get("by_metric", {})})
    if names:
        out += ["", "| budget | " + " | ".join(f"{m} (n)" for m in names) + " |", "|---:|" + "---:|" * len(names)]
        for b in s["budgets"]:
            cells = [b.get("by_metric", {}).get(m) for m in names]
            out.append(f"| {_label(b, several)} | " + " | ".join(
                "-" if c is None else f"{_pct(c['score'])} ({c['n']})" for c in cells) + " |")  # fmt: skip
    if any("pope" in b for b in s["budgets"]):
        out += ["", "| budget | POPE accuracy | precision | recall | F1 | yes-ratio |", "|---:|---:|---:|---:|---:|---:|"]
        for b in s["budgets"]:
            p = b.get("pope")
            if p:
                out.append(f"| {_label(b, several)} | {_pct(p['accuracy'])} | {_pct(p['precision'])} | "
                           f"{_pct(p['recall'])} | {_pct(p['f1'])} | {_pct(p['yes_ratio'])} |")  # fmt: skip
    if not any(b["budget"] == 1.0 for b in s["budgets"]):
        out += ["", "No budget 1.0 in --budgets: add it for 'vs full' and 'loyalty'."]
    out += [
        "",
        "score: mean per-question score (exact/choice/yes-no 0 or 1, VQA soft accuracy); 95% CI by bootstrap over "
        "questions; vs full: score / budget 1.0's; loyalty: answers identical to budget 1.0's; TTFT = preprocess + "
        "vision + select + projector + prefill; errors: questions not answered (image or prompt refused), not scored.",
    ]
    return "\n".join(out) + "\n"


def summary_plot(s: dict[str, Any], path: Path) -> None:
    """summary.png: score against median TTFT, one point per budget (95% CI as error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [b for b in s["budgets"] if b["score"] is not None and b["ttft_ms_median"] is not None]
    several = _several(s)
    selectors = list(dict.fromkeys(b.get("selector", "hired") for b in pts))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for k, b in enumerate(pts):
        y = 100 * b["score"]
        err = None
        if b["ci95"] is not None:
            err = [[y - 100 * b["ci95"][0]], [100 * b["ci95"][1] - y]]
        colour = f"C{selectors.index(b.get('selector', 'hired')) % 10}"
        ax.errorbar(b["ttft_ms_median"], y, yerr=err, fmt="o", capsize=3, color=colour)
        kept = "" if b["kept_mean"] is None else f"\n{b['kept_mean']:.0f} tok"
        ax.annotate(f"{_label(b, several)}{kept}", (b["ttft_ms_median"], y), textcoords="offset points", fontsize=8,
                    xytext=(4, 6 if k % 2 == 0 else -24))  # alternate above/below: neighbours do not overlap  # fmt: skip
    for i, name in enumerate(selectors):
        line = [b for b in pts if b.get("selector", "hired") == name]
        if len(line) > 1:
            ax.plot([b["ttft_ms_median"] for b in line], [100 * b["score"] for b in line], color=f"C{i % 10}",
                    alpha=0.4, label=name if several else None)  # fmt: skip
    if several:
        ax.legend(fontsize=8)
    ax.set_xlabel("median TTFT (ms)")
    ax.set_ylabel(f"score (%), metric {s['metric']}")
    ax.set_title(f"{s['model_id']}: accuracy against budget")
    if pts:
        ax.set_xlim(0, 1.15 * max(b["ttft_ms_median"] for b in pts))
        ax.margins(y=0.25)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_summary(out: Path, s: dict[str, Any]) -> str:
    """summary.json, summary.md and summary.png in `out`; returns the markdown."""
    (out / "summary.json").write_text(json.dumps(s, indent=1) + "\n", encoding="utf-8")
    md = summary_markdown(s)
    (out / "summary.md").write_text(md, encoding="utf-8")
    summary_plot(s, out / "summary.png")
    return md
