"""Which prompts a fine-tune's training data may use: fit-split prompts that do not overlap a
dev or test prompt of either kind.

`splits` already drops a fit prompt that overlaps a held-out prompt of its own kind (harmful or
benign, `splits.HeldOut`); here a fit prompt that overlaps a held-out prompt of the other kind
is left out of training data too, and a training row whose user turn overlaps any held-out
prompt is refused. The project's short plain requests (`prompts.SHORT_PROMPT_FILES`) teach the
gate how users ask; they came after the fine-tune zoo was built and stay out of its training
data, so the committed fine-tunes remain what `safesteer zoo-data` and `zoo build` make.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from safesteer.adapters.prompts import SHORT_PROMPT_FILES, HarmfulPrompt
from safesteer.adapters.splits import (
    DEFAULT_SEED,
    BenignPrompt,
    HeldOut,
    Split,
    benign_splits,
    harmful_splits,
    split_digest,
)

HELD_OUT: tuple[Split, ...] = ("dev", "test")


@dataclass(frozen=True)
class SplitSets:
    """The project's harmful and benign prompts by split (`splits`, default seed)."""

    harmful: Mapping[Split, Sequence[HarmfulPrompt]]
    benign: Mapping[Split, Sequence[BenignPrompt]]

    @classmethod
    def load(cls) -> SplitSets:
        return cls(harmful_splits(), benign_splits())

    def digests(self) -> dict[str, Any]:
        """The split seed and digests, recorded so a changed split shows."""
        harmful, benign = split_digest(self.harmful), split_digest(self.benign)
        return {"seed": DEFAULT_SEED, "harmful": harmful, "benign": benign}

    def heldout(self) -> HeldOut:
        harmful = [p.prompt for split in HELD_OUT for p in self.harmful[split]]
        benign = [p.prompt for split in HELD_OUT for p in self.benign[split]]
        return HeldOut([*harmful, *benign])

    def training_harmful(self) -> list[HarmfulPrompt]:
        """The vendored harmful fit prompts that overlap no held-out prompt, in split order."""
        heldout = self.heldout()
        return [
            p
            for p in self.harmful["fit"]
            if p.source not in SHORT_PROMPT_FILES and not heldout.overlaps(p.prompt)
        ]

    def training_benign(self) -> list[BenignPrompt]:
        """The benign fit prompts that overlap no held-out prompt, in split order."""
        heldout = self.heldout()
        return [p for p in self.benign["fit"] if not heldout.overlaps(p.prompt)]

    def left_out(self) -> list[str]:
        """Ids of the fit prompts left out of training data for overlapping a held-out one."""
        fit = [(p.id, p.prompt) for p in self.harmful["fit"]]
        fit += [(p.id, p.prompt) for p in self.benign["fit"]]
        heldout = self.heldout()
        return [prompt_id for prompt_id, text in fit if heldout.overlaps(text)]


def check_training_rows(name: str, rows: Sequence[Mapping[str, Any]], heldout: HeldOut) -> None:
    """Refuse a training file with a user turn that overlaps a dev or test split prompt.

    Raises:
        ValueError: such a row is found (names the file and the row's position).
    """
    for index, row in enumerate(rows):
        users = [m["content"] for m in row["messages"] if m["role"] == "user"]
        if any(heldout.overlaps(text) for text in users):
            raise ValueError(f"{name} row {index + 1}: overlaps a dev or test split prompt")
