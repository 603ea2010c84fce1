"""Few-shot layer-wise recalibration of a family adapter for one fine-tune (SafeGene-style).

A family adapter was set to an operating point on one model, its *reference* (the model it was
made for: `recipe.model.source`, fingerprint `base_fingerprint`). A fine-tune of the family
drifts: the same steering makes it refuse less (safety eroded) or more. Calibration keeps the
adapter's vectors exactly and fits one multiplier per steering layer, so that the fine-tune,
steered, behaves on a few prompts as the reference does.

**Shots.** At most `shots` prompts of the fit split (seeded): half harmful, spread round-robin
over the adapter's categories in a seeded order, half benign, alternating edgy and plain ones.
With 8 harmful shots over 10 categories a category has at most one shot, so per-category
coefficients would be fitted to single prompts; one multiplier per layer, shared by all
categories, is what 16 shots can pin down (the categories' vectors share most of their
direction anyway).

**Score.** For each shot, the mean per-token log-probability of a plain refusal's opening
clause (the adapter recipe's refusal text, else `DEFAULT_REFUSAL`, up to its first comma or
full stop: "I'm sorry") teacher-forced after the chat prompt, with every row steered by the
adapter's default mix (its merge scheme; gates are not evaluated: this is the behaviour *given*
that steering is on). `H` is the mean over harmful shots, `B` over benign shots. One forward
pass over the shots gives both; no generation. The opening is where the model decides; the
rest of the sentence follows from it and, averaged in, hides the decision: the zoo's BadGPT
fine-tune, steered by the built-in adapter, gives the whole sentence a *higher* mean
log-probability than the base does (-0.88 against -1.18 nats per token on the harmful shots),
so the whole-sentence score asked for the weakest steering (x0.5, nothing refused in the
transfer table), while its opening is far less likely than on the base (-2.06 against -0.51).
`refusal_span="whole"` scores the whole sentence.

**Objective.** With `H*`, `B*` the reference's scores (steered by the adapter as is, or,
`reference_mode="plain"`, unsteered: "refuse like the aligned model does"),

    objective(m) = -( max(0, H* - H(m)) + max(0, B(m) - B*) )

in nats: refuse harmful shots at least as readily as the reference, benign ones at most as
readily. Zero means restored. A plain difference `H(m) - B(m)` is no usable objective: if
steering shifts a logit that both share, `log s(a + x) - log s(b + x)` falls with `x` for
`a > b`, so it would always pick the weakest steering.

**Search.** Coordinate-wise over the grid, steering layers in increasing order (a layer's
choice changes what the layers above it see), the others held at their current multipliers
(all start at 1, the adapter as is); `sweeps` rounds. Per layer, among the grid points whose
objective is within `tie_tolerance` of the best, the smallest multiplier: the least steering
that restores the reference. Passes for one layer share every decoder layer below it, which
`PrefixReplay` computes once.

**Gate.** A fine-tune also moves the activations a gate reads, so thresholds calibrated on the
reference fire far above their target on its benign prompts (`gate_shift`: 1.1 % of the
benign dev prompts on the base, 12 to 32 % on the zoo's fine-tunes). With `gate="shift"`
(the default) each category's threshold moves by the mean probe-score shift of the benign
shots between the reference and the fine-tune; `gate="keep"` leaves the thresholds as they
are.

The calibrated adapter: the same vectors and probes (bit for bit), coefficients
`coef[c][l] * m[l]`, thresholds shifted as above, `base_fingerprint` the fine-tune's weights
fingerprint, a name of its own (adapter ids are `name@payload sha`, and the payload, the
vectors, does not change), and the source recipe with a `calibration` entry recording shots,
grid, scores, choices and the gate's shifts.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from tqdm import tqdm

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.extract import chat_prompt_ids, package_version
from safesteer.adapters.gate_shift import GateShift, measure_gate_shift, shifted_gate
from safesteer.adapters.hooks import SteeringHooks
from safesteer.adapters.loading import LoadedModel
from safesteer.adapters.merging import MergingBasis, merge_scheme
from safesteer.adapters.padding import left_pad
from safesteer.adapters.prefix_replay import PrefixReplay
from safesteer.adapters.prompts import HarmfulPrompt
from safesteer.adapters.splits import DEFAULT_SEED, BenignPrompt, benign_split, harmful_split
from safesteer.adapters.table import SteeringBasis

DEFAULT_GRID: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
DEFAULT_SHOTS = 16
# The sentence `safesteer build-adapter` teacher-forces (build.CANONICAL_REFUSAL).
DEFAULT_REFUSAL = "I'm sorry, but I can't help with that."
REFERENCE_MODES: tuple[str, ...] = ("steered", "plain")
# How much of the refusal is scored: its opening clause (up to the first comma or full stop),
# where the model decides to refuse, or the whole sentence.
REFUSAL_SPANS: tuple[str, ...] = ("opening", "whole")
GATE_RULES: tuple[str, ...] = ("shift", "keep")
SPLITS: tuple[str, ...] = ("fit", "dev")
OBJECTIVE = (
    "-(max(0, H_ref - H(m)) + max(0, B(m) - B_ref)); H, B: mean over harmful / benign shots of "
    "the refusal's (refusal.span) mean per-token log-probability, teacher-forced after the chat "
    "prompt, every row steered by the adapter's default mix with per-layer multipliers m"
)
RULE = (
    "coordinate-wise over the grid, steering layers in increasing order, others held; per "
    "layer the smallest multiplier whose objective is within tie_tolerance of the best"
)


@dataclass(frozen=True)
class CalibrationConfig:
    """How to calibrate; every field ends up in the calibrated adapter's recipe."""

    shots: int = DEFAULT_SHOTS
    grid: tuple[float, ...] = DEFAULT_GRID
    seed: int = 0
    split: str = "fit"
    split_seed: int = DEFAULT_SEED
    refusal: str | None = None  # None: the adapter recipe's refusal text, else DEFAULT_REFUSAL
    reference_mode: str = "steered"
    refusal_span: str = "opening"  # one of REFUSAL_SPANS
    gate: str = "shift"  # one of GATE_RULES
    sweeps: int = 1
    max_prompt_tokens: int = 128
    batch_size: int = 16
    tie_tolerance: float = 1e-4
    name: str | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.shots < 2:
            raise ValueError("calibration needs at least 2 shots (one harmful, one benign)")
        if not self.grid or any(not math.isfinite(g) or g <= 0 for g in self.grid):
            raise ValueError("the grid needs positive, finite multipliers")
        if len(set(self.grid)) != len(self.grid):
            raise ValueError("the grid repeats a multiplier")
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}; calibrate on one of {SPLITS}")
        if self.reference_mode not in REFERENCE_MODES:
            raise ValueError(
                f"unknown reference mode {self.reference_mode!r}; known: {REFERENCE_MODES}"
            )
        if self.refusal_span not in REFUSAL_SPANS:
            raise ValueError(f"unknown refusal span {self.refusal_span!r}; known: {REFUSAL_SPANS}")
        if self.gate not in GATE_RULES:
            raise ValueError(f"unknown gate rule {self.gate!r}; known: {GATE_RULES}")
        if self.sweeps < 1 or self.batch_size < 1 or self.max_prompt_tokens < 1:
            raise ValueError("sweeps, batch size and max prompt tokens must be positive")
        if self.tie_tolerance < 0:
            raise ValueError("tie_tolerance must not be negative")
        if self.refusal is not None and not self.refusal.strip():
            raise ValueError("the refusal text is empty")


@dataclass(frozen=True)
class Shot:
    """One calibration prompt."""

    id: str
    prompt: str
    harmful: bool
    category: str | None  # harmful: its category; benign: the category an edgy one borrows
    edgy: bool = False

    def to_json(self) -> dict[str, Any]:
        kind = "harmful" if self.harmful else ("edgy" if self.edgy else "benign")
        return {"id": self.id, "kind": kind, "category": self.category}


@dataclass(frozen=True)
class RefusalScore:
    """Mean refusal log-likelihood (nats per token) on the harmful and on the benign shots."""

    harmful: float
    benign: float

    def to_json(self) -> dict[str, float]:
        return {"harmful": round(self.harmful, 6), "benign": round(self.benign, 6)}


@dataclass(frozen=True)
class GridPoint:
    """One scored setting of the search."""

    sweep: int
    layer: int
    multipliers: tuple[float, ...]  # one per steering layer, in increasing layer order
    score: RefusalScore
    objective: float

    def to_json(self) -> dict[str, Any]:
        return {
            "sweep": self.sweep,
            "layer": self.layer,
            "multipliers": list(self.multipliers),
            **self.score.to_json(),
            "objective": round(self.objective, 6),
        }


@dataclass(frozen=True)
class CalibrationResult:
    """The calibrated adapter and how it was chosen."""

    adapter: SafetyAdapter
    multipliers: Mapping[int, float]
    shots: tuple[Shot, ...]
    reference: RefusalScore
    as_is: GridPoint
    calibrated: GridPoint
    points: tuple[GridPoint, ...] = field(default_factory=tuple)
    seconds: float = 0.0
    gate_shift: GateShift | None = None  # None: thresholds kept (or no gate)


def objective(score: RefusalScore, reference: RefusalScore) -> float:
    """Zero when harmful shots refuse at least as readily as the reference's, benign ones at
    most as readily; minus the shortfalls (nats per token) otherwise."""
    return -(
        max(0.0, reference.harmful - score.harmful) + max(0.0, score.benign - reference.benign)
    )


def choose_multiplier(points: Sequence[GridPoint], slot: int, tolerance: float) -> float:
    """The smallest multiplier of `slot` among points within `tolerance` of the best objective.

    Raises:
        ValueError: no points.
    """
    if not points:
        raise ValueError("no grid points were scored")
    best = max(point.objective for point in points)
    return min(p.multipliers[slot] for p in points if p.objective >= best - tolerance)


# ----- shots ------------------------------------------------------------------------------------
def select_shots(
    harmful: Sequence[HarmfulPrompt],
    benign: Sequence[BenignPrompt],
    categories: Sequence[str],
    count: int,
    seed: int,
    fits: Callable[[str], bool] = lambda _prompt: True,
) -> tuple[Shot, ...]:
    """`ceil(count / 2)` harmful shots round-robin over `categories` (seeded order), the rest
    benign, alternating edgy and plain; only prompts for which `fits` holds.

    Raises:
        ValueError: no harmful prompt of the categories or no benign prompt fits.
    """
    rng = random.Random(seed)
    wanted_harmful = (count + 1) // 2
    pools: dict[str, list[HarmfulPrompt]] = {}
    for category in sorted(set(categories)):
        pool = [p for p in harmful if p.category == category]
        rng.shuffle(pool)
        fitting = [p for p in pool if fits(p.prompt)]
        if fitting:
            pools[category] = fitting
    if not pools:
        raise ValueError(f"no harmful prompt of the categories {sorted(categories)} fits")
    order = sorted(pools)
    rng.shuffle(order)
    chosen: list[Shot] = []
    for round_ in range(max(len(pool) for pool in pools.values())):
        for category in order:
            if len(chosen) < wanted_harmful and round_ < len(pools[category]):
                p = pools[category][round_]
                chosen.append(Shot(p.id, p.prompt, True, p.category))
    edgy = [p for p in benign if p.edgy]
    plain = [p for p in benign if not p.edgy]
    rng.shuffle(edgy)
    rng.shuffle(plain)
    queues = [[p for p in edgy if fits(p.prompt)], [p for p in plain if fits(p.prompt)]]
    if not queues[0] and not queues[1]:
        raise ValueError("no benign prompt fits")
    benign_shots: list[Shot] = []
    turn = 0
    while len(benign_shots) < count - len(chosen) and (queues[0] or queues[1]):
        queue = queues[turn % 2] or queues[(turn + 1) % 2]
        picked = queue.pop(0)
        benign_shots.append(Shot(picked.id, picked.prompt, False, picked.category, picked.edgy))
        turn += 1
    return (*chosen, *benign_shots)


# ----- scoring ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Batch:
    index: int
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    harmful: torch.Tensor  # [rows] bool


def _encode(
    tokenizer: Any, shots: Sequence[Shot], refusal_ids: Sequence[int], batch_size: int
) -> list[_Batch]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = []
    for index, start in enumerate(range(0, len(shots), batch_size)):
        part = shots[start : start + batch_size]
        rows = [chat_prompt_ids(tokenizer, shot.prompt) + list(refusal_ids) for shot in part]
        # Left padding puts every row's refusal at the same, last positions.
        input_ids, mask = left_pad(rows, int(pad or 0))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        harmful = torch.tensor([shot.harmful for shot in part])
        batches.append(_Batch(index, input_ids, mask, positions, harmful))
    return batches


class _Scorer:
    """Refusal log-likelihoods of the shots on one model, under multiples of the adapter."""

    def __init__(
        self,
        loaded: LoadedModel,
        adapter: SafetyAdapter,
        batches: Sequence[_Batch],
        refusal_ids: Sequence[int],
    ) -> None:
        self.loaded = loaded
        self.batches = batches
        self.targets = torch.tensor(list(refusal_ids))
        basis = MergingBasis.of(SteeringBasis.from_adapter(adapter), merge_scheme(None, adapter))
        self.scheme = basis.scheme
        self.layers: tuple[int, ...] = tuple(basis.layers)
        weights = basis.weights({})
        if not bool(weights.any()):
            raise ValueError(f"adapter {adapter.id} steers nothing by default (all weights 0)")
        self.tables = [basis.table(weights.expand(len(b.harmful), -1)) for b in batches]
        self.replay = PrefixReplay(loaded.model, loaded.family.num_layers)
        self._hooks: SteeringHooks | None = None
        self.passes = 0

    @contextmanager
    def installed(self) -> Iterator[_Scorer]:
        self._hooks = SteeringHooks(self.loaded.model, self.loaded.family.num_layers, self.layers)
        try:
            yield self
        finally:
            self._hooks.remove()
            self._hooks = None

    @torch.inference_mode()
    def score(self, multipliers: Sequence[float] | None, vary: int | None = None) -> RefusalScore:
        """Scores with `coef * multipliers[slot]` at each layer (None: unsteered).

        `vary` names the slot that a run of calls changes: the layers below it are replayed.
        """
        assert self._hooks is not None, "use inside installed()"
        rows = []
        for batch, base in zip(self.batches, self.tables, strict=True):
            table = None
            if multipliers is not None:
                table = base * torch.tensor(multipliers, dtype=base.dtype)[None, :, None]
            with ExitStack() as stack:
                if multipliers is not None and vary is not None:
                    depth = self.layers[vary]
                    fixed = tuple(multipliers[:vary])
                    shallower = None
                    if vary > 0:
                        below = self.layers[vary - 1]
                        shallower = ((batch.index, below, fixed[:-1]), below)
                    stack.enter_context(
                        self.replay.run((batch.index, depth, fixed), depth, shallower)
                    )
                stack.enter_context(self._hooks.steering(table))
                rows.append(self._refusal_logprobs(batch))
            self.passes += 1
        per_row = torch.cat(rows)
        harmful = torch.cat([b.harmful for b in self.batches])
        return RefusalScore(
            harmful=float(per_row[harmful].double().mean()),
            benign=float(per_row[~harmful].double().mean()),
        )

    def _refusal_logprobs(self, batch: _Batch) -> torch.Tensor:
        length = len(self.targets)
        logits = self.loaded.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
            logits_to_keep=length + 1,
        ).logits
        # Position t predicts token t + 1: the kept positions but the last predict the refusal.
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        targets = self.targets.expand(logprobs.shape[0], -1)[..., None]
        picked: torch.Tensor = logprobs.gather(-1, targets).squeeze(-1).mean(dim=-1)
        return picked


# ----- the search -------------------------------------------------------------------------------
def refusal_text(adapter: SafetyAdapter, override: str | None = None) -> str:
    """`override`, else the refusal the adapter's recipe teacher-forced, else the default."""
    if override is not None:
        return override
    recorded = adapter.metadata.recipe.get("refusal")
    text = recorded.get("text") if isinstance(recorded, Mapping) else None
    return text if isinstance(text, str) and text.strip() else DEFAULT_REFUSAL


def refusal_opening(refusal: str) -> str:
    """The refusal up to its first comma or full stop (all of it when it has neither).

    >>> refusal_opening("I'm sorry, but I can't help with that.")
    "I'm sorry"
    """
    opening = re.split(r"[,.]", refusal.strip(), maxsplit=1)[0].strip()
    return opening or refusal.strip()


def calibration_shots(
    loaded: LoadedModel,
    adapter: SafetyAdapter,
    config: CalibrationConfig,
    harmful: Sequence[HarmfulPrompt] | None = None,
    benign: Sequence[BenignPrompt] | None = None,
) -> tuple[Shot, ...]:
    """The shots for `config` from its split (or the prompts given)."""
    split: Any = config.split
    harmful = harmful if harmful is not None else harmful_split(split, config.split_seed)
    benign = benign if benign is not None else benign_split(split, seed=config.split_seed)

    def fits(prompt: str) -> bool:
        return len(chat_prompt_ids(loaded.tokenizer, prompt)) <= config.max_prompt_tokens

    return select_shots(harmful, benign, adapter.categories, config.shots, config.seed, fits)


def calibrate(
    adapter: SafetyAdapter,
    loaded: LoadedModel,
    reference: LoadedModel,
    config: CalibrationConfig,
    harmful: Sequence[HarmfulPrompt] | None = None,
    benign: Sequence[BenignPrompt] | None = None,
) -> CalibrationResult:
    """Fit per-layer multipliers of `adapter` for `loaded` against `reference` (see module doc).

    `reference` may be `loaded` itself. The prompts come from the config's split unless given.

    Raises:
        AdapterMismatch: the adapter does not fit the model's or the reference's family.
        ValueError: the tokenizers of model and reference differ, or no shots can be drawn.
    """
    started = time.perf_counter()
    adapter.check_fits(loaded.family)
    adapter.check_fits(reference.family)
    torch.manual_seed(config.seed)
    shots = calibration_shots(loaded, adapter, config, harmful, benign)
    refusal = refusal_text(adapter, config.refusal)
    if config.refusal_span == "opening":
        refusal = refusal_opening(refusal)
    refusal_ids = list(loaded.tokenizer(refusal, add_special_tokens=False)["input_ids"])
    batches = _encode(loaded.tokenizer, shots, refusal_ids, config.batch_size)
    if reference is not loaded:
        reference_batches = _encode(reference.tokenizer, shots, refusal_ids, config.batch_size)
        if any(
            not torch.equal(a.input_ids, b.input_ids)
            for a, b in zip(batches, reference_batches, strict=True)
        ):
            raise ValueError(
                f"{loaded.name} and the reference {reference.name} tokenize the shots "
                "differently: they are not one family"
            )
    gate_shift: GateShift | None = None
    if config.gate == "shift" and adapter.metadata.gate is not None and reference is not loaded:
        benign_shots = [s.prompt for s in shots if not s.harmful]
        gate_shift = measure_gate_shift(adapter, loaded, reference, benign_shots, config.batch_size)
    scorer = _Scorer(loaded, adapter, batches, refusal_ids)
    reference_scorer = (
        scorer if reference is loaded else _Scorer(reference, adapter, batches, refusal_ids)
    )
    layers = scorer.layers
    ones = (1.0,) * len(layers)
    grid = sorted(config.grid)
    # The reference, the adapter as is, the grid points and the final choice (cached ones too).
    steps = 3 + config.sweeps * len(layers) * len(grid)
    scores: dict[tuple[float, ...], RefusalScore] = {}
    points: list[GridPoint] = []
    with ExitStack() as stack:
        stack.enter_context(scorer.installed())
        if reference_scorer is not scorer:
            stack.enter_context(reference_scorer.installed())
        bar = stack.enter_context(
            tqdm(total=steps, desc="calibrating", disable=not config.show_progress)
        )
        if config.reference_mode == "plain":
            reference_score = reference_scorer.score(None)
        elif reference_scorer is scorer:
            reference_score = scores[ones] = scorer.score(ones, vary=0)
        else:
            reference_score = reference_scorer.score(ones)
        bar.update()

        def point(sweep: int, slot: int, multipliers: tuple[float, ...]) -> GridPoint:
            if multipliers not in scores:
                scores[multipliers] = scorer.score(multipliers, vary=slot)
            bar.update()
            score = scores[multipliers]
            return GridPoint(
                sweep, layers[slot], multipliers, score, objective(score, reference_score)
            )

        current = list(ones)
        as_is = point(0, 0, ones)
        for sweep in range(config.sweeps):
            for slot in range(len(layers)):
                tried = [
                    point(sweep, slot, (*current[:slot], g, *current[slot + 1 :])) for g in grid
                ]
                points.extend(tried)
                current[slot] = choose_multiplier(tried, slot, config.tie_tolerance)
        final = point(config.sweeps - 1, len(layers) - 1, tuple(current))
    multipliers = dict(zip(layers, current, strict=True))
    seconds = time.perf_counter() - started
    calibration = _calibration_recipe(
        adapter,
        loaded,
        reference,
        config,
        shots=shots,
        refusal=refusal,
        refusal_tokens=len(refusal_ids),
        scheme=scorer.scheme,
        reference_score=reference_score,
        as_is=as_is,
        final=final,
        points=points,
        multipliers=multipliers,
        passes=scorer.passes + (reference_scorer.passes if reference_scorer is not scorer else 0),
        seconds=seconds,
        gate_shift=gate_shift,
    )
    calibrated = calibrated_adapter(
        adapter, loaded, multipliers, calibration, config.name, gate_shift=gate_shift
    )
    return CalibrationResult(
        calibrated,
        multipliers,
        shots,
        reference_score,
        as_is,
        final,
        tuple(points),
        seconds,
        gate_shift,
    )


# ----- the calibrated adapter -------------------------------------------------------------------
def calibrated_name(
    source: str, model_name: str, fingerprint: str, multipliers: Mapping[int, float]
) -> str:
    """`<source>.cal.<model>.<digest>`: unique per fine-tune and choice, safe in a URL path."""
    slug = re.sub(r"[^A-Za-z0-9._+-]+", "_", model_name).strip("_") or "model"
    payload = json.dumps([fingerprint, sorted(multipliers.items())])
    return f"{source}.cal.{slug}.{hashlib.sha256(payload.encode()).hexdigest()[:8]}"


def calibrated_adapter(
    source: SafetyAdapter,
    loaded: LoadedModel,
    multipliers: Mapping[int, float],
    calibration: Mapping[str, Any],
    name: str | None = None,
    *,
    gate_shift: GateShift | None = None,
) -> SafetyAdapter:
    """`source` with `coef[c][l] * multipliers[l]`, the model's fingerprint and the record.

    Vectors and condition probes are the source's own tensors; `gate_shift` moves the gate's
    thresholds.

    Raises:
        ValueError: a steering layer of the source has no multiplier, or `name` is the
            source's (same name and vectors make the same adapter id, and a server holding
            both would take one for the other).
    """
    missing = sorted(set(source.layers) - set(multipliers))
    if missing:
        raise ValueError(f"no multiplier for steering layers {missing}")
    if name == source.metadata.name:
        raise ValueError(
            f"the calibrated adapter needs a name other than the source's {name!r}: with the "
            "same vectors it would get the same id"
        )
    coefficients = {
        category: {layer: coef * multipliers.get(layer, 1.0) for layer, coef in per.items()}
        for category, per in source.coefficients.items()
    }
    name = name or calibrated_name(
        source.metadata.name, loaded.name, loaded.fingerprint, multipliers
    )
    # The source recipe stays at the top (its `merge` says how categories combine).
    recipe = {**source.metadata.recipe, "calibration": dict(calibration)}
    gate = source.metadata.gate
    if gate is not None and gate_shift is not None:
        gate = shifted_gate(gate, gate_shift)
    metadata = replace(
        source.metadata, name=name, base_fingerprint=loaded.fingerprint, recipe=recipe, gate=gate
    )
    return SafetyAdapter(metadata, source.vectors, coefficients, source.conditions)


def with_calibration_fields(adapter: SafetyAdapter, **fields: Any) -> SafetyAdapter:
    """The adapter with extra entries in its recipe's `calibration` (e.g. the command line)."""
    recipe = dict(adapter.metadata.recipe)
    recipe["calibration"] = {**recipe.get("calibration", {}), **fields}
    metadata = replace(adapter.metadata, recipe=recipe)
    return SafetyAdapter(metadata, adapter.vectors, adapter.coefficients, adapter.conditions)


def _model_record(loaded: LoadedModel) -> dict[str, str]:
    return {"name": loaded.name, "source": loaded.source, "fingerprint": loaded.fingerprint}


def _calibration_recipe(
    adapter: SafetyAdapter,
    loaded: LoadedModel,
    reference: LoadedModel,
    config: CalibrationConfig,
    *,
    shots: Sequence[Shot],
    refusal: str,
    refusal_tokens: int,
    scheme: str,
    reference_score: RefusalScore,
    as_is: GridPoint,
    final: GridPoint,
    points: Sequence[GridPoint],
    multipliers: Mapping[int, float],
    passes: int,
    seconds: float,
    gate_shift: GateShift | None = None,
) -> dict[str, Any]:
    recorded = adapter.metadata.base_fingerprint
    return {
        "method": "few-shot layer-wise multipliers (SafeGene-style recalibration)",
        "source_adapter": {
            "id": adapter.id,
            "name": adapter.metadata.name,
            "payload_sha256": adapter.payload_sha256,
            "base_fingerprint": recorded,
            "coefficients_scaled": "coef[c][l] * multipliers[l]; vectors unchanged",
        },
        "model": _model_record(loaded),
        "reference": {
            **_model_record(reference),
            "mode": config.reference_mode,
            "is_adapter_base": bool(recorded) and reference.fingerprint == recorded,
        },
        "objective": OBJECTIVE,
        "rule": RULE,
        "refusal": {"text": refusal, "tokens": refusal_tokens, "span": config.refusal_span},
        "steering": f"always on, default category weights, merge '{scheme}', gates not used",
        "shots": {
            "count": len(shots),
            "harmful": sum(s.harmful for s in shots),
            "benign": sum(not s.harmful for s in shots),
            "seed": config.seed,
            "split": {"name": config.split, "seed": config.split_seed},
            "max_prompt_tokens": config.max_prompt_tokens,
            "prompts": [s.to_json() for s in shots],
        },
        "config": {
            **{k: v for k, v in asdict(config).items() if k not in ("show_progress", "name")},
            "grid": sorted(config.grid),
        },
        "scores": {
            "reference": reference_score.to_json(),
            "as_is": {**as_is.score.to_json(), "objective": round(as_is.objective, 6)},
            "calibrated": {**final.score.to_json(), "objective": round(final.objective, 6)},
        },
        "multipliers": {str(layer): m for layer, m in sorted(multipliers.items())},
        "gate": None
        if adapter.metadata.gate is None
        else (gate_shift.to_json() if gate_shift is not None else {"rule": "thresholds kept"}),
        "grid_points": [p.to_json() for p in points],
        "forward_passes": passes,
        "seconds": round(seconds, 2),
        "safesteer_version": package_version(),
    }
