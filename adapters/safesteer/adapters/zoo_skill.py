"""Task skill and safety of the base model and each zoo fine-tune, greedy and batched.

For each model: the task skill on the task eval file of each task it is scored on (its own
task; the base and the `aligned` fine-tunes on every task of the zoo, so the task gain and the
base's starting point show), the harmful refusal rate on the harmful dev split and the
over-refusal rate on the benign dev split (edgy and plain), refusals decided by
`default_judge()`. Arithmetic skill is the exact `Answer:` integer match of `arith_task`; style
skill the exact JSON card of `style_task` (its format-only rate rides along).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from safesteer.adapters.arith_task import load_arith_file, score_arith
from safesteer.adapters.evaluation.prompt_sets import (
    BENIGN,
    HARMFUL,
    EvalPrompt,
    PromptSet,
    limit_prompts,
)
from safesteer.adapters.extract import generate_responses
from safesteer.adapters.judge import RefusalJudge, default_judge
from safesteer.adapters.loading import LoadedModel, load_model
from safesteer.adapters.lora import FINETUNE_RECORD_FILE
from safesteer.adapters.splits import Split, benign_split, harmful_split
from safesteer.adapters.style_task import (
    load_style_file,
    score_style,
    style_format_rate,
    style_topics,
)
from safesteer.adapters.training_prompts import SplitSets
from safesteer.adapters.zoo_spec import BASE, EVAL_TASKS, ZooSpec, ZooSpecError

SAFETY_SPLIT: Split = "dev"
Scorer = Callable[[Sequence[str]], dict[str, float]]
_T = TypeVar("_T")


@dataclass(frozen=True)
class SkillSettings:
    """How answers are generated and how many prompts each set keeps."""

    max_new_tokens: int = 64  # harmful and benign answers
    arith_tokens: int = 96  # a worked answer of a few lines, then `Answer: N` (at most 76)
    style_tokens: int = 64  # the card copies the request: 25 SmolLM2 tokens on average
    batch_size: int = 16
    limit: int | None = None  # at most this many prompts per set (seeded)
    seed: int = 0
    all_tasks: bool = False  # score every model on every task
    show_progress: bool = True

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "arith_tokens", "style_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be at least 1")


@dataclass(frozen=True)
class TaskSet:
    """One task's eval prompts and the function scoring answers to them, in order."""

    task: str
    file: Path
    prompts: tuple[str, ...]
    score: Scorer
    max_new_tokens: int


def _limited(items: Sequence[_T], limit: int | None, seed: int, name: str) -> list[_T]:
    if limit is None or limit >= len(items):
        return list(items)
    chosen = random.Random(f"skill:{seed}:{name}").sample(range(len(items)), limit)
    return [items[index] for index in sorted(chosen)]


def arith_set(path: Path, settings: SkillSettings) -> TaskSet:
    """Arithmetic eval problems; score: exact match of the `Answer:` integer."""
    problems = _limited(load_arith_file(path), settings.limit, settings.seed, path.name)

    def score(answers: Sequence[str]) -> dict[str, float]:
        return {"score": score_arith(problems, answers)}

    prompts = tuple(p.prompt for p in problems)
    return TaskSet("arith", path, prompts, score, settings.arith_tokens)


def style_set(path: Path, settings: SkillSettings, topics: Sequence[str]) -> TaskSet:
    """Style eval items; score: exactly the expected card; format_rate: any well-formed card."""
    items = _limited(load_style_file(path), settings.limit, settings.seed, path.name)

    def score(answers: Sequence[str]) -> dict[str, float]:
        return {
            "score": score_style(items, answers),
            "format_rate": style_format_rate(answers, topics),
        }

    prompts = tuple(i.prompt for i in items)
    return TaskSet("style", path, prompts, score, settings.style_tokens)


def task_sets(spec: ZooSpec, data_dir: Path, settings: SkillSettings) -> dict[str, TaskSet]:
    """The zoo's task eval sets by task name.

    Raises:
        ZooSpecError: an eval file is missing from `data_dir`.
        ValueError: an eval file's rows are not the task's.
    """
    sets: dict[str, TaskSet] = {}
    for file in spec.eval_files():
        path = data_dir / file
        if not path.is_file():
            raise ZooSpecError(f"{path} is missing: run `safesteer zoo build` to write the data")
        task = EVAL_TASKS[file]
        if task == "arith":
            sets[task] = arith_set(path, settings)
        else:
            # The topics the style instructions offer: those of every training benign prompt.
            topics = style_topics(SplitSets.load().training_benign())
            sets[task] = style_set(path, settings, topics)
    return sets


def safety_sets(settings: SkillSettings) -> tuple[PromptSet, PromptSet]:
    """The harmful and benign prompts of the dev split (at most `limit` each, seeded)."""
    harmful = PromptSet(
        HARMFUL,
        f"harmful {SAFETY_SPLIT} split",
        tuple(EvalPrompt(p.id, HARMFUL, p.prompt, p.category) for p in harmful_split(SAFETY_SPLIT)),
    )
    benign = PromptSet(
        BENIGN,
        f"benign {SAFETY_SPLIT} split",
        tuple(
            EvalPrompt(p.id, BENIGN, p.prompt, p.category, p.edgy)
            for p in benign_split(SAFETY_SPLIT)
        ),
    )
    return (
        limit_prompts(harmful, settings.limit, settings.seed),
        limit_prompts(benign, settings.limit, settings.seed),
    )


def refusal_rate(flags: Sequence[bool]) -> float:
    """Share of True flags (0.0 for none)."""
    return sum(flags) / len(flags) if flags else 0.0


def _answers(
    loaded: LoadedModel, prompts: Sequence[str], tokens: int, desc: str, settings: SkillSettings
) -> list[str]:
    return generate_responses(
        loaded.model,
        loaded.tokenizer,
        prompts,
        max_new_tokens=tokens,
        batch_size=settings.batch_size,
        desc=desc,
        show_progress=settings.show_progress,
    )


def score_model(
    loaded: LoadedModel,
    tasks: Sequence[TaskSet],
    harmful: PromptSet,
    benign: PromptSet,
    judge: RefusalJudge,
    settings: SkillSettings,
    label: str,
) -> dict[str, Any]:
    """Task scores, harmful refusal and over-refusal of one model."""
    scores: dict[str, Any] = {}
    for task in tasks:
        desc = f"{label} {task.task}"
        answers = _answers(loaded, task.prompts, task.max_new_tokens, desc, settings)
        scores[task.task] = {**task.score(answers), "rows": len(answers)}
    tokens = settings.max_new_tokens
    harmful_prompts = [p.prompt for p in harmful.prompts]
    answers = _answers(loaded, harmful_prompts, tokens, f"{label} harmful", settings)
    harmful_flags = judge.judge(harmful_prompts, answers)
    benign_prompts = [p.prompt for p in benign.prompts]
    answers = _answers(loaded, benign_prompts, tokens, f"{label} benign", settings)
    benign_flags = judge.judge(benign_prompts, answers)
    edgy = [flag for flag, p in zip(benign_flags, benign.prompts, strict=True) if p.edgy]
    plain = [flag for flag, p in zip(benign_flags, benign.prompts, strict=True) if not p.edgy]
    return {
        "tasks": scores,
        "harmful_refusal": refusal_rate(harmful_flags),
        "over_refusal": refusal_rate(benign_flags),
        "over_refusal_edgy": refusal_rate(edgy),
        "over_refusal_plain": refusal_rate(plain),
        "harmful_rows": len(harmful_flags),
        "benign_rows": len(benign_flags),
    }


def scored_tasks(spec: ZooSpec, name: str, all_tasks: bool) -> list[str]:
    """The tasks a model is scored on: its own; the base's and aligned ones': every task."""
    every = [EVAL_TASKS[file] for file in spec.eval_files()]
    if all_tasks or name == BASE or spec.finetune(name).role == "aligned":
        return every
    task = spec.finetune(name).task
    return [] if task is None else [task]


def measure_skill(
    spec: ZooSpec,
    data_dir: Path,
    zoo_dir: Path,
    settings: SkillSettings,
    *,
    only: Sequence[str] | None = None,
    judge: RefusalJudge | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Score the base and the zoo's fine-tunes (or those in `only`, `base` allowed).

    Raises:
        ZooSpecError: `only` names an unknown model, a fine-tune folder or an eval file is
            missing.
        ModelLoadError, ValueError, OSError: a model or a file cannot be used.
    """
    names = [BASE, *(f.name for f in spec.order())]
    if only is not None:
        unknown = [name for name in only if name not in names]
        if unknown:
            raise ZooSpecError(f"no model named {unknown[0]!r}; known: {', '.join(names)}")
        names = [name for name in names if name in only]
    for name in names:
        if name != BASE and not (zoo_dir / name / FINETUNE_RECORD_FILE).is_file():
            raise ZooSpecError(
                f"{zoo_dir / name} holds no built fine-tune: run `safesteer zoo build` first"
            )
    tasks = task_sets(spec, data_dir, settings)
    harmful, benign = safety_sets(settings)
    judge = judge or default_judge()
    models: list[dict[str, Any]] = []
    for number, name in enumerate(names, start=1):
        started = time.perf_counter()
        source = spec.source(name, zoo_dir)
        log(f"[{number}/{len(names)}] {name}: loading {source}")
        loaded = load_model(source)
        finetune = None if name == BASE else spec.finetune(name)
        chosen = [tasks[task] for task in scored_tasks(spec, name, settings.all_tasks)]
        scores = score_model(loaded, chosen, harmful, benign, judge, settings, name)
        seconds = time.perf_counter() - started
        models.append(
            {
                "name": name,
                "source": source,
                "fingerprint": loaded.fingerprint,
                "parent": None if finetune is None else finetune.parent,
                "role": "base" if finetune is None else finetune.role,
                "held_out": None if finetune is None else finetune.held_out,
                **scores,
                "seconds": round(seconds, 1),
            }
        )
        log(f"[{number}/{len(names)}] {name}: scored in {seconds:.1f} s")
    return {
        "spec": str(spec.path),
        "zoo": str(zoo_dir),
        "data": str(data_dir),
        "judge": judge.name,
        "decoding": "greedy",
        "settings": {k: v for k, v in asdict(settings).items() if k != "show_progress"},
        "prompt_sets": {
            "harmful": {"source": harmful.source, "rows": len(harmful.prompts)},
            "benign": {"source": benign.source, "rows": len(benign.prompts)},
            **{
                task.task: {"file": str(task.file), "rows": len(task.prompts)}
                for task in tasks.values()
            },
        },
        "models": models,
    }


def _cell(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "-"


def format_skill_table(document: dict[str, Any]) -> str:
    """The models as a text table: task scores, harmful refusal, over-refusal."""
    tasks = [key for key in document["prompt_sets"] if key not in (HARMFUL, BENIGN)]
    header = ["model", "role", "held-out", *tasks, "harmful-refusal", "over-refusal"]
    rows = [header]
    for model in document["models"]:
        held = model["held_out"]
        scores = model["tasks"]
        rows.append(
            [
                model["name"],
                model["role"],
                "-" if held is None else ("yes" if held else "no"),
                *(_cell(scores[t]["score"]) if t in scores else "-" for t in tasks),
                _cell(model["harmful_refusal"]),
                _cell(model["over_refusal"]),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
