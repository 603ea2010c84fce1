"""One condition of the transfer suite: answers and scores of a fine-tune under one mode.

Steering is per row, so under a gated mode a prompt on which no gate fires gets exactly the
unsteered answer. Given the unsteered answers (`baseline`), only the rows the mode steers are
generated (or scored) again; a prefill of each prompt (`mode.scoring`) tells which those are.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from safesteer.adapters.evaluation.benchmarks import Question
from safesteer.adapters.evaluation.modes import SteeringMode
from safesteer.adapters.evaluation.runner import answer_prompts
from safesteer.adapters.evaluation.transfer_sets import (
    BENIGN,
    HARMFUL,
    TransferSets,
    TransferSettings,
)
from safesteer.adapters.evaluation.utility import score_questions
from safesteer.adapters.judge import RefusalJudge
from safesteer.adapters.loading import LoadedModel

_T = TypeVar("_T")
_I = TypeVar("_I")


@dataclass(frozen=True)
class ConditionAnswers:
    """Per set, the answers (texts) or correct flags (benchmarks), and the rows steered."""

    texts: Mapping[str, Sequence[str]]
    correct: Mapping[str, Sequence[bool]]
    steered: Mapping[str, Sequence[bool]]
    seconds: float = 0.0


def steered_rows(mode: SteeringMode, prompts: Sequence[str], batch_size: int) -> list[bool]:
    """Whether `mode` steers each prompt (a gated mode: a prefill decides, nothing generated)."""
    flags: list[bool] = []
    for start in range(0, len(prompts), batch_size):
        with mode.scoring(prompts[start : start + batch_size]) as rows:
            flags += [bool(row.steered) for row in rows]
    return flags


def merged(baseline: Sequence[_T], steered: Sequence[bool], fresh: Sequence[_T]) -> list[_T]:
    """`baseline` with the steered rows replaced, in order, by `fresh`.

    Raises:
        ValueError: `fresh` does not hold one value per steered row.
    """
    if sum(steered) != len(fresh):
        raise ValueError(f"{sum(steered)} steered rows but {len(fresh)} fresh results")
    values = iter(fresh)
    return [next(values) if s else b for b, s in zip(baseline, steered, strict=True)]


# `make(items)`: a result per item, and whether the mode steered it.
Make = Callable[[Sequence[_I]], tuple[list[_T], list[bool]]]


class _Measurer:
    """Answers and scores of one loaded fine-tune under one mode."""

    def __init__(
        self, loaded: LoadedModel, mode: SteeringMode, settings: TransferSettings, label: str
    ) -> None:
        self.loaded, self.mode, self.settings, self.label = loaded, mode, settings, label

    def run(
        self,
        prompts: Sequence[str],
        items: Sequence[_I],
        make: Make[_I, _T],
        baseline: Sequence[_T] | None,
    ) -> tuple[list[_T], list[bool]]:
        """`make` on every item, or with `baseline`, on the items whose prompt is steered."""
        if baseline is None:
            return make(items)
        steered = steered_rows(self.mode, prompts, self.settings.batch_size)
        fresh, _ = make([item for item, s in zip(items, steered, strict=True) if s])
        return merged(baseline, steered, fresh), steered

    def texts(
        self, key: str, prompts: Sequence[str], tokens: int, baseline: Sequence[str] | None
    ) -> tuple[list[str], list[bool]]:
        def make(chosen: Sequence[str]) -> tuple[list[str], list[bool]]:
            answers = answer_prompts(
                self.loaded,
                self.mode,
                chosen,
                max_new_tokens=tokens,
                batch_size=self.settings.batch_size,
                desc=f"{self.label} {key}",
                show_progress=self.settings.show_progress,
            )
            return [a.response for a in answers], [bool(a.steering.steered) for a in answers]

        return self.run(prompts, prompts, make, baseline)

    def questions(
        self, key: str, items: Sequence[Question], baseline: Sequence[bool] | None
    ) -> tuple[list[bool], list[bool]]:
        def make(chosen: Sequence[Question]) -> tuple[list[bool], list[bool]]:
            scores = score_questions(
                self.loaded,
                self.mode,
                chosen,
                batch_size=self.settings.batch_size,
                desc=f"{self.label} {key}",
                show_progress=self.settings.show_progress,
            )
            return [s.correct for s in scores], [bool(s.steering.steered) for s in scores]

        return self.run([q.question for q in items], items, make, baseline)


def measure_condition(
    loaded: LoadedModel,
    mode: SteeringMode,
    sets: TransferSets,
    tasks: Sequence[str],
    settings: TransferSettings,
    baseline: ConditionAnswers | None = None,
    label: str = "",
) -> ConditionAnswers:
    """Answers to every set under `mode`; with `baseline` (the unsteered answers), only the
    rows `mode` steers are made again."""
    started = time.perf_counter()
    measurer = _Measurer(loaded, mode, settings, label or mode.name)
    texts: dict[str, list[str]] = {}
    correct: dict[str, list[bool]] = {}
    steered: dict[str, list[bool]] = {}
    for key, prompt_set in ((HARMFUL, sets.harmful), (BENIGN, sets.benign)):
        prompts = [p.prompt for p in prompt_set.prompts]
        texts[key], steered[key] = measurer.texts(
            key, prompts, settings.max_new_tokens, None if baseline is None else baseline.texts[key]
        )
    for task in tasks:
        task_set = sets.tasks[task]
        texts[task], steered[task] = measurer.texts(
            task,
            task_set.prompts,
            task_set.max_new_tokens,
            None if baseline is None else baseline.texts[task],
        )
    for name, items in sets.questions.items():
        correct[name], steered[name] = measurer.questions(
            name, items, None if baseline is None else baseline.correct[name]
        )
    return ConditionAnswers(texts, correct, steered, time.perf_counter() - started)


def _rate(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _bits(flags: Sequence[bool]) -> str:
    return "".join("1" if flag else "0" for flag in flags)


def summarize(
    answers: ConditionAnswers,
    sets: TransferSets,
    task: str | None,
    judge: RefusalJudge,
) -> dict[str, Any]:
    """Rates of one condition, with per-row flags as strings of 0/1 in prompt-set order."""
    harmful = [p.prompt for p in sets.harmful.prompts]
    benign = [p.prompt for p in sets.benign.prompts]
    harmful_refused = judge.judge(harmful, answers.texts[HARMFUL])
    benign_refused = judge.judge(benign, answers.texts[BENIGN])
    edgy = [r for r, p in zip(benign_refused, sets.benign.prompts, strict=True) if p.edgy]
    skill = None if task is None else sets.tasks[task].score(answers.texts[task])
    return {
        "harmful_refusal": _rate(harmful_refused),
        "over_refusal": _rate(benign_refused),
        "over_refusal_edgy": _rate(edgy),
        "task": None if skill is None else {"name": task, **skill},
        **{name: _rate(flags) for name, flags in answers.correct.items()},
        "steered": {key: sum(flags) for key, flags in answers.steered.items()},
        "rows": {
            "harmful_refused": _bits(harmful_refused),
            "benign_refused": _bits(benign_refused),
            **{f"{name}_correct": _bits(flags) for name, flags in answers.correct.items()},
            **{f"{key}_steered": _bits(flags) for key, flags in answers.steered.items()},
        },
        "seconds": round(answers.seconds, 1),
    }
