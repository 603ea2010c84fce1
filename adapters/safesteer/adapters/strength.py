"""The steering strength of a gated adapter, chosen on dev prompts on which its gate fires.

Gated steering only touches prompts whose condition probes fire, so it can push harder than an
always-on adapter could afford. For each candidate setting (a set of steering layers with
their scales, and a strength that multiplies the scales) the harmful dev prompts that fire
are answered greedily under gated steering, and two shares are measured:

- `refused`: answers the judge counts as refusals (refusal given fired);
- `coherent`: answers that do not degenerate (`coherent_text`: no word run repeated over and
  over, no long answer made mostly of repeated words);
- `refused_coherent`: answers that are both, the answer a gated adapter is for.

The rule (`choose_strength`): among settings whose coherent share is at least `min_coherent`,
the one with the most coherent refusals (ties: fewer layers, then the smaller strength); when
none is coherent enough, the most coherent one (same ties). Counting only coherent refusals
keeps a push that turns one more answer into a refusal from winning while it makes several
others degenerate.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from safesteer.adapters.extract import is_repetitive

# A run of the same 1-6 words repeated this many times in a row reads as degenerate
# ("I'm not. I'm not. I'm not.", "help you else. I could help you else. ...").
_REPEATED_RUN = re.compile(r"\b((?:\S+\s+){1,6}?)\1{2,}", re.IGNORECASE)


def coherent_text(text: str) -> bool:
    """A crude degeneration check: no short phrase thrice in a row, not mostly repeated words."""
    words = " ".join(text.split()) + " "
    return not is_repetitive(text) and _REPEATED_RUN.search(words) is None


@dataclass(frozen=True)
class StrengthScore:
    """Gated answers of the harmful dev prompts that fired, at one strength (shares in [0, 1])."""

    strength: float
    fired: int
    refused: float
    coherent: float
    benign_fired: int = 0
    benign_refused: float = 0.0
    layers: tuple[int, ...] = ()  # the steering layers of the setting
    refused_coherent: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "layers": list(self.layers)}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> StrengthScore:
        return cls(
            layers=tuple(int(layer) for layer in raw.get("layers", ())),
            strength=float(raw["strength"]),
            fired=int(raw["fired"]),
            refused=float(raw["refused"]),
            coherent=float(raw["coherent"]),
            benign_fired=int(raw.get("benign_fired", 0)),
            benign_refused=float(raw.get("benign_refused", 0.0)),
            # Recipes written before it was measured: its lower bound.
            refused_coherent=float(
                raw.get("refused_coherent", max(0.0, float(raw["refused"]) + raw["coherent"] - 1))
            ),
        )


def describe_rule(min_coherent: float) -> str:
    return (
        f"among settings (layer set, strength) whose gated answers to the harmful dev prompts "
        f"that fire are coherent at least {min_coherent:.0%} of the time, the one with the most "
        "coherent refusals (ties: fewer layers, then the smaller strength); if none is that "
        "coherent, the most coherent (same ties)"
    )


def choose_strength(scores: Sequence[StrengthScore], min_coherent: float) -> StrengthScore:
    """Apply the rule of the module docstring.

    Raises:
        ValueError: no scores.
    """
    if not scores:
        raise ValueError("no strengths were measured")
    coherent = [s for s in scores if s.coherent >= min_coherent]
    if coherent:
        return max(coherent, key=lambda s: (s.refused_coherent, -len(s.layers), -s.strength))
    return max(scores, key=lambda s: (s.coherent, -len(s.layers), -s.strength))
