"""One PNG of a build's dev measurements: layer scores and KL, gate candidates, strengths.

Drawn on `matplotlib.figure.Figure` directly (no pyplot state); matplotlib is imported only
when a plot is drawn.
"""

from __future__ import annotations

from pathlib import Path

from safesteer.adapters.build import BuildSummary

PLOT_NAME = "build_scores.png"


def plot_summary(summary: BuildSummary, path: Path, max_kl: float | None = None) -> Path:
    """Four panels: refusal and over-refusal gain per candidate layer and scale (chosen cells
    starred); benign KL per layer and scale (`max_kl`: the budget line); harmful TPR and benign
    FPR per detection layer and pooling; refusal and coherence per layer set and strength."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(16.0, 4.4))
    gain_ax, kl_ax, gate_ax, strength_ax = figure.subplots(1, 4, width_ratios=[1.5, 1.2, 1, 1])
    scales = sorted({s.scale for s in summary.layer_scores})
    for index, scale in enumerate(scales):
        cells = sorted((s for s in summary.layer_scores if s.scale == scale), key=lambda s: s.layer)
        x = [s.layer for s in cells]
        color = f"C{index}"
        gain_ax.plot(
            x, [100 * s.refusal_gain for s in cells], "o-", color=color, label=f"harmful, {scale:g}"
        )
        gain_ax.plot(
            x,
            [100 * s.over_refusal_gain for s in cells],
            "s:",
            color=color,
            label=f"benign, {scale:g}",
        )
        kl_ax.plot(x, [s.kl for s in cells], "^-", color=color, label=f"scale {scale:g}")
    chosen = [s for s in summary.layer_scores if summary.layers.get(s.layer) == s.scale]
    gain_ax.plot(
        [s.layer for s in chosen],
        [100 * s.refusal_gain for s in chosen],
        "*",
        color="black",
        markersize=14,
        label="chosen",
    )
    kl_ax.plot([s.layer for s in chosen], [s.kl for s in chosen], "*", color="black", markersize=14)
    if max_kl is not None:
        kl_ax.axhline(max_kl, color="grey", linestyle="--", label=f"budget {max_kl:g}")
    gain_ax.set_xlabel("steering layer (one at a time)")
    gain_ax.set_ylabel("refusals gained over unsteered (points)")
    gain_ax.set_title("Layer scores on dev: refusal gain")
    gain_ax.legend(fontsize=7, title="prompts, scale", title_fontsize=7)
    kl_ax.set_xlabel("steering layer (one at a time)")
    kl_ax.set_ylabel("KL(unsteered || steered), first answer token")
    kl_ax.set_title("Benign next-token KL")
    kl_ax.legend(fontsize=7)
    for axes in (gain_ax, kl_ax):
        axes.grid(alpha=0.3)

    poolings = list(dict.fromkeys(g.pooling for g in summary.gate_candidates))
    for index, pooling in enumerate(poolings):
        gates = sorted(
            (g for g in summary.gate_candidates if g.pooling == pooling), key=lambda g: g.layer
        )
        x_gate = [g.layer for g in gates]
        color = f"C{index}"
        gate_ax.plot(
            x_gate, [100 * g.harmful_tpr for g in gates], "o-", color=color,
            label=f"harmful dev TPR, {pooling}",
        )  # fmt: skip
        gate_ax.plot(
            x_gate, [100 * g.benign_fpr for g in gates], "s:", color=color,
            label=f"benign dev FPR (LOO), {pooling}",
        )  # fmt: skip
        if all(g.questions_fpr is not None for g in gates):
            gate_ax.plot(
                x_gate, [100 * (g.questions_fpr or 0.0) for g in gates], "^--", color=color,
                label=f"dev questions FPR (LOO), {pooling}",
            )  # fmt: skip
    gate_ax.axvline(summary.detection_layer, color="grey", alpha=0.35, linewidth=6)
    gate_ax.set_xticks(sorted({g.layer for g in summary.gate_candidates}))
    gate_ax.set_ylim(0, 105)
    gate_ax.set_xlabel(f"detection layer (grey: chosen, {summary.detection_pooling} pooling)")
    gate_ax.set_ylabel("prompts on which any category fires (%)")
    gate_ax.set_title("Gate candidates")
    gate_ax.legend(fontsize=7)
    gate_ax.grid(alpha=0.3)

    layer_sets = list(dict.fromkeys(s.layers for s in summary.strength_scores))
    for index, layer_set in enumerate(layer_sets):
        settings = [s for s in summary.strength_scores if s.layers == layer_set]
        x_strength = [s.strength for s in settings]
        label = "+".join(map(str, layer_set)) or "?"
        color = f"C{index}"
        strength_ax.plot(
            x_strength,
            [100 * s.refused for s in settings],
            "o-",
            color=color,
            label=f"L{label} refused",
        )
        strength_ax.plot(
            x_strength,
            [100 * s.coherent for s in settings],
            "s:",
            color=color,
            label=f"L{label} coherent",
        )
    chosen_set = tuple(sorted(summary.layers))
    best = [s for s in summary.strength_scores if s.layers == chosen_set]
    best = [s for s in best if s.strength == summary.strength]
    strength_ax.plot(
        [s.strength for s in best], [100 * s.refused for s in best], "*", color="black",
        markersize=14, label="chosen",
    )  # fmt: skip
    strength_ax.set_ylim(0, 105)
    strength_ax.set_xlabel("strength (x the layers' scales)")
    strength_ax.set_ylabel("harmful dev answers that fired (%)")
    strength_ax.set_title("Gated layer sets and strengths")
    strength_ax.legend(fontsize=7)
    strength_ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    return path
