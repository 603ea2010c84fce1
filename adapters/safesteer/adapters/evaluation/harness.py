"""One evaluation end to end: prompts -> answers per mode -> judge -> utility -> results."""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.evaluation.benchmarks import (
    EVALUATED_QUESTIONS,
    load_questions,
    load_references,
)
from safesteer.adapters.evaluation.judging import make_judge
from safesteer.adapters.evaluation.modes import NONE, ModeSet, SteeringMode, default_modes
from safesteer.adapters.evaluation.prompt_sets import (
    EvalPrompt,
    PromptSet,
    benign_file,
    harmful_file,
    limit_prompts,
    project_benign,
    project_harmful,
)
from safesteer.adapters.evaluation.report import write_report
from safesteer.adapters.evaluation.results import (
    EvalResults,
    EvalRow,
    PerplexityRow,
    RunInfo,
    UtilityRow,
)
from safesteer.adapters.evaluation.runner import answer_prompts
from safesteer.adapters.evaluation.utility import reference_perplexity, score_questions
from safesteer.adapters.judge import RefusalJudge
from safesteer.adapters.loading import LoadedModel, load_model
from safesteer.adapters.merging import SCHEMES, merge_scheme

BENCHMARKS: tuple[str, ...] = ("mmlu", "arc")
PERPLEXITY = "perplexity"
UTILITY_CHOICES: tuple[str, ...] = (*BENCHMARKS, PERPLEXITY)
RESULTS = "results.json"


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how; `command` is the command line that reproduces the run."""

    model: str
    adapter: Path | None = None
    modes: tuple[str, ...] = ()  # empty: `default_modes(adapter)`
    harmful: Path | None = None  # None: the project's test split
    benign: Path | None = None
    harmful_category: str | None = None
    limit: int | None = None
    max_new_tokens: int = 64
    batch_size: int = 16
    utility: tuple[str, ...] = UTILITY_CHOICES
    utility_limit: int | None = EVALUATED_QUESTIONS
    selectivity: bool = True
    judge: str = "keyword"
    seed: int = 0
    show_progress: bool = True
    command: str = ""
    merge: str | None = None  # None: the adapter recipe's `merge`, else naive

    def __post_init__(self) -> None:
        unknown = [u for u in self.utility if u not in UTILITY_CHOICES]
        if unknown:
            raise ValueError(f"unknown utility {unknown}; known: {', '.join(UTILITY_CHOICES)}")
        if len(set(self.modes)) != len(self.modes):
            raise ValueError(f"a mode is given twice: {list(self.modes)}")
        for name, value in (("limit", self.limit), ("utility_limit", self.utility_limit)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be at least 1")
        if self.merge is not None and self.merge not in SCHEMES:
            raise ValueError(f"unknown merge scheme {self.merge!r}; known: {', '.join(SCHEMES)}")


def _prompt_sets(config: EvalConfig) -> tuple[PromptSet, PromptSet]:
    harmful = (
        harmful_file(config.harmful, config.harmful_category)
        if config.harmful is not None
        else project_harmful()
    )
    benign = benign_file(config.benign) if config.benign is not None else project_benign()
    return (
        limit_prompts(harmful, config.limit, config.seed),
        limit_prompts(benign, config.limit, config.seed),
    )


class _Evaluation:
    """The state of one run: model, modes, judge, prompts; methods add rows."""

    def __init__(self, config: EvalConfig, loaded: LoadedModel, adapter: SafetyAdapter | None):
        self.config = config
        self.loaded = loaded
        self.adapter = adapter
        self.merge = merge_scheme(config.merge, adapter)
        self.modes = ModeSet(loaded, adapter, self.merge)
        self.judge: RefusalJudge
        self.judge, self.judge_info = make_judge(config.judge)

    def answer(
        self,
        mode: SteeringMode,
        prompts: Sequence[EvalPrompt],
        *,
        name: str | None = None,
        disabled: str | None = None,
    ) -> list[EvalRow]:
        """Answer and judge `prompts` under `mode`; rows are labelled `name` (default its own)."""
        if not prompts:
            return []
        answers = answer_prompts(
            self.loaded,
            mode,
            [p.prompt for p in prompts],
            max_new_tokens=self.config.max_new_tokens,
            batch_size=self.config.batch_size,
            desc=f"answers {mode.name}",
            show_progress=self.config.show_progress,
        )
        responses = [a.response for a in answers]
        refused = self.judge.judge([p.prompt for p in prompts], responses)
        return [
            EvalRow(
                prompt_id=p.id,
                kind=p.kind,
                category=p.category,
                edgy=p.edgy,
                mode=name or mode.name,
                prompt=p.prompt,
                response=a.response,
                refused=r,
                steered=a.steering.steered,
                fired=a.steering.fired,
                disabled=disabled,
            )
            for p, a, r in zip(prompts, answers, refused, strict=True)
        ]

    def selectivity(
        self, mode_name: str, harmful: Sequence[EvalPrompt], all_on: Sequence[EvalRow]
    ) -> list[EvalRow]:
        """Each category off in turn, on the harmful prompts.

        A row that the category did not steer cannot change (rows are steered independently),
        so it keeps its all-on answer; in gated mode that skips most of the work.
        """
        categories = self.adapter.categories if self.adapter is not None else []
        present = {p.category for p in harmful}
        mode = self.modes.mode(mode_name)
        rows: list[EvalRow] = []
        for category in (c for c in categories if c in present):
            redo = [p for p, row in zip(harmful, all_on, strict=True) if category in row.steered]
            fresh = iter(
                self.answer(mode.without(category), redo, name=mode_name, disabled=category)
            )
            rows += [
                next(fresh) if category in row.steered else replace(row, disabled=category)
                for row in all_on
            ]
        return rows

    def utility(self, mode: SteeringMode) -> tuple[list[UtilityRow], list[PerplexityRow]]:
        config = self.config
        batch, show = config.batch_size, config.show_progress
        rows: list[UtilityRow] = []
        for benchmark in (b for b in BENCHMARKS if b in config.utility):
            questions = load_questions(benchmark, config.utility_limit, config.seed)
            scores = score_questions(
                self.loaded,
                mode,
                questions,
                batch_size=batch,
                desc=f"{benchmark} {mode.name}",
                show_progress=show,
            )
            rows += [
                UtilityRow(
                    benchmark,
                    mode.name,
                    s.id,
                    s.answer,
                    s.chosen,
                    s.chosen_norm,
                    s.steering.steered,
                    s.steering.fired,
                )
                for s in scores
            ]
        perplexities: list[PerplexityRow] = []
        if PERPLEXITY in config.utility:
            references = load_references(config.utility_limit, config.seed)
            measured = reference_perplexity(
                self.loaded,
                mode,
                references,
                batch_size=batch,
                desc=f"perplexity {mode.name}",
                show_progress=show,
            )
            perplexities.append(
                PerplexityRow(
                    mode.name, measured.nll, measured.tokens, measured.texts, measured.steered_texts
                )
            )
        return rows, perplexities


def _settings(config: EvalConfig, merge: str) -> dict[str, Any]:
    return {
        "merge": merge,
        "max_new_tokens": config.max_new_tokens,
        "batch_size": config.batch_size,
        "limit": config.limit,
        "utility": list(config.utility),
        "utility_limit": config.utility_limit,
        "selectivity": config.selectivity,
        "judge": config.judge,
        "seed": config.seed,
    }


def package_versions() -> dict[str, str]:
    """Python's and the main packages' versions, for a run's record."""
    found = {"python": platform.python_version()}
    for package in ("safesteer", "torch", "transformers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "unknown"
    return found


def run_evaluation(config: EvalConfig, loaded: LoadedModel | None = None) -> EvalResults:
    """Run the whole evaluation (loading `config.model` unless `loaded` is given).

    Raises:
        PromptFileError: an external prompt file cannot be used.
        AdapterError: the adapter cannot be read or does not fit the model.
        ModelLoadError: the model cannot be loaded.
        ValueError: a mode cannot run (e.g. `gated` without a gate).
    """
    started, clock = datetime.now(UTC), time.perf_counter()
    torch.manual_seed(config.seed)
    harmful, benign = _prompt_sets(config)
    adapter = SafetyAdapter.load(config.adapter) if config.adapter is not None else None
    loaded = loaded or load_model(config.model)
    if adapter is not None:
        adapter.check_fits(loaded.family)
    mode_names = config.modes or default_modes(adapter)
    run = _Evaluation(config, loaded, adapter)
    try:
        modes = [run.modes.mode(name) for name in mode_names]  # fail fast on a bad mode
        rows: list[EvalRow] = []
        utility: list[UtilityRow] = []
        perplexity: list[PerplexityRow] = []
        for mode in modes:
            rows += run.answer(mode, [*harmful.prompts, *benign.prompts])
            mode_utility, mode_perplexity = run.utility(mode)
            utility += mode_utility
            perplexity += mode_perplexity
        steered = [name for name in mode_names if name != NONE]
        selectivity_mode = steered[-1] if steered and config.selectivity else None
        if selectivity_mode is not None:
            all_on = [r for r in rows if r.mode == selectivity_mode and r.kind == "harmful"]
            rows += run.selectivity(selectivity_mode, harmful.prompts, all_on)
    finally:
        run.modes.close()
    info = RunInfo(
        command=config.command,
        model=loaded.name,
        model_source=loaded.source,
        fingerprint=loaded.fingerprint,
        adapter_id=adapter.id if adapter is not None else None,
        adapter_sha256=adapter.payload_sha256 if adapter is not None else None,
        adapter_file=str(config.adapter) if config.adapter is not None else None,
        modes=tuple(mode_names),
        selectivity_mode=selectivity_mode,
        harmful_source=harmful.source,
        benign_source=benign.source,
        settings=_settings(config, run.merge),
        started=started.isoformat(timespec="seconds"),
        seconds=round(time.perf_counter() - clock, 1),
        versions=package_versions(),
    )
    return EvalResults(info, run.judge_info, tuple(rows), tuple(utility), tuple(perplexity))


def write_outputs(results: EvalResults, out: Path) -> list[Path]:
    """`results.json`, `report.md` and the plots in `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    return [results.write(out / RESULTS), *write_report(results, out)]
