"""Presenting benchmark results: markdown tables, the raw-runs JSON file and the stacked-bar PNG.

    from bench.report import stage_table_md, write_json, plot_stages
    print(stage_table_md(rows))
    write_json(results, "bench-results/bench-20250101-120000.json")
    plot_stages(rows, "bench-results/bench-20250101-120000.png")

Pure formatting; matplotlib is imported (Agg backend) only by `plot_stages`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from bench.metrics import TTFT_STAGES

STAGE_COLORS = {
    "preprocess": "#9e9e9e",
    "vision": "#1f77b4",
    "select": "#d62728",
    "projector": "#9467bd",
    "prefill": "#ff7f0e",
    "decode": "#2ca02c",
}


def _fmt(value: float, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:,.{digits}f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table; the first column left-aligned, the others right-aligned."""
    align = [":---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def stage_table_md(rows: Sequence[Mapping]) -> str:
    """The stage table: one line per (image, budget) with kept tokens, median stage times, TTFT, decode, memory."""
    header = [
        "image", "budget", "visual tokens kept / stock", "prefill tokens",
        *(f"{s} ms" for s in TTFT_STAGES), "TTFT ms", "decode tok/s", "peak RSS MB",
    ]  # fmt: skip
    body = []
    for r in rows:
        body.append(
            [
                r["image"],
                f"{r['budget']:g}",
                f"{r['kept']:,} / {r['before']:,}",
                f"{r['prefill_tokens']:,}",
                *(_fmt(r[f"{s}_ms"], 1 if s != "select" else 2) for s in TTFT_STAGES),
                _fmt(r["ttft_ms"]),
                _fmt(r["decode_tok_s"]),
                _fmt(r["peak_rss_mb"], 0),
            ]
        )
    return md_table(header, body)


def speedup_table_md(speedups: Sequence[Mapping]) -> str:
    """TTFT speed-up over budget 1.0, measured vs the ideal from token counts alone."""
    header = [
        "image",
        "budget",
        "prefill tokens",
        "TTFT speed-up measured",
        "ideal (tokens)",
        "measured / ideal",
    ]
    body = [
        [s["image"], f"{s['budget']:g}", f"{s['prefill_tokens']:,}", f"{s['measured']:.2f}x", f"{s['ideal']:.2f}x",
         f"{s['ratio']:.2f}"]
        for s in speedups
    ]  # fmt: skip
    return md_table(header, body)


def comparison_table_md(comparisons: Sequence[Mapping]) -> str:
    """Runtime vs what a user would run instead (transformers at 1.0, the PyTorch HiRED reference at 0.2).

    Each entry: image, budget, baseline (name), runtime_ttft_ms, baseline_ttft_ms, runtime_tok_s, baseline_tok_s.
    """
    header = [
        "image", "budget", "baseline", "TTFT ms runtime", "TTFT ms baseline", "TTFT runtime/baseline",
        "decode tok/s runtime", "decode tok/s baseline", "decode runtime/baseline",
    ]  # fmt: skip
    body = []
    for c in comparisons:
        body.append(
            [
                c["image"], f"{c['budget']:g}", c["baseline"], _fmt(c["runtime_ttft_ms"]), _fmt(c["baseline_ttft_ms"]),
                f"{c['runtime_ttft_ms'] / c['baseline_ttft_ms']:.2f}", _fmt(c["runtime_tok_s"]),
                _fmt(c["baseline_tok_s"]), f"{c['runtime_tok_s'] / c['baseline_tok_s']:.2f}",
            ]
        )  # fmt: skip
    return md_table(header, body)


def summary_lines(
    speedups: Sequence[Mapping], comparisons: Sequence[Mapping], overhead: Mapping | None
) -> list[str]:
    """The headline numbers, one line each: measured/ideal at 0.2, runtime/baseline ratios, selection overhead."""
    lines = []
    for s in speedups:
        if abs(s["budget"] - 0.2) < 1e-9:
            lines.append(
                f"- {s['image']} at budget 0.2: TTFT {s['measured']:.2f}x faster than at 1.0; ideal from token counts "
                f"{s['ideal']:.2f}x; measured/ideal {s['ratio']:.2f}"
            )
    for c in comparisons:
        lines.append(
            f"- {c['image']} at budget {c['budget']:g}, runtime / {c['baseline']}: TTFT "
            f"{c['runtime_ttft_ms'] / c['baseline_ttft_ms']:.2f}, decode tok/s {c['runtime_tok_s'] / c['baseline_tok_s']:.2f}"
        )
    if overhead:
        share = overhead.get("share_of_ttft")
        lines.append(
            f"- selection overhead (plan + select + pack, 5 images): {overhead['median_us']:,.0f} us"
            + (
                f" = {share['share']:.2%} of TTFT at budget {share['budget']:g} on {share['image']}"
                if share
                else ""
            )
        )
    return lines


def write_json(obj, path: str | os.PathLike) -> Path:
    """Write `obj` as indented JSON (NaN/inf as null), creating the parent folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(obj), indent=1) + "\n", encoding="utf-8")
    return path


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def plot_stages(rows: Sequence[Mapping], path: str | os.PathLike, *, title: str = "") -> Path:
    """Stacked bars of median time per stage (preprocess .. prefill, then decode) for each budget, one panel
    per image; each bar is labelled with its kept visual tokens. Writes a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = list(dict.fromkeys(r["image"] for r in rows))
    fig, axes = plt.subplots(1, len(images), figsize=(5.5 * len(images), 4.8), squeeze=False)
    stages = (*TTFT_STAGES, "decode")
    for ax, image in zip(axes[0], images):
        mine = [r for r in rows if r["image"] == image]
        labels = [f"{r['budget']:g}" for r in mine]
        bottom = [0.0] * len(mine)
        for stage in stages:
            heights = [r[f"{stage}_ms"] / 1000.0 for r in mine]
            steps = mine[0]["new_tokens"] - 1
            name = stage if stage != "decode" else f"decode ({steps} step{'s' if steps != 1 else ''})"
            ax.bar(labels, heights, bottom=bottom, color=STAGE_COLORS[stage], label=name, width=0.6)
            bottom = [b + h for b, h in zip(bottom, heights)]
        for x, (r, top) in enumerate(zip(mine, bottom)):
            ax.text(x, top, f"{r['kept']:,} tok", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"image {image}")
        ax.set_xlabel("HiRED budget (1 = stock model)")
        ax.set_ylabel("seconds (median)")
        ax.set_ylim(0, max(bottom) * 1.12 if max(bottom) > 0 else 1)
    axes[0][0].legend(fontsize=8, loc="upper right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
