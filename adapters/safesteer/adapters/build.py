"""`safesteer build-adapter`: a gated safety adapter built from the project's data in one run.

The steps, on the fixed splits of `safesteer.adapters.splits` (the test split is never read):

1. **extract**: contrastive per-category directions (`extract.extract_directions`) at layers
   `0 .. max(candidate layers)` from the harmful *fit* prompts. The refusal teacher-forced on
   every prompt is one plain sentence (`CANONICAL_REFUSAL`), not the data sets' varied
   references and templates: steering along the mean of varied refusals makes SmolLM2 wander
   ("I'm sorry for any kind of harm ... You're asking about that. You're asking about that."),
   along one plain refusal it says it plainly (dev: 51 of 56 fired prompts refused, all 56
   coherent, against 50 and 44 with the varied refusals, same layers and strength).
2. **gate**: condition probes are fitted on the fit split at each candidate detection layer
   (below the highest candidate steering layer) with each pooling (mean over the prompt, or its
   last token) and calibrated on benign dev to a target false-positive rate for the union of
   categories (`gating`); the (layer, pooling) with the highest Youden index, harmful dev TPR
   minus *held-out* benign dev FPR, is kept (ties: the lower FPR, then the deeper layer). The
   held-out (leave-one-out) FPR is the honest estimate of how often the gate fires on unseen
   benign prompts, which is the over-refusal a gated adapter adds. Benchmark questions are a
   second benign format: the MMLU and ARC questions that `safesteer eval` does not score
   (`benchmarks.question_splits`): `fit_questions` of the fit half join the benign fit prompts
   (all 384 would outnumber the 229 benign requests), and the dev half is a second
   calibration set (thresholds high enough for both); the Youden index subtracts the higher
   of the two held-out FPRs. Without them the previous built-in adapter's last-token gate
   (4 % held-out FPR on benign dev) fired on 57 of the 100 MMLU questions its report scores,
   and steered answers cost 4 MMLU points.
3. **layers**: every candidate steering layer above the detection layer is scored at a few
   scales on dev prompts, and the best layers with their per-layer scales are ranked by a
   budgeted rule (`layer_selection`) under the gate's exposure: refusal gains count on the
   share of harmful prompts it fires on, over-refusal gains on the share of benign ones.
4. **strength**: for the best layer, the best two, ... (`LayerChoice.prefixes`), the per-layer
   scales are multiplied by each candidate strength, the harmful dev prompts on which the gate
   fires are answered under gated steering, and layer set and strength are chosen together by
   refusal given fired among coherent settings (`strength`).
5. **write**: the adapter with its full recipe (data digests, scores, gate statistics, seed,
   command), and a PNG of the scores next to it (`build_plot`).

Coefficients: category `c` alone at weight 1 adds `strength * scale[l] * typical_norm[l]` at
layer `l`. The categories share most of their direction, so the adapter is calibrated for the
`orthogonal` merge (`merging`: a component shared by several categories that fire together is
added once); the recipe's `merge` names the scheme it was calibrated for.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from safesteer.adapters.adapter import POOLINGS, SafetyAdapter
from safesteer.adapters.evaluation.benchmarks import question_splits
from safesteer.adapters.evaluation.modes import GatedSteered
from safesteer.adapters.evaluation.runner import answer_prompts
from safesteer.adapters.extract import (
    CategoryDirections,
    ExtractionConfig,
    build_adapter,
    extract_directions,
)
from safesteer.adapters.gating import (
    FittedGate,
    PromptGate,
    fit_gate_from_activations,
    prompt_activations,
    with_gate,
)
from safesteer.adapters.hooks import SteeringHooks
from safesteer.adapters.judge import RefusalJudge, default_judge
from safesteer.adapters.layer_selection import (
    Exposure,
    LayerChoice,
    LayerScore,
    SelectionRule,
    score_layers,
    select_layers,
)
from safesteer.adapters.loading import LoadedModel
from safesteer.adapters.merging import SCHEMES, MergingBasis
from safesteer.adapters.prompts import HarmfulPrompt
from safesteer.adapters.splits import (
    DEFAULT_SEED,
    BenignPrompt,
    benign_splits,
    harmful_splits,
    split_digest,
)
from safesteer.adapters.strength import (
    StrengthScore,
    choose_strength,
    coherent_text,
    describe_rule,
)
from safesteer.adapters.table import SteeringBasis

Progress = Callable[[str], None]
GateKey = tuple[int, str]  # (detection layer, pooling)
CANONICAL_REFUSAL = "I'm sorry, but I can't help with that."


@dataclass(frozen=True)
class BuildData:
    """The fit and dev prompts a build reads, and digests that pin the splits they came from."""

    harmful_fit: Sequence[HarmfulPrompt]
    harmful_dev: Sequence[HarmfulPrompt]
    benign_fit: Sequence[BenignPrompt]
    benign_dev: Sequence[BenignPrompt]
    digests: Mapping[str, str] = field(default_factory=dict)
    source: str = "given prompts"
    questions_fit: Sequence[str] = ()  # benign prompts in the benchmarks' format
    questions_dev: Sequence[str] = ()

    @property
    def categories(self) -> tuple[str, ...]:
        """The categories of the harmful fit prompts, in first-seen order."""
        return tuple(dict.fromkeys(p.category for p in self.harmful_fit))


def project_data(seed: int = DEFAULT_SEED) -> BuildData:
    """The project's fit and dev splits; the digests cover all three splits' assignment."""
    harmful, benign, questions = harmful_splits(seed), benign_splits(seed), question_splits(seed)
    return BuildData(
        harmful_fit=harmful["fit"],
        harmful_dev=harmful["dev"],
        benign_fit=benign["fit"],
        benign_dev=benign["dev"],
        digests={
            "harmful": split_digest(harmful),
            "benign": split_digest(benign),
            "questions": split_digest({"fit": questions.fit, "dev": questions.dev}),
        },
        source=f"safesteer.adapters.splits (seed {seed}): fit and dev; test never read; "
        "MMLU and ARC questions that safesteer eval does not score",
        questions_fit=[q.question for q in questions.fit],
        questions_dev=[q.question for q in questions.dev],
    )


@dataclass(frozen=True)
class BuildConfig:
    """Every setting of a build; all of them end up in the adapter's recipe."""

    seed: int = 0
    name: str | None = None
    # extraction
    refusal: str | None = CANONICAL_REFUSAL  # None: the data sets' references and templates
    max_prompts_per_category: int | None = 24
    max_response_tokens: int = 32
    compliance_tokens: int = 40
    # layer selection
    candidate_layers: tuple[int, ...] = (10, 12, 14, 16, 18, 20)
    scales: tuple[float, ...] = (0.2, 0.35)
    rule: SelectionRule = field(default_factory=SelectionRule)
    score_prompts_per_category: int = 3
    score_benign_prompts: int = 24
    score_tokens: int = 20
    # gate
    detection_layers: tuple[int, ...] = (4, 6, 8)
    poolings: tuple[str, ...] = ("mean", "last")
    gate_method: str = "pooled-lda"
    target_fpr: float = 0.04
    calibration_folds: int = 5  # benign fit prompts scored out of fold join the calibration
    fit_questions: int = 120  # benchmark questions sampled into the probes' benign fit prompts
    # strength
    strengths: tuple[float, ...] = (0.6, 0.8, 1.0)
    min_coherent: float = 0.8
    strength_prompts_per_category: int = 6
    strength_tokens: int = 40
    merge: str = "orthogonal"
    batch_size: int = 32
    show_progress: bool = True
    command: str = ""

    def __post_init__(self) -> None:
        if not self.candidate_layers or not self.scales or not self.strengths:
            raise ValueError("give at least one candidate layer, scale and strength")
        if not self.detection_layers or not self.poolings:
            raise ValueError("give at least one detection layer and pooling")
        if unknown := set(self.poolings) - set(POOLINGS):
            raise ValueError(f"unknown pooling {sorted(unknown)}; known: {', '.join(POOLINGS)}")
        if min(self.detection_layers) >= max(self.candidate_layers):
            raise ValueError("every candidate steering layer is at or below the detection layers")
        if any(s <= 0 for s in (*self.scales, *self.strengths)):
            raise ValueError("scales and strengths must be positive")
        if self.merge not in SCHEMES:
            raise ValueError(f"unknown merge scheme {self.merge!r}; known: {', '.join(SCHEMES)}")
        if self.fit_questions < 0 or self.calibration_folds < 0:
            raise ValueError("fit_questions and calibration_folds must be 0 or more")
        if not 0.0 < self.target_fpr < 1.0 or not 0.0 <= self.min_coherent <= 1.0:
            raise ValueError("target_fpr must be in (0, 1) and min_coherent in [0, 1]")


@dataclass(frozen=True)
class GateCandidate:
    """What the probes fitted at one detection layer with one pooling measured on dev."""

    layer: int
    harmful_tpr: float  # harmful dev prompts on which any category fires
    benign_fpr: float  # benign dev prompts on which any fires, leave-one-out
    auc: Mapping[str, float]
    pooling: str = "mean"
    questions_fpr: float | None = None  # benchmark-style dev questions that fire, held out

    @property
    def key(self) -> GateKey:
        return (self.layer, self.pooling)

    @property
    def worst_fpr(self) -> float:
        """The higher of the held-out FPRs on benign dev prompts and on dev questions."""
        return max(self.benign_fpr, self.questions_fpr or 0.0)

    @property
    def youden(self) -> float:
        """Harmful dev TPR minus the worst held-out benign FPR: the gate's score."""
        return self.harmful_tpr - self.worst_fpr

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "pooling": self.pooling,
            "harmful_tpr": self.harmful_tpr,
            "benign_fpr": self.benign_fpr,
            "questions_fpr": self.questions_fpr,
            "auc": dict(self.auc),
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> GateCandidate:
        auc = {str(c): float(a) for c, a in raw["auc"].items()}
        questions = raw.get("questions_fpr")
        return cls(
            int(raw["layer"]),
            float(raw["harmful_tpr"]),
            float(raw["benign_fpr"]),
            auc,
            str(raw.get("pooling", "mean")),
            None if questions is None else float(questions),
        )

    @classmethod
    def of(cls, fitted: FittedGate) -> GateCandidate:
        spec = fitted.spec
        return cls(
            spec.detection_layer,
            fitted.harmful_any,
            fitted.benign_any,
            dict(fitted.auc),
            spec.pooling,
            fitted.questions_any,
        )


@dataclass(frozen=True)
class BuildSummary:
    """The measurements and choices of a build, as stored in (and read back from) the recipe."""

    layer_scores: tuple[LayerScore, ...]
    layers: Mapping[int, float]  # chosen layer -> scale
    gate_candidates: tuple[GateCandidate, ...]
    detection_layer: int
    strength_scores: tuple[StrengthScore, ...]
    strength: float
    detection_pooling: str = "mean"
    exposure: Exposure = field(default_factory=Exposure)

    def to_json(self) -> dict[str, Any]:
        return {
            "layer_scores": [s.to_json() for s in self.layer_scores],
            "layers": {str(la): s for la, s in sorted(self.layers.items())},
            "gate_candidates": [g.to_json() for g in self.gate_candidates],
            "detection_layer": self.detection_layer,
            "detection_pooling": self.detection_pooling,
            "exposure": asdict(self.exposure),
            "strength_scores": [s.to_json() for s in self.strength_scores],
            "strength": self.strength,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> BuildSummary:
        return cls(
            layer_scores=tuple(LayerScore.from_json(s) for s in raw["layer_scores"]),
            layers={int(la): float(s) for la, s in raw["layers"].items()},
            gate_candidates=tuple(GateCandidate.from_json(g) for g in raw["gate_candidates"]),
            detection_layer=int(raw["detection_layer"]),
            strength_scores=tuple(StrengthScore.from_json(s) for s in raw["strength_scores"]),
            strength=float(raw["strength"]),
            detection_pooling=str(raw.get("detection_pooling", "mean")),
            exposure=Exposure(**raw.get("exposure", {})),
        )

    @classmethod
    def from_adapter(cls, adapter: SafetyAdapter) -> BuildSummary:
        """The summary in a built adapter's recipe.

        Raises:
            ValueError: the adapter was not made by `build-adapter`.
        """
        build = adapter.metadata.recipe.get("build")
        if not isinstance(build, Mapping):
            raise ValueError(f"adapter {adapter.id} has no build-adapter recipe")
        return cls.from_json(build)


@dataclass(frozen=True)
class BuildResult:
    """The adapter, what the build measured, and how long each step took (seconds)."""

    adapter: SafetyAdapter
    summary: BuildSummary
    timings: Mapping[str, float]


# ----- sampling ----------------------------------------------------------------------------------
def sample_per_category(
    prompts: Sequence[HarmfulPrompt], per_category: int, seed: int
) -> list[HarmfulPrompt]:
    """Up to `per_category` prompts of each category, chosen by seed, in category order."""
    rng = random.Random(f"{seed}:harmful")
    grouped: dict[str, list[HarmfulPrompt]] = {}
    for prompt in prompts:
        grouped.setdefault(prompt.category, []).append(prompt)
    chosen: list[HarmfulPrompt] = []
    for group in grouped.values():
        chosen += rng.sample(group, min(per_category, len(group)))
    return chosen


def sample_benign(prompts: Sequence[BenignPrompt], count: int, seed: int) -> list[BenignPrompt]:
    """Up to `count` prompts chosen by seed, edgy and plain ones in proportion."""
    rng = random.Random(f"{seed}:benign")
    if count >= len(prompts):
        return list(prompts)
    edgy = [p for p in prompts if p.edgy]
    plain = [p for p in prompts if not p.edgy]
    take_edgy = round(count * len(edgy) / len(prompts))
    return rng.sample(edgy, take_edgy) + rng.sample(plain, count - take_edgy)


def sample_questions(questions: Sequence[str], count: int, seed: int) -> list[str]:
    """Up to `count` of `questions` chosen by seed, in their order."""
    if count >= len(questions):
        return list(questions)
    keep = sorted(random.Random(f"{seed}:questions").sample(range(len(questions)), count))
    return [questions[i] for i in keep]


# ----- the adapter -------------------------------------------------------------------------------
def gated_coefficients(
    directions: CategoryDirections, scales: Mapping[int, float], strength: float
) -> dict[str, dict[int, float]]:
    """`coef[c][l]` under which category `c` alone adds `strength * scale[l] * typical[l]`.

    Raises:
        ValueError: a category vector is zero at a chosen layer.
    """
    coefficients: dict[str, dict[int, float]] = {}
    for category in directions.categories:
        coefficients[category] = {}
        for layer, scale in scales.items():
            length = float(directions.vector(category, layer).norm())
            if length == 0.0:
                raise ValueError(f"zero vector for {category} at layer {layer}")
            target = strength * scale * float(directions.typical_norms[layer])
            coefficients[category][layer] = target / length
    return coefficients


def make_adapter(
    loaded: LoadedModel,
    directions: CategoryDirections,
    extraction: ExtractionConfig,
    scales: Mapping[int, float],
    strength: float,
    gate: FittedGate,
) -> SafetyAdapter:
    """The gated adapter for `scales` at `strength` (its recipe is completed by `build`)."""
    base = build_adapter(loaded, directions, extraction, layers=sorted(scales), scale=1.0)
    coefficients = gated_coefficients(directions, scales, strength)
    return with_gate(replace(base, coefficients=coefficients), gate)


Setting = tuple[Mapping[int, float], float]  # (layer -> scale, strength)


# ----- the steps ---------------------------------------------------------------------------------
def _prompts(items: Sequence[HarmfulPrompt] | Sequence[BenignPrompt]) -> list[str]:
    return [p.prompt for p in items]


def fit_gate_candidates(
    loaded: LoadedModel,
    data: BuildData,
    layers: Sequence[int],
    config: BuildConfig,
) -> tuple[dict[GateKey, FittedGate], dict[GateKey, dict[str, torch.Tensor]]]:
    """Probes at each detection layer with each pooling, and the dev activations they saw.

    Returns `(fitted per (layer, pooling), {key: {"harmful": [n, hidden], "benign": [m,
    hidden]}})`, the dev activations in `data.harmful_dev` / `data.benign_dev` order.
    """
    layers = sorted(layers)

    def pooled(prompts: Sequence[str], desc: str) -> dict[str, torch.Tensor]:
        return prompt_activations(
            loaded.model,
            loaded.tokenizer,
            prompts,
            layers,
            batch_size=config.batch_size,
            show_progress=config.show_progress,
            desc=desc,
        )

    categories = data.categories
    harmful_fit = pooled(_prompts(data.harmful_fit), "gate: harmful fit")
    harmful_dev = pooled(_prompts(data.harmful_dev), "gate: harmful dev")
    questions_fit = sample_questions(data.questions_fit, config.fit_questions, config.seed)
    benign_fit = pooled([*_prompts(data.benign_fit), *questions_fit], "gate: benign fit")
    benign_dev = pooled(_prompts(data.benign_dev), "gate: benign dev")
    questions_dev = (
        pooled(data.questions_dev, "gate: questions dev") if data.questions_dev else None
    )

    def rows(prompts: Sequence[HarmfulPrompt], category: str) -> list[int]:
        return [i for i, p in enumerate(prompts) if p.category == category]

    fitted: dict[GateKey, FittedGate] = {}
    dev: dict[GateKey, dict[str, torch.Tensor]] = {}
    for slot, layer in enumerate(layers):
        for pooling in config.poolings:
            fit, held = harmful_fit[pooling][:, slot], harmful_dev[pooling][:, slot]
            fitted[layer, pooling] = fit_gate_from_activations(
                {c: fit[rows(data.harmful_fit, c)] for c in categories},
                benign_fit[pooling][:, slot],
                benign_dev[pooling][:, slot],
                {c: held[rows(data.harmful_dev, c)] for c in categories},
                detection_layer=layer,
                pooling=pooling,
                target_fpr=config.target_fpr,
                scope="any",
                method=config.gate_method,
                questions_dev=None if questions_dev is None else questions_dev[pooling][:, slot],
                fit_folds=config.calibration_folds,
            )
            dev[layer, pooling] = {"harmful": held, "benign": benign_dev[pooling][:, slot]}
    return fitted, dev


def choose_gate(candidates: Sequence[GateCandidate]) -> GateCandidate:
    """Highest Youden index (harmful dev TPR - worst held-out benign FPR); ties: lower FPR,
    then the deeper layer, then mean pooling."""
    return max(candidates, key=lambda g: (g.youden, -g.worst_fpr, g.layer, g.pooling == "mean"))


def measure_strengths(
    loaded: LoadedModel,
    make: Callable[[Mapping[int, float], float], SafetyAdapter],
    settings: Sequence[Setting],
    harmful: Sequence[str],
    benign: Sequence[str],
    judge: RefusalJudge,
    config: BuildConfig,
) -> list[StrengthScore]:
    """Gated answers per setting: refusal and coherence on the harmful prompts that fire."""
    layers = sorted({layer for scales, _ in settings for layer in scales})
    hooks = SteeringHooks(loaded.model, loaded.family.num_layers, layers)
    prompts = [*harmful, *benign]
    scores: list[StrengthScore] = []
    try:
        for scales, strength in settings:
            adapter = make(scales, strength)
            basis = SteeringBasis.from_adapter(adapter, layers=layers)
            mode = GatedSteered(
                loaded,
                hooks,
                MergingBasis.of(basis, config.merge),
                PromptGate.from_adapter(adapter),
            )
            label = "+".join(map(str, sorted(scales)))
            answers = answer_prompts(
                loaded,
                mode,
                prompts,
                max_new_tokens=config.strength_tokens,
                batch_size=config.batch_size,
                desc=f"layers {label} x {strength:g}",
                show_progress=config.show_progress,
            )
            refused = judge.judge(prompts, [a.response for a in answers])
            split = len(harmful)
            fired = [i for i, a in enumerate(answers[:split]) if a.steering.fired]
            benign_fired = [i for i, a in enumerate(answers[split:], split) if a.steering.fired]
            scores.append(
                StrengthScore(
                    layers=tuple(sorted(scales)),
                    strength=strength,
                    fired=len(fired),
                    refused=_share([refused[i] for i in fired]),
                    coherent=_share([coherent_text(answers[i].response) for i in fired]),
                    refused_coherent=_share(
                        [refused[i] and coherent_text(answers[i].response) for i in fired]
                    ),
                    benign_fired=len(benign_fired),
                    benign_refused=_share([refused[i] for i in benign_fired]),
                )
            )
    finally:
        hooks.remove()
    return scores


def _share(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def _fired_rows(gate: FittedGate, pooled: torch.Tensor) -> list[int]:
    return [int(i) for i in torch.nonzero(gate.fired(pooled).any(dim=1)).flatten()]


# ----- the whole build ---------------------------------------------------------------------------
def build(
    loaded: LoadedModel,
    config: BuildConfig,
    data: BuildData | None = None,
    *,
    judge: RefusalJudge | None = None,
    progress: Progress | None = None,
) -> BuildResult:
    """Run the steps of the module docstring and return the gated adapter (not yet saved).

    Raises:
        ValueError: no candidate layer above the chosen detection layer gains refusals within
            the budgets, or the data lack a category's prompts.
    """
    data = data if data is not None else project_data()
    judge = judge if judge is not None else default_judge()
    say = progress if progress is not None else (lambda _message: None)
    torch.manual_seed(config.seed)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[step] = round(now - clock, 1)
        clock = now

    extraction = ExtractionConfig(
        layers=(max(config.candidate_layers),),
        scale=1.0,
        seed=config.seed,
        categories=data.categories,
        max_prompts_per_category=config.max_prompts_per_category,
        max_response_tokens=config.max_response_tokens,
        compliance_tokens=config.compliance_tokens,
        batch_size=config.batch_size,
        name=config.name,
        show_progress=config.show_progress,
    )
    fit_prompts = [
        p if config.refusal is None else replace(p, refusal=config.refusal)
        for p in data.harmful_fit
    ]
    directions = extract_directions(loaded, extraction, fit_prompts)
    lap("extract")
    say(f"extracted directions from {len(directions.pairs)} harmful fit prompts")

    detection_layers = [la for la in config.detection_layers if la < max(config.candidate_layers)]
    fitted, dev = fit_gate_candidates(loaded, data, detection_layers, config)
    candidates = [GateCandidate.of(f) for f in fitted.values()]
    chosen_gate = choose_gate(candidates)
    gate = fitted[chosen_gate.key]
    detection = chosen_gate.layer
    exposure = Exposure(harmful=gate.harmful_any, benign=gate.benign_any)
    lap("gate")
    questions = "" if gate.questions_any is None else f", dev questions {gate.questions_any:.1%}"
    say(
        f"gate at layer {detection} ({chosen_gate.pooling} pooling): harmful dev TPR "
        f"{gate.harmful_any:.1%}, benign dev FPR (held out) {gate.benign_any:.1%}{questions}"
    )

    score_harmful = sample_per_category(
        data.harmful_dev, config.score_prompts_per_category, config.seed
    )
    score_benign = sample_benign(data.benign_dev, config.score_benign_prompts, config.seed)
    scores = score_layers(
        loaded,
        directions.vectors,
        directions.typical_norms,
        [la for la in config.candidate_layers if la > detection],
        config.scales,
        _prompts(score_harmful),
        _prompts(score_benign),
        judge,
        max_new_tokens=config.score_tokens,
        batch_size=config.batch_size,
        show_progress=config.show_progress,
    )
    choice: LayerChoice = select_layers(scores, config.rule, exposure)
    lap("layers")
    say("best layers: " + ", ".join(f"{c.layer} @ {c.scale:g}" for c in choice.ranked))

    strength_pool = sample_per_category(
        data.harmful_dev, config.strength_prompts_per_category, config.seed
    )
    index = {p.id: i for i, p in enumerate(data.harmful_dev)}
    fired_harmful = set(_fired_rows(gate, dev[chosen_gate.key]["harmful"]))
    harmful_fired = [p.prompt for p in strength_pool if index[p.id] in fired_harmful]
    benign_fired = [
        data.benign_dev[i].prompt for i in _fired_rows(gate, dev[chosen_gate.key]["benign"])
    ]

    def make(scales: Mapping[int, float], strength: float) -> SafetyAdapter:
        return make_adapter(loaded, directions, extraction, scales, strength, gate)

    prefixes = choice.prefixes()
    settings = [(scales, strength) for scales in prefixes for strength in config.strengths]
    strength_scores = measure_strengths(
        loaded, make, settings, harmful_fired, benign_fired, judge, config
    )
    chosen = choose_strength(strength_scores, config.min_coherent)
    scales = next(p for p in prefixes if tuple(sorted(p)) == chosen.layers)
    lap("strength")
    say(
        f"layers {', '.join(f'{la} @ {s:g}' for la, s in scales.items())} x strength "
        f"{chosen.strength:g}: refused {chosen.refused:.0%} of fired, "
        f"coherent {chosen.coherent:.0%}"
    )

    summary = BuildSummary(
        layer_scores=tuple(scores),
        layers=dict(scales),
        gate_candidates=tuple(sorted(candidates, key=lambda g: g.key)),
        detection_layer=detection,
        strength_scores=tuple(strength_scores),
        strength=chosen.strength,
        detection_pooling=chosen_gate.pooling,
        exposure=exposure,
    )
    adapter = make(scales, chosen.strength)
    recipe = _recipe(adapter, config, data, summary, choice, gate, timings, len(harmful_fired))
    metadata = replace(adapter.metadata, recipe=recipe)
    return BuildResult(replace(adapter, metadata=metadata), summary, timings)


def _recipe(
    adapter: SafetyAdapter,
    config: BuildConfig,
    data: BuildData,
    summary: BuildSummary,
    choice: LayerChoice,
    gate: FittedGate,
    timings: Mapping[str, float],
    strength_prompts: int,
) -> dict[str, Any]:
    recipe = dict(adapter.metadata.recipe)
    for stale in ("scale", "coefficient_rule", "mix_norm_ratio"):
        recipe.pop(stale, None)
    recipe.update(
        {
            "pipeline": "safesteer build-adapter",
            "command": config.command,
            "splits": {
                "source": data.source,
                "digests": dict(data.digests),
                "harmful_fit": len(data.harmful_fit),
                "harmful_dev": len(data.harmful_dev),
                "benign_fit": len(data.benign_fit),
                "benign_dev": len(data.benign_dev),
                "questions_fit": min(config.fit_questions, len(data.questions_fit)),
                "questions_dev": len(data.questions_dev),
            },
            "refusal": {
                "text": config.refusal,
                "note": "teacher-forced as the refusal of every fit prompt, in place of the "
                "data sets' reference refusals and the templates (data.per_category counts "
                "them as references)"
                if config.refusal is not None
                else "the data sets' reference refusals, else the templates",
            },
            "layers": sorted(summary.layers),
            "coefficient_rule": (
                "coef[c][l] = strength * scale[l] * typical_norm[l] / |vector[c][l]|: category c "
                "alone at weight 1 adds strength * scale[l] * typical_norm[l] at layer l"
            ),
            "merge": config.merge,
            "merge_note": (
                "calibrated for this merge scheme (safesteer.adapters.merging): the categories "
                "share most of their direction, and several fire together on most harmful "
                "prompts; under the naive sum a row with k categories firing is pushed about "
                "k times as hard"
            ),
            "layer_selection": {
                "candidates": list(config.candidate_layers),
                "scales": list(config.scales),
                "rule": config.rule.describe(),
                "rule_params": asdict(config.rule),
                "direction": "normalised mean of the categories' unit vectors at the layer",
                "harmful_dev_prompts": config.score_prompts_per_category,
                "harmful_dev_prompts_unit": "per category",
                "benign_dev_prompts": config.score_benign_prompts,
                "max_new_tokens": config.score_tokens,
                "ranked": [{"layer": c.layer, "scale": c.scale} for c in choice.ranked],
            },
            "gate_selection": {
                "candidates": [list(g.key) for g in summary.gate_candidates],
                "rule": "probes fitted on harmful fit vs benign fit + fit questions, calibrated "
                "to the target FPR on benign dev (plus benign fit + fit questions scored out of "
                "fold, when calibration_folds > 0) and on dev questions (the higher threshold); "
                "highest harmful dev TPR minus the higher held-out FPR of the two; ties: lower "
                "FPR, then the deeper layer, then mean pooling",
                "target_fpr": config.target_fpr,
                "calibration_folds": config.calibration_folds,
                "scope": "any",
                "poolings": list(config.poolings),
                "pooling": summary.detection_pooling,
                "method": config.gate_method,
            },
            "strength_selection": {
                "layer_sets": [sorted(p) for p in choice.prefixes()],
                "candidates": list(config.strengths),
                "rule": describe_rule(config.min_coherent),
                "min_coherent": config.min_coherent,
                "harmful_dev_prompts_sampled_per_category": config.strength_prompts_per_category,
                "harmful_dev_prompts_fired": strength_prompts,
                "max_new_tokens": config.strength_tokens,
            },
            "build": summary.to_json(),
            "gate": {**gate.record(), "auc": {c: round(a, 4) for c, a in gate.auc.items()}},
            "seed": config.seed,
            "timings_s": dict(timings),
        }
    )
    return recipe


def save_outputs(result: BuildResult, out: Path) -> list[Path]:
    """The adapter file and, next to it, the PNG of the build's scores."""
    from safesteer.adapters.build_plot import PLOT_NAME, plot_summary

    written = [result.adapter.save(out)]
    max_kl = result.adapter.metadata.recipe["layer_selection"]["rule_params"]["max_kl"]
    written.append(plot_summary(result.summary, out.parent / PLOT_NAME, max_kl))
    return written
