"""An adapter extracted natively on one fine-tune, with a family adapter's recipe held fixed.

Condition (d) of the transfer table: what `safesteer build-adapter` makes on the fine-tune
itself when it takes the family adapter's choices instead of searching for its own. From the
family adapter's recipe: the refusal teacher-forced on every fit prompt and the extraction caps;
the steering layers with their scales and the strength, so `build.gated_coefficients` applies
the same coefficient rule; the gate's detection layer, pooling, probe method, target FPR and
calibration folds; the merge scheme; whether the gate was also calibrated on benchmark
questions. On the fine-tune: contrastive directions from the fit split
(`extract.extract_directions`, as `build` does) and the gate's probes, fitted and calibrated on
its own activations (`build.fit_gate_candidates` restricted to the family's layer and
pooling). No layer, gate or strength search: those choices are the family's.

The same recipe, moved to the same relative depth (`FamilyRecipe.moved`), extracts another
model family's native counterpart of an adapter: the reference the transport suite compares a
transported adapter with.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.build import (
    BuildConfig,
    BuildData,
    BuildSummary,
    fit_gate_candidates,
    make_adapter,
    project_data,
)
from safesteer.adapters.extract import ExtractionConfig, extract_directions
from safesteer.adapters.gating import FittedGate
from safesteer.adapters.loading import LoadedModel
from safesteer.adapters.transport import corresponding_layer

NO_SEARCH = (
    "no layer, gate or strength search: the family adapter's steering layers, scales, "
    "strength, detection layer, pooling, probe method, target FPR and calibration folds, "
    "held fixed"
)


@dataclass(frozen=True)
class FamilyRecipe:
    """The choices of a `build-adapter` family adapter that a native adapter keeps."""

    scales: Mapping[int, float]  # steering layer -> scale
    strength: float
    detection_layer: int
    pooling: str
    gate_method: str
    target_fpr: float
    calibration_folds: int  # benign fit prompts scored out of fold in the calibration (0: none)
    refusal: str | None  # None: the data sets' reference refusals
    max_prompts_per_category: int | None
    max_response_tokens: int
    compliance_tokens: int
    seed: int
    merge: str
    fit_questions: int  # benchmark questions among the probes' benign fit prompts (0: none)
    questions: bool  # the gate was also calibrated on dev benchmark questions
    split_digests: Mapping[str, str]

    @classmethod
    def of(cls, adapter: SafetyAdapter) -> FamilyRecipe:
        """The recipe of a gated adapter made by `safesteer build-adapter`, or the one a native
        adapter held fixed (its recipe's `native.held_fixed`).

        Raises:
            ValueError: the adapter has no gate, or neither recipe.
        """
        if adapter.metadata.gate is None:
            raise ValueError(f"adapter {adapter.id} has no gate: the transfer suite needs one")
        recipe = adapter.metadata.recipe
        native = recipe.get("native")
        if "build" not in recipe and isinstance(native, Mapping) and "held_fixed" in native:
            return cls.from_json(native["held_fixed"], native.get("splits", {}).get("digests", {}))
        summary = BuildSummary.from_adapter(adapter)
        selection = recipe.get("gate_selection", {})
        refusal = recipe.get("refusal", {})
        splits = recipe.get("splits", {})
        return cls(
            scales=dict(summary.layers),
            strength=summary.strength,
            detection_layer=summary.detection_layer,
            pooling=summary.detection_pooling,
            gate_method=str(selection.get("method", "lda")),
            target_fpr=float(selection.get("target_fpr", BuildConfig.target_fpr)),
            calibration_folds=int(selection.get("calibration_folds", 0)),
            refusal=refusal.get("text") if isinstance(refusal, Mapping) else None,
            max_prompts_per_category=recipe.get("max_prompts_per_category"),
            max_response_tokens=int(recipe.get("max_response_tokens", 32)),
            compliance_tokens=int(recipe.get("compliance_tokens", 40)),
            seed=int(recipe.get("seed", 0)),
            merge=str(recipe.get("merge", "naive")),
            fit_questions=int(splits.get("questions_fit", 0)),
            questions=bool(splits.get("questions_dev")),
            split_digests=dict(splits.get("digests", {})),
        )

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], split_digests: Mapping[str, str]) -> FamilyRecipe:
        """The recipe `to_json` wrote.

        Raises:
            ValueError: a field is missing or malformed.
        """
        try:
            return cls(
                scales={int(layer): float(scale) for layer, scale in raw["layers"].items()},
                strength=float(raw["strength"]),
                detection_layer=int(raw["detection_layer"]),
                pooling=str(raw["pooling"]),
                gate_method=str(raw["gate_method"]),
                target_fpr=float(raw["target_fpr"]),
                calibration_folds=int(raw["calibration_folds"]),
                refusal=raw["refusal"],
                max_prompts_per_category=raw["max_prompts_per_category"],
                max_response_tokens=int(raw["max_response_tokens"]),
                compliance_tokens=int(raw["compliance_tokens"]),
                seed=int(raw["seed"]),
                merge=str(raw["merge"]),
                fit_questions=int(raw["fit_questions"]),
                questions=bool(raw["gate_calibrated_on_questions"]),
                split_digests=dict(split_digests),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"malformed family recipe: {exc!r}") from exc

    def moved(self, source_layers: int, target_layers: int) -> FamilyRecipe:
        """The recipe with its steering and detection layers at the same relative depth of a
        model with `target_layers` layers (`transport.corresponding_layer`)."""

        def move(layer: int) -> int:
            return corresponding_layer(layer, source_layers, target_layers)

        scales = {move(layer): scale for layer, scale in self.scales.items()}
        if len(scales) != len(self.scales):
            raise ValueError(f"two steering layers land on one of {target_layers} layers")
        return replace(self, scales=scales, detection_layer=move(self.detection_layer))

    def to_json(self) -> dict[str, Any]:
        return {
            "layers": {str(layer): scale for layer, scale in sorted(self.scales.items())},
            "strength": self.strength,
            "detection_layer": self.detection_layer,
            "pooling": self.pooling,
            "gate_method": self.gate_method,
            "target_fpr": self.target_fpr,
            "calibration_folds": self.calibration_folds,
            "refusal": self.refusal,
            "max_prompts_per_category": self.max_prompts_per_category,
            "max_response_tokens": self.max_response_tokens,
            "compliance_tokens": self.compliance_tokens,
            "seed": self.seed,
            "merge": self.merge,
            "fit_questions": self.fit_questions,
            "gate_calibrated_on_questions": self.questions,
        }


@dataclass(frozen=True)
class NativeAdapter:
    """The native adapter, its fitted gate, and whether its fit data are the family's."""

    adapter: SafetyAdapter
    gate: FittedGate
    same_splits: bool  # the fit/dev split digests equal those the family recipe records
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.adapter.id,
            "gate": self.gate.record(),
            "same_splits_as_family": self.same_splits,
            "seconds": round(self.seconds, 1),
        }


def native_adapter(
    loaded: LoadedModel,
    family: SafetyAdapter,
    data: BuildData | None = None,
    *,
    batch_size: int = 32,
    show_progress: bool = True,
    progress: Callable[[str], None] | None = None,
    recipe: FamilyRecipe | None = None,
) -> NativeAdapter:
    """Extract `family`'s recipe on `loaded` (see module doc); `data` defaults to the project's
    fit and dev splits.

    `recipe` replaces `family`'s own, e.g. `FamilyRecipe.of(family).moved(...)` to extract
    another model family's equivalent of `family`; `family` then need not fit `loaded`.

    Raises:
        ValueError: `family` is not a gated build-adapter adapter, the data lack a category,
            or `recipe` names a layer `loaded` does not have.
        AdapterMismatch: `family` does not fit the model's family (without `recipe`).
    """
    started = time.perf_counter()
    if recipe is None:
        family.check_fits(loaded.family)
        recipe = FamilyRecipe.of(family)
    elif max(*recipe.scales, recipe.detection_layer) >= loaded.family.num_layers:
        raise ValueError(f"the recipe's layers do not fit {loaded.family.num_layers} layers")
    data = _family_data(data if data is not None else project_data(), family, recipe)
    say = progress if progress is not None else (lambda _message: None)
    layers = tuple(sorted(recipe.scales))
    extraction = ExtractionConfig(
        layers=layers,
        scale=1.0,
        seed=recipe.seed,
        categories=tuple(family.categories),
        max_prompts_per_category=recipe.max_prompts_per_category,
        max_response_tokens=recipe.max_response_tokens,
        compliance_tokens=recipe.compliance_tokens,
        batch_size=batch_size,
        name=f"{family.metadata.name}.native.{loaded.fingerprint[:8]}",
        show_progress=show_progress,
    )
    fit_prompts = [
        p if recipe.refusal is None else replace(p, refusal=recipe.refusal)
        for p in data.harmful_fit
    ]
    directions = extract_directions(loaded, extraction, fit_prompts)
    say(f"native: directions from {len(directions.pairs)} harmful fit prompts")
    config = BuildConfig(
        seed=recipe.seed,
        refusal=recipe.refusal,
        candidate_layers=layers,
        detection_layers=(recipe.detection_layer,),
        poolings=(recipe.pooling,),
        gate_method=recipe.gate_method,
        target_fpr=recipe.target_fpr,
        calibration_folds=recipe.calibration_folds,
        fit_questions=recipe.fit_questions,
        merge=recipe.merge,
        batch_size=batch_size,
        show_progress=show_progress,
    )
    fitted, _ = fit_gate_candidates(loaded, data, [recipe.detection_layer], config)
    gate = fitted[recipe.detection_layer, recipe.pooling]
    say(
        f"native: gate at layer {recipe.detection_layer} ({recipe.pooling}): harmful dev TPR "
        f"{gate.harmful_any:.1%}, benign dev FPR (held out) {gate.benign_any:.1%}"
    )
    made = make_adapter(loaded, directions, extraction, recipe.scales, recipe.strength, gate)
    same = all(data.digests.get(k) == v for k, v in recipe.split_digests.items())
    adapter = _with_recipe(made, family, recipe, gate, data, same)
    return NativeAdapter(adapter, gate, same, time.perf_counter() - started)


def _family_data(data: BuildData, family: SafetyAdapter, recipe: FamilyRecipe) -> BuildData:
    """`data` cut to what the family adapter was built from: its categories' harmful
    prompts, and benchmark questions only if its gate was calibrated on them."""
    categories = set(family.categories)
    return replace(
        data,
        harmful_fit=[p for p in data.harmful_fit if p.category in categories],
        harmful_dev=[p for p in data.harmful_dev if p.category in categories],
        questions_fit=data.questions_fit if recipe.fit_questions else (),
        questions_dev=data.questions_dev if recipe.questions else (),
    )


def _with_recipe(
    adapter: SafetyAdapter,
    family: SafetyAdapter,
    recipe: FamilyRecipe,
    gate: FittedGate,
    data: BuildData,
    same_splits: bool,
) -> SafetyAdapter:
    entries = dict(adapter.metadata.recipe)
    for stale in ("scale", "mix_norm_ratio"):
        entries.pop(stale, None)
    entries.update(
        {
            "pipeline": "safesteer eval --suite transfer: native adapter",
            "coefficient_rule": family.metadata.recipe.get("coefficient_rule"),
            "merge": recipe.merge,
            "refusal": {"text": recipe.refusal},
            "native": {
                "family_adapter": family.id,
                "held_fixed": recipe.to_json(),
                "search": NO_SEARCH,
                "splits": {
                    "source": data.source,
                    "digests": dict(data.digests),
                    "same_as_family": same_splits,
                },
            },
            "gate": gate.record(),
        }
    )
    return replace(adapter, metadata=replace(adapter.metadata, recipe=entries))
