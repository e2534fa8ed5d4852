"""Tables and plots of benchmark results (the dict [`ContinualBenchmark.run`] returns)."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

from .methods import METHODS


def _label(method: str) -> str:
    return METHODS[method].label if method in METHODS else method


def _fmt(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _period(summary: dict[str, Any], t: int) -> dict[str, Any]:
    """One period's scores of a method's summary (int keys in memory, str keys once read back from JSON)."""
    periods = summary["periods"]
    return periods[t] if t in periods else periods[str(t)]


def _periods(results: dict[str, Any]) -> list[int]:
    first = next(iter(results["summary"].values()))
    return sorted(int(t) for t in first["periods"])


def markdown_table(results: dict[str, Any]) -> str:
    """The per-period table (ROUGE-1 / ROUGE-L per period and their period average), then forgetting and the
    cold-start bucket, as GitHub markdown. The best period-average ROUGE-L is in bold."""
    summary = results["summary"]
    periods = _periods(results)
    header = ["Method"] + [f"P{t} R-1 | P{t} R-L" for t in periods] + ["Avg R-1 | Avg R-L"]
    head = "| " + " | ".join(header) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(periods) + 2)]
    best = max((s["average"]["rougeL"] for s in summary.values()), default=math.nan)
    for method, s in summary.items():
        cells = [_label(method)]
        for t in periods:
            p = _period(s, t)
            cells += [_fmt(p["rouge1"]), _fmt(p["rougeL"])]
        avg_l = _fmt(s["average"]["rougeL"])
        cells += [_fmt(s["average"]["rouge1"]), f"**{avg_l}**" if s["average"]["rougeL"] == best else avg_l]
        lines.append("| " + " | ".join(cells) + " |")
    n = {t: _period(next(iter(summary.values())), t)["n"] for t in periods}
    lines.append("")
    lines.append("Test items per period: " + ", ".join(f"P{t} {n[t]}" for t in periods) + ".")
    lines += ["", "| Method | Forgetting R-L (P1 after P1 − after last) | Cold-start R-L (n) | Others R-L (n) |",
              "|---|---|---|---|"]  # fmt: skip
    for method, s in summary.items():
        f, c, w = s["forgetting"], s["cold_start"], s["warm"]
        lines.append(
            f"| {_label(method)} | {_fmt(f['rougeL'])} | {_fmt(c['rougeL'])} ({c['n']}) | {_fmt(w['rougeL'])} ({w['n']}) |"
        )
    return "\n".join(lines)


def plot_rouge_l(results: dict[str, Any], path: str | os.PathLike) -> Path | None:
    """A PNG of ROUGE-L per period, one line per method (the period average in the legend). Returns the path, or
    `None` when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from ..utils.io import atomic_write_bytes

    summary = results["summary"]
    periods = _periods(results)
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    colors = plt.get_cmap("tab20").colors  # up to 20 methods, each its own colour
    for i, (method, s) in enumerate(summary.items()):
        values = [_period(s, t)["rougeL"] for t in periods]
        style = "-" if method.startswith("spring") else "--"
        width = 2.5 if method == "spring" else 1.2
        ax.plot(periods, values, style, marker="o", linewidth=width, color=colors[i % len(colors)],
                label=f"{_label(method)} (avg {s['average']['rougeL']:.3f})")  # fmt: skip
    ax.set_xticks(periods, [f"P{t}" for t in periods])
    ax.set_xlabel("period")
    ax.set_ylabel("ROUGE-L (F, stemmed)")
    config = results.get("config", {})
    ax.set_title(f"ROUGE-L per period — {len(results.get('users', {}))} users, {config.get('model', '')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())
