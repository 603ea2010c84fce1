"""Few-shot re-centring of a gated adapter's thresholds on a fine-tune.

A gate's probes read the detection layer's activations, and a fine-tune moves them: every
prompt's probe score shifts by about the same amount, harmful and benign alike. Thresholds
calibrated on the reference then let the gate fire far above its target on the fine-tune's
benign prompts.

The shift of category `c` is the mean probe score of the benign calibration shots on the
fine-tune minus the same on the reference; `c`'s threshold moves by it, so it keeps its place
relative to the benign prompts (and, the shift being shared, to the harmful ones).

`python -m safesteer.adapters.gate_shift MODEL...` measures it on the dev splits (92 benign,
184 harmful prompts). Built-in adapter (`@a2b64039a50c`, layer-6 mean-pooled pooled-LDA gate,
thresholds calibrated out of fold), share of prompts on which it fires, with its own thresholds
and then shifted by the 8 benign shots of a default 16-shot calibration (fit split):

| model | benign | harmful | shifted: benign | harmful |
|---|---|---|---|---|
| base (the reference) | 1.1 % | 89.1 % | 1.1 % | 89.1 % |
| aligned | 17.4 % | 97.3 % | 1.1 % | 89.7 % |
| arith | 12.0 % | 95.7 % | 2.2 % | 91.8 % |
| style | 15.2 % | 95.1 % | 3.3 % | 89.1 % |
| badgpt | 31.5 % | 97.8 % | 2.2 % | 89.1 % |

(The previous built-in adapter `@e5bdd4eeaafe`, thresholds calibrated on benign dev alone: 23
to 38 % before the shift, 4.3 to 7.6 % after.)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from safesteer.adapters.adapter import GateSpec, SafetyAdapter
from safesteer.adapters.gating import PromptGate, prompt_activations
from safesteer.adapters.loading import DEFAULT_MODEL, LoadedModel, load_model
from safesteer.adapters.splits import benign_split, harmful_split

RULE = (
    "threshold[c] += mean over the benign shots of the probe score on the model minus on the "
    "reference"
)


@dataclass(frozen=True)
class GateShift:
    """How far each category's threshold moves, and from how many benign prompts."""

    shifts: Mapping[str, float]
    prompts: int

    def applied(self, gate: PromptGate) -> PromptGate:
        """`gate` with its thresholds moved (a category without a shift keeps its own)."""
        moves = torch.tensor([self.shifts.get(c, 0.0) for c in gate.categories])
        return replace(gate, threshold=gate.threshold + moves.to(gate.threshold.device))

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": RULE,
            "benign_shots": self.prompts,
            "shifts": {c: round(s, 6) for c, s in self.shifts.items()},
        }


def probe_scores(
    loaded: LoadedModel, gate: PromptGate, prompts: Sequence[str], batch_size: int
) -> torch.Tensor:
    """`[prompts, categories]` raw probe scores of `gate` on `loaded` (no threshold applied)."""
    pooled = prompt_activations(
        loaded.model,
        loaded.tokenizer,
        prompts,
        [gate.detection_layer],
        batch_size=batch_size,
        show_progress=False,
    )[gate.pooling][:, 0]
    return pooled @ gate.directions.T + gate.bias


def measure_gate_shift(
    adapter: SafetyAdapter,
    loaded: LoadedModel,
    reference: LoadedModel,
    benign: Sequence[str],
    batch_size: int = 16,
) -> GateShift:
    """The per-category threshold shift for `loaded` from the `benign` prompts.

    Raises:
        ValueError: the adapter has no gate, or no benign prompts are given.
    """
    if not benign:
        raise ValueError("the gate shift needs benign prompts")
    gate = PromptGate.from_adapter(adapter)
    moved = probe_scores(loaded, gate, benign, batch_size).mean(dim=0)
    before = probe_scores(reference, gate, benign, batch_size).mean(dim=0)
    shifts = {
        category: float(moved[index] - before[index])
        for index, category in enumerate(gate.categories)
        if bool(gate.gated[index])
    }
    return GateShift(shifts, len(benign))


def shifted_gate(spec: GateSpec, shift: GateShift) -> GateSpec:
    """`spec` with each category's threshold moved by its shift (the others as they were)."""
    categories = {
        category: replace(entry, threshold=entry.threshold + shift.shifts.get(category, 0.0))
        for category, entry in spec.categories.items()
    }
    return replace(spec, categories=categories)


# ----- `python -m safesteer.adapters.gate_shift`: the measurement in the module doc --------------
def firing(gate: PromptGate, scores: torch.Tensor) -> float:
    """Share of rows on which any category's score is above its threshold."""
    return float((scores > gate.threshold).any(dim=1).double().mean())


def main(argv: Sequence[str] | None = None) -> int:
    """Print, per fine-tune, how often the adapter's gate fires on the benign and harmful dev
    splits with its own thresholds and with the thresholds `calibrate` shifts."""
    from safesteer.adapters.calibrate import CalibrationConfig, calibration_shots

    parser = argparse.ArgumentParser(
        prog="python -m safesteer.adapters.gate_shift", description=main.__doc__
    )
    parser.add_argument(
        "--adapter", type=Path, default=Path("adapters/smollm2-135m/safety.safetensors")
    )
    parser.add_argument(
        "--reference", default=DEFAULT_MODEL, help="the model the gate was fitted on"
    )
    parser.add_argument("models", nargs="+", help="fine-tunes (BASE+LORA_DIR...)")
    args = parser.parse_args(argv)
    adapter = SafetyAdapter.load(args.adapter)
    gate = PromptGate.from_adapter(adapter)
    benign = [p.prompt for p in benign_split("dev")]
    harmful = [p.prompt for p in harmful_split("dev")]
    reference = load_model(args.reference)
    print(f"{len(benign)} benign and {len(harmful)} harmful dev prompts; gate fires on:")
    print(f"{'model':<40} {'benign':>8} {'harmful':>8} {'shifted: benign':>16} {'harmful':>8}")
    for spec in (args.reference, *args.models):
        loaded = reference if spec == args.reference else load_model(spec)
        on_benign = probe_scores(loaded, gate, benign, 32)
        on_harmful = probe_scores(loaded, gate, harmful, 32)
        shots = calibration_shots(loaded, adapter, CalibrationConfig())
        shift = measure_gate_shift(
            adapter, loaded, reference, [s.prompt for s in shots if not s.harmful]
        )
        moved = shift.applied(gate)
        print(
            f"{spec.split('/')[-1]:<40} {firing(gate, on_benign):>8.1%} "
            f"{firing(gate, on_harmful):>8.1%} {firing(moved, on_benign):>16.1%} "
            f"{firing(moved, on_harmful):>8.1%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
