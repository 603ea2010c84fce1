"""One PNG of a build's dev measurements: layer scores, gate candidates, strengths.

Drawn on `matplotlib.figure.Figure` directly (no pyplot state); matplotlib is imported only
when a plot is drawn.
"""

from __future__ import annotations

from pathlib import Path

from safesteer.adapters.build import BuildSummary

PLOT_NAME = "build_scores.png"


def plot_summary(summary: BuildSummary, path: Path) -> Path:
    """Three panels: refusal/over-refusal gain and KL per candidate layer and scale; harmful
    TPR and benign FPR per detection layer; refusal and coherence per strength."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13.5, 4.2))
    layers_ax, gate_ax, strength_ax = figure.subplots(1, 3, width_ratios=[2.2, 1, 1])
    kl_ax = layers_ax.twinx()
    scales = sorted({s.scale for s in summary.layer_scores})
    for index, scale in enumerate(scales):
        cells = sorted((s for s in summary.layer_scores if s.scale == scale), key=lambda s: s.layer)
        x = [s.layer for s in cells]
        color = f"C{index}"
        layers_ax.plot(
            x,
            [100 * s.refusal_gain for s in cells],
            "o-",
            color=color,
            label=f"harmful refusal gain, scale {scale:g}",
        )
        layers_ax.plot(
            x,
            [100 * s.over_refusal_gain for s in cells],
            "s:",
            color=color,
            label=f"benign over-refusal gain, scale {scale:g}",
        )
        kl_ax.plot(
            x,
            [s.kl for s in cells],
            "^--",
            color=color,
            alpha=0.5,
            label=f"benign KL, scale {scale:g}",
        )
    for layer, scale in summary.layers.items():
        layers_ax.axvline(layer, color="grey", alpha=0.35, linewidth=6)
        layers_ax.annotate(f"chosen\n@{scale:g}", (layer, 102), ha="center", fontsize=7)
    layers_ax.set_xlabel("steering layer (decoder output, 0-based)")
    layers_ax.set_ylabel("gain over unsteered (points)")
    kl_ax.set_ylabel("KL(unsteered || steered), first answer token (nats)")
    layers_ax.set_ylim(-5, 112)
    layers_ax.set_title("Layer scores on dev (one layer steered at a time)")
    handles, labels = layers_ax.get_legend_handles_labels()
    more_handles, more_labels = kl_ax.get_legend_handles_labels()
    layers_ax.legend(handles + more_handles, labels + more_labels, fontsize=6, loc="upper left")
    layers_ax.grid(alpha=0.3)

    gates = summary.gate_candidates
    x_gate = [g.layer for g in gates]
    gate_ax.plot(x_gate, [100 * g.harmful_tpr for g in gates], "o-", label="harmful dev TPR")
    gate_ax.plot(x_gate, [100 * g.benign_fpr for g in gates], "s-", label="benign dev FPR (LOO)")
    gate_ax.axvline(summary.detection_layer, color="grey", alpha=0.35, linewidth=6)
    gate_ax.set_xticks(x_gate)
    gate_ax.set_ylim(0, 105)
    gate_ax.set_xlabel("detection layer")
    gate_ax.set_ylabel("prompts on which any category fires (%)")
    gate_ax.set_title("Gate candidates")
    gate_ax.legend(fontsize=7)
    gate_ax.grid(alpha=0.3)

    strengths = summary.strength_scores
    x_strength = [s.strength for s in strengths]
    strength_ax.plot(x_strength, [100 * s.refused for s in strengths], "o-", label="refused")
    strength_ax.plot(x_strength, [100 * s.coherent for s in strengths], "s-", label="coherent")
    strength_ax.axvline(summary.strength, color="grey", alpha=0.35, linewidth=6)
    strength_ax.set_ylim(0, 105)
    strength_ax.set_xlabel("strength (x chosen scales)")
    strength_ax.set_ylabel("harmful dev answers that fired (%)")
    strength_ax.set_title("Gated strength")
    strength_ax.legend(fontsize=7)
    strength_ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path
