"""`safesteer eval --suite transfer`: one family adapter carried to every fine-tune of a zoo.

For each fine-tune, greedy answers and log-likelihood utility under four conditions:

- `none`: no steering;
- `family`: the family adapter as is, gated;
- `recalibrated`: the family adapter after `calibrate.calibrate` on the fine-tune (the
  `safesteer calibrate` defaults, reference: the model the adapter was made for), gated;
- `native`: an adapter extracted on the fine-tune with the family's recipe held fixed
  (`native_adapter`; no layer or strength search), gated.

Measured on seeded subsets: harmful refusal (harmful test split), over-refusal (benign test
split), the fine-tune's own task skill (`zoo_skill`'s task sets; none for fine-tunes without a
task), MMLU and ARC-Easy accuracy by answer log-likelihood (a seeded subset of the questions
`safesteer eval` scores). Steering is per row, so under a gated condition a prompt on which no
gate fires gets exactly the unsteered answer: it keeps the `none` answer and only the rows the
gate steers are generated (or scored) again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.build import BuildData
from safesteer.adapters.calibrate import CalibrationConfig, calibrate
from safesteer.adapters.calibrate_command import reference_source
from safesteer.adapters.evaluation.harness import package_versions
from safesteer.adapters.evaluation.judging import make_judge
from safesteer.adapters.evaluation.modes import GATED, NONE, ModeSet
from safesteer.adapters.evaluation.transfer_measure import (
    ConditionAnswers,
    measure_condition,
    summarize,
)
from safesteer.adapters.evaluation.transfer_report import check_targets
from safesteer.adapters.evaluation.transfer_sets import (
    BENCHMARKS,
    TransferSets,
    TransferSettings,
    transfer_sets,
)
from safesteer.adapters.judge import RefusalJudge
from safesteer.adapters.loading import LoadedModel, load_model
from safesteer.adapters.lora import FINETUNE_RECORD_FILE
from safesteer.adapters.merging import merge_scheme
from safesteer.adapters.native_adapter import NO_SEARCH, FamilyRecipe, native_adapter
from safesteer.adapters.zoo_spec import FinetuneSpec, ZooSpec, ZooSpecError

CONDITIONS: tuple[str, ...] = ("none", "family", "recalibrated", "native")
Log = Callable[[str], None]


# ----- one fine-tune ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Context:
    """What every fine-tune's measurement shares."""

    spec: ZooSpec
    zoo_dir: Path
    family: SafetyAdapter
    reference: LoadedModel
    sets: TransferSets
    judge: RefusalJudge
    settings: TransferSettings
    log: Log
    native_data: BuildData | None = None  # None: the project's fit and dev splits


def _condition_adapters(
    context: _Context, loaded: LoadedModel, name: str, timings: dict[str, float]
) -> tuple[dict[str, SafetyAdapter | None], dict[str, Any]]:
    """The adapter of each condition (None: unsteered) and a record of how each was made."""
    settings, log = context.settings, context.log
    clock = time.perf_counter()
    log(f"{name}: recalibrating the family adapter ({settings.shots} shots)")
    config = CalibrationConfig(shots=settings.shots, show_progress=settings.show_progress)
    calibration = calibrate(context.family, loaded, context.reference, config)
    timings["calibrate"] = round(time.perf_counter() - clock, 1)
    chosen = ", ".join(f"layer {la} x{m:g}" for la, m in sorted(calibration.multipliers.items()))
    log(f"{name}: recalibrated in {timings['calibrate']:.1f} s: {chosen}")
    log(f"{name}: extracting the native adapter (family recipe held fixed)")
    native = native_adapter(
        loaded,
        context.family,
        context.native_data,
        batch_size=max(settings.batch_size, 32),
        show_progress=settings.show_progress,
        progress=lambda message: log(f"{name}: {message}"),
    )
    timings["extract_native"] = round(native.seconds, 1)
    if not native.same_splits:
        log(
            f"{name}: note: the fit/dev splits differ from those the family adapter's recipe "
            "records (digests); the native adapter is fitted on today's splits"
        )
    log(f"{name}: native adapter {native.adapter.id} in {native.seconds:.1f} s")
    adapters: dict[str, SafetyAdapter | None] = {
        "none": None,
        "family": context.family,
        "recalibrated": calibration.adapter,
        "native": native.adapter,
    }
    records = {
        "family": {"id": context.family.id},
        "recalibrated": {
            "id": calibration.adapter.id,
            "multipliers": {str(la): m for la, m in sorted(calibration.multipliers.items())},
            "shots": len(calibration.shots),
            "refusal_scored": calibration.adapter.metadata.recipe["calibration"]["refusal"],
            "objective_as_is": round(calibration.as_is.objective, 6),
            "objective_calibrated": round(calibration.calibrated.objective, 6),
            "seconds": round(calibration.seconds, 1),
        },
        "native": native.to_json(),
    }
    return adapters, records


def measure_finetune(context: _Context, finetune: FinetuneSpec, number: str) -> dict[str, Any]:
    """Every condition on one fine-tune, with the adapters it used and the time it took."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    name = finetune.name
    source = context.spec.source(name, context.zoo_dir)
    context.log(f"[{number}] {name}: loading {source}")
    loaded = load_model(source)
    context.family.check_fits(loaded.family)
    timings["load"] = round(time.perf_counter() - started, 1)
    adapters, records = _condition_adapters(context, loaded, f"[{number}] {name}", timings)
    tasks = [] if finetune.task is None else [finetune.task]
    baseline: ConditionAnswers | None = None
    conditions: dict[str, Any] = {}
    for condition in CONDITIONS:
        adapter = adapters[condition]
        modes = ModeSet(loaded, adapter, merge_scheme(None, adapter))
        try:
            mode = modes.mode(NONE if adapter is None else GATED)
            context.log(f"[{number}] {name}: answering under {condition}")
            answers = measure_condition(
                loaded, mode, context.sets, tasks, context.settings, baseline, f"{name} {condition}"
            )
        finally:
            modes.close()
        baseline = baseline or answers
        conditions[condition] = summarize(answers, context.sets, finetune.task, context.judge)
        timings[condition] = round(answers.seconds, 1)
        context.log(f"[{number}] {name} {condition}: {_headline(conditions[condition])}")
    seconds = time.perf_counter() - started
    context.log(f"[{number}] {name}: done in {seconds:.1f} s")
    return {
        "name": name,
        "role": finetune.role,
        "held_out": finetune.held_out,
        "parent": finetune.parent,
        "source": source,
        "fingerprint": loaded.fingerprint,
        "task": finetune.task,
        "adapters": records,
        "conditions": conditions,
        "targets": check_targets(name, conditions).to_json(),
        "step_seconds": dict(timings),
        "seconds": round(seconds, 1),
    }


def _headline(summary: Mapping[str, Any]) -> str:
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    task = summary["task"]
    parts = [
        f"harmful refusal {pct(summary['harmful_refusal'])}",
        f"over-refusal {pct(summary['over_refusal'])}",
        *([] if task is None else [f"{task['name']} {pct(task['score'])}"]),
        *(f"{name} {pct(summary[name])}" for name in BENCHMARKS if name in summary),
        f"({summary['seconds']:.1f} s)",
    ]
    return ", ".join(parts)


# ----- the suite --------------------------------------------------------------------------------
def chosen_finetunes(
    spec: ZooSpec, zoo_dir: Path, names: Sequence[str] | None
) -> list[FinetuneSpec]:
    """The fine-tunes to measure (all, or those named), in spec order, each built.

    Raises:
        ZooSpecError: a name is unknown or a fine-tune's folder holds no built LoRA.
    """
    chosen = [spec.finetune(n) for n in names] if names else list(spec.finetunes)
    wanted = {f.name for f in chosen}
    ordered = [f for f in spec.finetunes if f.name in wanted]
    for finetune in ordered:
        if not (zoo_dir / finetune.name / FINETUNE_RECORD_FILE).is_file():
            raise ZooSpecError(
                f"{zoo_dir / finetune.name} holds no built fine-tune: run `safesteer zoo build`"
            )
    return ordered


def run_transfer(
    spec: ZooSpec,
    zoo_dir: Path,
    data_dir: Path,
    adapter_file: Path,
    settings: TransferSettings,
    *,
    names: Sequence[str] | None = None,
    command: str = "",
    log: Log = print,
    native_data: BuildData | None = None,
) -> dict[str, Any]:
    """The transfer suite's results document (see module doc).

    Raises:
        ZooSpecError: an unknown fine-tune, an unbuilt one, or a missing task eval file.
        AdapterError: the family adapter cannot be read or does not fit.
        ValueError: the family adapter is not a gated build-adapter adapter.
        ModelLoadError, OSError: a model or file cannot be used.
    """
    started, clock = datetime.now(UTC), time.perf_counter()
    finetunes = chosen_finetunes(spec, zoo_dir, names)
    family = SafetyAdapter.load(adapter_file)
    recipe = FamilyRecipe.of(family)
    sets = transfer_sets(spec, data_dir, settings)
    judge, judge_info = make_judge(settings.judge)
    reference_spec = reference_source(family, None)
    log(f"loading the family adapter's reference model {reference_spec}")
    reference = load_model(reference_spec)
    family.check_fits(reference.family)
    context = _Context(spec, zoo_dir, family, reference, sets, judge, settings, log, native_data)
    results = [
        measure_finetune(context, finetune, f"{index}/{len(finetunes)}")
        for index, finetune in enumerate(finetunes, start=1)
    ]
    return {
        "suite": "transfer",
        "command": command,
        "spec": str(spec.path),
        "zoo": str(zoo_dir),
        "data": str(data_dir),
        "family_adapter": {
            "file": str(adapter_file),
            "id": family.id,
            "reference": {"source": reference_spec, "fingerprint": reference.fingerprint},
            "recipe": recipe.to_json(),
        },
        "conditions": {
            "none": "no steering",
            "family": "the family adapter as is, gated",
            "recalibrated": f"the family adapter after `safesteer calibrate` defaults "
            f"({settings.shots} shots, fit split, reference steered) on the fine-tune, gated",
            "native": "directions and gate extracted on the fine-tune with the family "
            f"adapter's recipe, gated; {NO_SEARCH}",
        },
        "reuse": "under a gated condition a row no gate fires on keeps its unsteered answer "
        "(steering is per row, so it is the same answer); only steered rows are made again",
        "decoding": "greedy",
        "judge": judge_info.to_dict(),
        "settings": settings.to_json(),
        "prompt_sets": sets.to_json(),
        "finetunes": results,
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - clock, 1),
        "versions": package_versions(),
    }
