"""Matplotlib PNGs of an evaluation.

Figures are drawn on `matplotlib.figure.Figure` directly, not through pyplot: no global state,
no display, no backend switch; matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from safesteer.adapters.evaluation.metrics import ModeSummary, Rate, Selectivity

REFUSAL_BY_CATEGORY = "refusal_by_category.png"
HEADLINE = "headline.png"
SELECTIVITY = "selectivity.png"
GATE_FIRINGS = "gate_firings.png"


def _errors(rates: Sequence[Rate]) -> list[list[float]]:
    """Asymmetric error bars (in %) from the Wilson intervals; none for an empty rate."""
    bars: list[list[float]] = [[], []]
    for rate in rates:
        value, (low, high) = rate.value, rate.interval
        bars[0].append(0.0 if value is None else max(0.0, 100 * (value - low)))
        bars[1].append(0.0 if value is None else max(0.0, 100 * (high - value)))
    return bars


def _grouped_bars(
    path: Path,
    groups: Sequence[str],
    series: Mapping[str, Sequence[Rate]],
    *,
    title: str,
    ylabel: str,
) -> Path:
    from matplotlib.figure import Figure

    width = 0.8 / max(1, len(series))
    figure = Figure(figsize=(max(6.0, 0.9 * len(groups) + 2), 4.2))
    axes = figure.subplots()
    for index, (label, rates) in enumerate(series.items()):
        positions = [g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))]
        heights = [100 * (r.value or 0.0) for r in rates]
        axes.bar(positions, heights, width, label=label, yerr=_errors(rates), capsize=2)
    axes.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    axes.set_ylim(0, 105)
    axes.set_ylabel(f"{ylabel}; whiskers: Wilson 95%")
    axes.set_title(title)
    axes.legend(fontsize="small")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def refusal_by_category(out: Path, summaries: Sequence[ModeSummary], judge: str) -> Path:
    """Harmful refusal rate per category, one bar per mode, Wilson 95% error bars."""
    categories = sorted({c for s in summaries for c in s.harmful_by_category})
    series = {
        s.mode: [s.harmful_by_category.get(c, Rate(0, 0)) for c in categories] for s in summaries
    }
    return _grouped_bars(
        out / REFUSAL_BY_CATEGORY,
        categories,
        series,
        title=f"Harmful prompts refused, by category ({judge})",
        ylabel="refused (%)",
    )


def headline(out: Path, summaries: Sequence[ModeSummary], judge: str) -> Path:
    """Harmful refusal, benign over-refusal and edgy over-refusal per mode."""
    groups = ["harmful refused", "benign refused", "edgy benign refused"]
    series = {s.mode: [s.harmful, s.over_refusal, s.edgy_over_refusal] for s in summaries}
    return _grouped_bars(
        out / HEADLINE, groups, series, title=f"Refusal per mode ({judge})", ylabel="refused (%)"
    )


def selectivity(out: Path, rows: Sequence[Selectivity], mode: str, judge: str) -> Path:
    """Per category switched off: refusal on its own prompts vs the other categories'."""
    groups = [row.category for row in rows]
    series = {
        "own prompts, all on": [row.own_all_on for row in rows],
        "own prompts, it off": [row.own for row in rows],
        "other prompts, it off": [row.others for row in rows],
    }
    return _grouped_bars(
        out / SELECTIVITY,
        groups,
        series,
        title=f"Selectivity in mode {mode}: one category off ({judge})",
        ylabel="refused (%)",
    )


def gate_firings(out: Path, summary: ModeSummary) -> Path:
    """How often each category's gate fired on harmful and on benign prompts (in %)."""
    categories = sorted({*summary.fired_harmful, *summary.fired_benign})
    harmful_total = summary.harmful.total
    benign_total = summary.over_refusal.total
    series = {
        "harmful prompts": [
            Rate(summary.fired_harmful.get(c, 0), harmful_total) for c in categories
        ],
        "benign prompts": [Rate(summary.fired_benign.get(c, 0), benign_total) for c in categories],
    }
    return _grouped_bars(
        out / GATE_FIRINGS,
        categories,
        series,
        title=f"Gate firings per category, mode {summary.mode}",
        ylabel="prompts on which it fired (%)",
    )
