"""The transport table: safety directions carried across model families, next to native ones.

For a source adapter `A` (a gated `build-adapter` adapter of family S) and a model of another
family T, in both directions:

- **forward** (measured on T): `A` transported into T (`transport.transport_adapter`, maps fitted
  on the benign fit split, the gate calibrated on the benign dev split), next to T's *native*
  adapter: `A`'s recipe at the same relative depth of T, extracted on T itself
  (`native_adapter` with `FamilyRecipe.moved`; contrastive directions and a gate fitted on T);
- **reverse** (measured on S): that native T adapter transported back into S, next to `A`, which
  is S's native adapter.

On each family: harmful refusal and over-refusal on seeded subsets of the test splits with no
steering, each adapter gated (its own gate decides) and each adapter always on (the vectors'
effect without their gate), and the cosine of the transported and the native effective vectors
per category at their shared layer. Under a gated condition a row no gate fires on keeps its
unsteered answer (steering is per row), so only steered rows are generated again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.evaluation.harness import package_versions
from safesteer.adapters.evaluation.judging import make_judge
from safesteer.adapters.evaluation.modes import ALWAYS, GATED, NONE, ModeSet
from safesteer.adapters.evaluation.prompt_sets import limit_prompts, project_benign, project_harmful
from safesteer.adapters.evaluation.transfer_measure import (
    ConditionAnswers,
    measure_condition,
    summarize,
)
from safesteer.adapters.evaluation.transfer_sets import TransferSets, TransferSettings
from safesteer.adapters.judge import RefusalJudge
from safesteer.adapters.loading import LoadedModel
from safesteer.adapters.merging import merge_scheme
from safesteer.adapters.native_adapter import FamilyRecipe, native_adapter
from safesteer.adapters.splits import benign_split
from safesteer.adapters.transport import TransportConfig, cosine_table, transport_adapter

# (condition, steering mode, which adapter: None, "native" or "transported")
CONDITIONS: tuple[tuple[str, str, str | None], ...] = (
    ("none", NONE, None),
    ("native", GATED, "native"),
    ("transported", GATED, "transported"),
    ("native always", ALWAYS, "native"),
    ("transported always", ALWAYS, "transported"),
)
DEFAULT_LIMIT = 40
DEFAULT_NATIVE_PROMPTS = 12  # harmful fit prompts per category for the native T extraction
Log = Callable[[str], None]


@dataclass(frozen=True)
class TransportSuiteSettings:
    """Prompt counts and decoding, shared by both directions."""

    limit: int = DEFAULT_LIMIT  # harmful and benign test prompts per family (seeded)
    seed: int = 0
    max_new_tokens: int = 64
    batch_size: int = 16
    native_prompts_per_category: int = DEFAULT_NATIVE_PROMPTS
    judge: str = "keyword"
    show_progress: bool = True

    def __post_init__(self) -> None:
        if min(self.limit, self.max_new_tokens, self.batch_size) < 1:
            raise ValueError("limit, max_new_tokens and batch_size must be at least 1")
        if self.native_prompts_per_category < 2:
            raise ValueError("native_prompts_per_category must be at least 2")

    def measuring(self) -> TransferSettings:
        return TransferSettings(
            limit=self.limit,
            utility_limit=None,
            seed=self.seed,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            judge=self.judge,
            show_progress=self.show_progress,
        )

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "show_progress"}


def _sets(settings: TransportSuiteSettings) -> TransferSets:
    return TransferSets(
        limit_prompts(project_harmful(), settings.limit, settings.seed),
        limit_prompts(project_benign(), settings.limit, settings.seed),
        {},
        {},
    )


def measure_family(
    loaded: LoadedModel,
    adapters: Mapping[str, SafetyAdapter],
    sets: TransferSets,
    judge: RefusalJudge,
    settings: TransportSuiteSettings,
    log: Log,
) -> dict[str, Any]:
    """Every condition of `CONDITIONS` on one model: `adapters` holds "native" and
    "transported", both of `loaded`'s family."""
    measuring = settings.measuring()
    baseline: ConditionAnswers | None = None
    conditions: dict[str, Any] = {}
    for condition, mode_name, which in CONDITIONS:
        adapter = None if which is None else adapters[which]
        modes = ModeSet(loaded, adapter, merge_scheme(None, adapter))
        try:
            label = f"{loaded.name} {condition}"
            log(f"{label}: answering")
            answers = measure_condition(
                loaded, modes.mode(mode_name), sets, [], measuring, baseline, label
            )
        finally:
            modes.close()
        baseline = baseline or answers
        summary = summarize(answers, sets, None, judge)
        conditions[condition] = summary
        log(
            f"{label}: harmful refused {summary['harmful_refusal']:.1%}, over-refusal "
            f"{summary['over_refusal']:.1%} ({summary['seconds']:.0f} s)"
        )
    return conditions


def _cosines(native: SafetyAdapter, transported: SafetyAdapter) -> dict[str, dict[str, float]]:
    return {
        c: {str(layer): round(v, 4) for layer, v in row.items()}
        for c, row in cosine_table(native, transported).items()
    }


def _transport_record(adapter: SafetyAdapter) -> dict[str, Any]:
    recipe = adapter.metadata.recipe
    return {
        "id": adapter.id,
        "layer_map": recipe["layer_map"],
        "held_out_r2": recipe["map"]["held_out_r2"],
        "gate": {
            k: recipe["gate"][k]
            for k in ("source_detection_layer", "detection_layer", "reverse_map_held_out_r2")
        }
        if "gate" in recipe
        else None,
    }


@dataclass(frozen=True)
class TransportSuiteResult:
    """The results document and the adapters the suite made, by name (`ADAPTER_NAMES`)."""

    document: dict[str, Any]
    adapters: Mapping[str, SafetyAdapter]


# The adapters the suite makes: the target's native one, the source carried into the target,
# and the target's native one carried back into the source family.
ADAPTER_NAMES: tuple[str, ...] = ("forward-native", "forward-transported", "reverse-transported")


def run_transport_suite(
    source: SafetyAdapter,
    source_model: LoadedModel,
    target_model: LoadedModel,
    settings: TransportSuiteSettings,
    *,
    command: str = "",
    log: Log = print,
) -> TransportSuiteResult:
    """The transport table's results document and adapters (see module doc).

    Raises:
        AdapterMismatch: `source` does not fit `source_model`.
        ValueError: the models are of one family, or `source` is not a gated build-adapter
            adapter.
    """
    if source_model.family.id == target_model.family.id:
        raise ValueError(f"both models are of family {source_model.family.id}: nothing to carry")
    started, clock = datetime.now(UTC), time.perf_counter()
    source.check_fits(source_model.family)
    fit = [p.prompt for p in benign_split("fit")]
    calibration = [p.prompt for p in benign_split("dev")]
    config = TransportConfig(batch_size=settings.batch_size, show_progress=settings.show_progress)
    s_name, t_name = source_model.family.alias, target_model.family.alias

    log(f"transporting {source.id} from {s_name} into {t_name}")
    forward = transport_adapter(source, source_model, target_model, fit, calibration, config)
    recipe = FamilyRecipe.of(source).moved(
        source_model.family.num_layers, target_model.family.num_layers
    )
    recipe = replace(recipe, max_prompts_per_category=settings.native_prompts_per_category)
    log(f"extracting {t_name}'s native adapter: {source.id}'s recipe at the same relative depth")
    native = native_adapter(
        target_model,
        source,
        batch_size=max(settings.batch_size, 32),
        show_progress=settings.show_progress,
        progress=log,
        recipe=recipe,
    )
    log(f"transporting {t_name}'s native adapter {native.adapter.id} back into {s_name}")
    reverse = transport_adapter(
        native.adapter, target_model, source_model, fit, calibration, config
    )

    sets = _sets(settings)
    judge, judge_info = make_judge(settings.judge)
    forward_conditions = measure_family(
        target_model,
        {"native": native.adapter, "transported": forward.adapter},
        sets,
        judge,
        settings,
        log,
    )
    reverse_conditions = measure_family(
        source_model,
        {"native": source, "transported": reverse.adapter},
        sets,
        judge,
        settings,
        log,
    )
    document = {
        "suite": "transport",
        "command": command,
        "source": {
            "adapter": source.id,
            "model": source_model.name,
            "family": source_model.family.id,
            "fingerprint": source_model.fingerprint,
        },
        "target": {
            "model": target_model.name,
            "family": target_model.family.id,
            "fingerprint": target_model.fingerprint,
        },
        "directions": {
            "forward": {
                "measured_on": target_model.name,
                "native": {**native.to_json(), "recipe": recipe.to_json()},
                "transported": _transport_record(forward.adapter),
                "cosine": _cosines(native.adapter, forward.adapter),
                "conditions": forward_conditions,
            },
            "reverse": {
                "measured_on": source_model.name,
                "native": {"id": source.id, "recipe": FamilyRecipe.of(source).to_json()},
                "transported": _transport_record(reverse.adapter),
                "cosine": _cosines(source, reverse.adapter),
                "conditions": reverse_conditions,
            },
        },
        "conditions": {
            name: ("no steering" if which is None else f"the {which} adapter, {mode}")
            for name, mode, which in CONDITIONS
        },
        "map_prompts": {"fit": "benign fit split", "gate_calibration": "benign dev split"},
        "reuse": "under a gated condition a row no gate fires on keeps its unsteered answer "
        "(steering is per row, so it is the same answer); only steered rows are made again",
        "decoding": "greedy",
        "judge": judge_info.to_dict(),
        "settings": settings.to_json(),
        "prompt_sets": {k: v for k, v in sets.to_json().items() if k in ("harmful", "benign")},
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - clock, 1),
        "versions": package_versions(),
    }
    made = (native.adapter, forward.adapter, reverse.adapter)
    return TransportSuiteResult(document, dict(zip(ADAPTER_NAMES, made, strict=True)))
