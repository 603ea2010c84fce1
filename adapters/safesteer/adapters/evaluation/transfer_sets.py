"""The settings and the prompt sets of `safesteer eval --suite transfer`.

Every fine-tune and condition is measured on the same seeded subsets: the harmful and the
benign test split (`limit_prompts`, as `safesteer eval --limit` picks them), the zoo's task
eval sets (`zoo_skill.task_sets`, same limit and seed) and, per benchmark, a seeded subset of
the questions `safesteer eval` scores (`EVALUATED_QUESTIONS` drawn by `EVALUATED_SEED`).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from safesteer.adapters.calibrate import DEFAULT_SHOTS
from safesteer.adapters.evaluation.benchmarks import (
    EVALUATED_QUESTIONS,
    EVALUATED_SEED,
    Question,
    load_questions,
)
from safesteer.adapters.evaluation.prompt_sets import (
    PromptSet,
    limit_prompts,
    project_benign,
    project_harmful,
)
from safesteer.adapters.zoo_skill import SkillSettings, TaskSet, task_sets
from safesteer.adapters.zoo_spec import ZooSpec

BENCHMARKS: tuple[str, ...] = ("mmlu", "arc")
HARMFUL, BENIGN = "harmful", "benign"
_T = TypeVar("_T")


@dataclass(frozen=True)
class TransferSettings:
    """How many prompts, how answers are made, and how calibration is run."""

    limit: int | None = None  # harmful, benign and task prompts per set (seeded); None: all
    utility_limit: int | None = EVALUATED_QUESTIONS  # questions per benchmark
    seed: int = 0
    max_new_tokens: int = 64  # harmful and benign answers; task answers: zoo_skill's
    batch_size: int = 16
    shots: int = DEFAULT_SHOTS
    judge: str = "keyword"
    show_progress: bool = True

    def __post_init__(self) -> None:
        for name in ("limit", "utility_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be at least 1")

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "show_progress"}


@dataclass(frozen=True)
class TransferSets:
    """The prompts every fine-tune and condition is measured on."""

    harmful: PromptSet
    benign: PromptSet
    tasks: Mapping[str, TaskSet]
    questions: Mapping[str, Sequence[Question]]

    def to_json(self) -> dict[str, Any]:
        def digest(text: str) -> str:
            return hashlib.sha256(text.encode()).hexdigest()[:10]

        return {
            HARMFUL: {
                "source": self.harmful.source,
                "ids": [p.id for p in self.harmful.prompts],
            },
            BENIGN: {"source": self.benign.source, "ids": [p.id for p in self.benign.prompts]},
            "tasks": {
                name: {
                    "file": str(task.file),
                    "max_new_tokens": task.max_new_tokens,
                    "prompt_sha256_10": [digest(p) for p in task.prompts],
                }
                for name, task in self.tasks.items()
            },
            "questions": {
                name: {
                    "source": f"the {EVALUATED_QUESTIONS} questions `safesteer eval` scores "
                    f"(seed {EVALUATED_SEED}), {len(items)} of them by seed",
                    "ids": [q.id for q in items],
                }
                for name, items in self.questions.items()
            },
        }


def seeded_subset(items: Sequence[_T], limit: int | None, salt: str) -> list[_T]:
    """At most `limit` items chosen by `salt`, in their original order."""
    if limit is None or limit >= len(items):
        return list(items)
    keep = sorted(random.Random(salt).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def transfer_sets(spec: ZooSpec, data_dir: Path, settings: TransferSettings) -> TransferSets:
    """The test-split prompts, the zoo's task sets and the benchmark questions, seeded.

    Raises:
        ZooSpecError: a task eval file is missing from `data_dir`.
    """
    skill = SkillSettings(limit=settings.limit, seed=settings.seed, batch_size=settings.batch_size)
    questions = {
        name: seeded_subset(
            load_questions(name, EVALUATED_QUESTIONS, EVALUATED_SEED),
            settings.utility_limit,
            f"transfer:{settings.seed}:{name}",
        )
        for name in BENCHMARKS
    }
    return TransferSets(
        limit_prompts(project_harmful(), settings.limit, settings.seed),
        limit_prompts(project_benign(), settings.limit, settings.seed),
        task_sets(spec, data_dir, skill),
        questions,
    )
