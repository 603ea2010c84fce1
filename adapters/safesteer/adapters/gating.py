"""CAST-style gates: per category, a condition probe on the prompt decides whether to steer.

A gate reads the output of one decoder layer (the detection layer, before every steering
layer) at the prefill, pools it over the prompt (`last` token or `mean` of the prompt's
tokens) and scores each category: `score = condition . pooled + bias`. The category fires for
that row when `score > threshold`, and stays on (or off) for the rest of the generation.

Probes separate one category's harmful prompts from benign ones: `lda` (default) is linear
discriminant analysis with a shrunk covariance, `diffmean` the plain difference of means, and
`pooled-lda` lets small categories borrow strength from the others: one within-class
covariance pooled over every category and the benign prompts, and each category's harmful
mean drawn halfway (`POOLED_SHARE`) towards the mean of all harmful prompts. All are scaled
so the (drawn) harmful mean scores +1 and the benign mean -1. Thresholds are calibrated on
benign dev prompts (and, with `fit_folds`, the benign fit prompts scored by probes fitted
without them) to a target false-positive rate, either per category (`scope="category"`)
or for the union (`scope="any"`: a benign prompt on which *any* category fires counts once,
which is what over-refusal measures).

`python -m safesteer.adapters.gating --model smollm2-135m-instruct --layers 6,8,10` fits probes
at each candidate layer and prints their dev-split accuracy.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from safesteer.adapters.adapter import POOLINGS, CategoryGate, GateSpec, SafetyAdapter
from safesteer.adapters.extract import chat_prompt_ids
from safesteer.adapters.family import ModelFamily
from safesteer.adapters.layers import decoder_layers
from safesteer.adapters.loading import load_model
from safesteer.adapters.padding import left_pad
from safesteer.adapters.prompts import load_probe_prompts
from safesteer.adapters.splits import Split, benign_split, harmful_split

SCOPES: tuple[str, ...] = ("any", "category")
METHODS: tuple[str, ...] = ("lda", "diffmean", "pooled-lda")
DEFAULT_TARGET_FPR = 0.02
# `pooled-lda`: the share of the all-harmful mean in each category's harmful mean.
POOLED_SHARE = 0.5
# LDA's covariance gets `shrinkage * mean variance` added on its diagonal; on SmolLM2-135M
# results hardly change between 0.5 and 3.
DEFAULT_SHRINKAGE = 1.0


# ----- reading a gate at serve time --------------------------------------------------------------
def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """`[rows, hidden]` fp32: each row's last attended position, or the mean over attended ones.

    `mean` leaves out a row's first attended position (unless it is the only one): that is the
    attention sink, the same token for every chat prompt, with an output norm up to 100x the
    others' at middle layers (SmolLM2-135M: ~25000 vs ~150 from layer 11 on). Averaged in, it
    turns the score into a function of prompt length. Works for left and right padding:
    positions are taken from `attention_mask` `[rows, seq]`.
    """
    if hidden.ndim != 3 or attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and attention mask {tuple(attention_mask.shape)} "
            "must be [rows, seq, hidden] and [rows, seq]"
        )
    mask = attention_mask.to(device=hidden.device, dtype=torch.float32)
    if pooling == "last":
        seq = mask.shape[1]
        last = seq - 1 - mask.flip(1).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()
    if pooling == "mean":
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        sink = mask.clone()
        sink[rows, mask.argmax(dim=1)] = 0.0
        mask = torch.where(sink.sum(dim=1, keepdim=True) > 0, sink, mask)
        counts = mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        return (hidden.float() * mask[..., None]).sum(dim=1) / counts
    raise ValueError(f"unknown pooling {pooling!r}; known: {', '.join(POOLINGS)}")


@dataclass(frozen=True)
class GateDecision:
    """What a gate decided for a batch: which categories fired, and the rows' weights."""

    fired: torch.Tensor  # [rows, categories] bool
    weights: torch.Tensor  # [rows, categories]: forced + gated * fired

    @property
    def steered(self) -> torch.Tensor:
        """`[rows]` bool: rows with any non-zero weight."""
        return (self.weights != 0).any(dim=1)


@dataclass(frozen=True, eq=False)
class PromptGate:
    """An adapter's condition probes on a device, in the adapter's category order.

    Categories without a probe never fire (their threshold is +inf).
    """

    categories: tuple[str, ...]
    detection_layer: int
    pooling: str
    directions: torch.Tensor  # [categories, hidden], zero rows where there is no probe
    bias: torch.Tensor  # [categories]
    threshold: torch.Tensor  # [categories], +inf where there is no probe

    @classmethod
    def from_adapter(
        cls, adapter: SafetyAdapter, *, device: torch.device | str = "cpu"
    ) -> PromptGate:
        """The gate of `adapter`.

        Raises:
            ValueError: the adapter has no gate.
        """
        spec = adapter.metadata.gate
        if spec is None:
            raise ValueError(f"adapter {adapter.metadata.name!r} has no gate")
        categories = tuple(adapter.categories)
        hidden = adapter.metadata.hidden_size
        directions = torch.zeros(len(categories), hidden)
        bias = torch.zeros(len(categories))
        threshold = torch.full((len(categories),), math.inf)
        for index, category in enumerate(categories):
            entry = spec.categories.get(category)
            if entry is not None:
                directions[index] = adapter.conditions[category].float()
                bias[index] = entry.bias
                threshold[index] = entry.threshold
        return cls(
            categories,
            spec.detection_layer,
            spec.pooling,
            directions.to(device),
            bias.to(device),
            threshold.to(device),
        )

    @property
    def gated(self) -> torch.Tensor:
        """`[categories]` bool: which categories have a probe."""
        return torch.isfinite(self.threshold)

    def scores(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`[rows, categories]` probe scores of the detection layer's output; -inf: no probe."""
        pooled = pool(hidden, attention_mask, self.pooling).to(self.directions.device)
        raw = pooled @ self.directions.T + self.bias
        return torch.where(self.gated, raw, torch.full_like(raw, -math.inf))

    def fired(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`[rows, categories]` bool: the probe's score is above its threshold."""
        return self.scores(hidden, attention_mask) > self.threshold

    def decide(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        forced: torch.Tensor,
        gated: torch.Tensor,
    ) -> GateDecision:
        """Evaluate the probes on the detection layer's output; weights `forced + gated*fired`.

        `forced` and `gated` are `[rows, categories]` weights: forced ones apply whatever the
        probes say, gated ones only where their category fired for the row. The engine calls
        this on the prefill's detection-layer output and keeps each row's table itself.
        """
        rows = hidden.shape[0]
        expected = (rows, len(self.categories))
        if tuple(forced.shape) != expected or tuple(gated.shape) != expected:
            raise ValueError(
                f"forced {tuple(forced.shape)} and gated {tuple(gated.shape)} weights must be "
                f"[rows, categories] = {list(expected)}"
            )
        fired = self.fired(hidden, attention_mask)
        device = self.directions.device
        forced = forced.to(device=device, dtype=torch.float32)
        gated = gated.to(device=device, dtype=torch.float32)
        return GateDecision(fired, forced + gated * fired)

    def names(self, fired: torch.Tensor) -> list[list[str]]:
        """Per row, the names of the categories that fired."""
        return [
            [c for c, hit in zip(self.categories, row, strict=True) if hit]
            for row in fired.tolist()
        ]


# ----- activations of prompts -------------------------------------------------------------------
class _StopForward(Exception):
    """Raised after the last layer we read: the layers above it are not needed."""


@contextmanager
def _capturing(
    model: nn.Module, layers: Sequence[int], store: dict[int, torch.Tensor]
) -> Iterator[None]:
    modules = decoder_layers(model, ModelFamily.from_config(model.config).num_layers)
    last = max(layers)

    def make(layer: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            store[layer] = output[0] if isinstance(output, tuple) else output
            if layer == last:
                raise _StopForward

        return hook

    handles = [modules[layer].register_forward_hook(make(layer)) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def prompt_activations(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    layers: Sequence[int],
    *,
    batch_size: int = 16,
    show_progress: bool = True,
    desc: str = "prompt activations",
) -> dict[str, torch.Tensor]:
    """Pooled chat-prompt activations: per pooling, `[prompts, len(layers), hidden]` on CPU.

    Each prompt is one user turn in the tokenizer's chat template with the generation prompt
    (what the engine prefills); the forward pass stops after the highest of `layers`.
    """
    encoded = [chat_prompt_ids(tokenizer, prompt) for prompt in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    layers = list(layers)
    out = {p: torch.zeros(len(prompts), len(layers), model.config.hidden_size) for p in POOLINGS}
    backbone = getattr(model, "base_model", model)
    store: dict[int, torch.Tensor] = {}
    starts = range(0, len(order), batch_size)
    with _capturing(model, layers, store):
        for start in tqdm(starts, desc=desc, disable=not show_progress):
            indices = order[start : start + batch_size]
            input_ids, mask = left_pad([encoded[i] for i in indices], int(pad or 0))
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with suppress(_StopForward):
                backbone(
                    input_ids=input_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    use_cache=False,
                )
            rows = torch.tensor(indices)
            for pooling in POOLINGS:
                pooled = [pool(store[layer], mask, pooling).cpu() for layer in layers]
                out[pooling][rows] = torch.stack(pooled, dim=1)
    return out


# ----- fitting and calibration ------------------------------------------------------------------
def fit_probe(
    harmful: torch.Tensor,
    benign: torch.Tensor,
    method: str = "lda",
    shrinkage: float = DEFAULT_SHRINKAGE,
) -> tuple[torch.Tensor, float]:
    """Probe `(direction, bias)` under which the harmful mean scores +1, the benign mean -1.

    `diffmean`: the direction is the difference of the means. `lda`: it is
    `(covariance + shrinkage * mean variance * I)^-1 @ difference`, the covariance pooled
    within the two sets, so that directions in which prompts vary a lot anyway count less.
    (`pooled-lda` needs every category at once: `fit_probes`.)

    Raises:
        ValueError: a set is empty, the two means coincide, or the method is unknown.
    """
    if method not in ("lda", "diffmean"):
        raise ValueError(f"unknown method {method!r}; known here: lda, diffmean")
    if harmful.shape[0] == 0 or benign.shape[0] == 0:
        raise ValueError("a probe needs harmful and benign examples")
    harmful_mean, benign_mean = harmful.double().mean(0), benign.double().mean(0)
    if method == "diffmean":
        return _scaled_probe(harmful_mean, benign_mean, None, 0.0)
    centred = torch.cat([harmful.double() - harmful_mean, benign.double() - benign_mean])
    return _scaled_probe(harmful_mean, benign_mean, centred, shrinkage)


def fit_probes(
    harmful_by_category: Mapping[str, torch.Tensor],
    benign: torch.Tensor,
    method: str = "lda",
    shrinkage: float = DEFAULT_SHRINKAGE,
) -> dict[str, tuple[torch.Tensor, float]]:
    """One probe per category (`fit_probe`), or with `pooled-lda` all of them together.

    `pooled-lda`: the covariance is pooled within every category's harmful prompts and the
    benign ones, and category `c`'s harmful mean is `(1 - POOLED_SHARE) * mean_c +
    POOLED_SHARE * mean of all harmful prompts`: a category with 20 prompts then gets a probe
    close to what a category with 100 would, at some cost in telling categories apart.

    Raises:
        ValueError: a set is empty, a category's mean coincides with the benign mean, or the
            method is unknown.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if method != "pooled-lda":
        return {
            c: fit_probe(harmful, benign, method, shrinkage)
            for c, harmful in harmful_by_category.items()
        }
    groups = {c: h.double() for c, h in harmful_by_category.items()}
    if benign.shape[0] == 0 or not groups or any(g.shape[0] == 0 for g in groups.values()):
        raise ValueError("a probe needs harmful and benign examples")
    benign_mean = benign.double().mean(0)
    all_harmful = torch.cat(list(groups.values())).mean(0)
    centred = torch.cat([g - g.mean(0) for g in groups.values()] + [benign.double() - benign_mean])
    return {
        c: _scaled_probe(
            (1 - POOLED_SHARE) * g.mean(0) + POOLED_SHARE * all_harmful,
            benign_mean,
            centred,
            shrinkage,
        )
        for c, g in groups.items()
    }


def _scaled_probe(
    harmful_mean: torch.Tensor,
    benign_mean: torch.Tensor,
    centred: torch.Tensor | None,
    shrinkage: float,
) -> tuple[torch.Tensor, float]:
    """`(direction, bias)` scoring `harmful_mean` +1 and `benign_mean` -1: the difference of
    the means, through the shrunk covariance of `centred` rows when given (LDA)."""
    difference = harmful_mean - benign_mean
    if not bool(difference.any()):
        raise ValueError("harmful and benign means coincide: no direction")
    direction = difference
    if centred is not None:
        covariance = centred.T @ centred / centred.shape[0]
        ridge = shrinkage * float(covariance.diagonal().mean())
        covariance += torch.eye(covariance.shape[0], dtype=torch.float64) * max(ridge, 1e-12)
        direction = torch.linalg.solve(covariance, difference)
    direction = direction * (2.0 / float(direction @ difference))
    bias = -float(direction @ (harmful_mean + benign_mean)) / 2.0
    return direction.float(), bias


def out_of_fold_scores(
    harmful_by_category: Mapping[str, torch.Tensor],
    benign: torch.Tensor,
    folds: int,
    method: str = "lda",
    shrinkage: float = DEFAULT_SHRINKAGE,
    seed: int = 0,
) -> torch.Tensor:
    """`[benign prompts, categories]`: each benign prompt scored by probes fitted without it.

    `benign` is split into `folds` seeded folds; each fold is scored by probes fitted on every
    harmful prompt and the other folds' benign prompts. These scores join the benign dev
    prompts as a calibration set several times larger than dev alone. The fold probes see
    fewer benign prompts than the final ones, so their benign tails are, if anything, heavier
    and the thresholds calibrated on them err towards firing less.

    Raises:
        ValueError: fewer than 2 folds, or more folds than benign prompts.
    """
    count = benign.shape[0]
    if not 2 <= folds <= count:
        raise ValueError(f"folds must be in [2, {count}] for {count} benign prompts")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    names = list(harmful_by_category)
    scores = torch.zeros(count, len(names))
    for fold in range(folds):
        held = order[fold::folds]
        kept = torch.ones(count, dtype=torch.bool)
        kept[held] = False
        probes = fit_probes(harmful_by_category, benign[kept], method, shrinkage)
        directions = torch.stack([probes[c][0] for c in names])
        bias = torch.tensor([probes[c][1] for c in names])
        scores[held] = benign[held].float() @ directions.T + bias
    return scores


def calibrate_thresholds(
    benign_scores: torch.Tensor, target_fpr: float, scope: str
) -> torch.Tensor:
    """Thresholds `[categories]` under which at most `target_fpr` of benign prompts fire.

    `benign_scores` is `[prompts, categories]`; `allowed = floor(target_fpr * prompts)`.
    `scope="category"`: each category fires on at most `allowed` prompts (its threshold is
    the `allowed+1`-th highest benign score). `scope="any"`: at most `allowed` prompts fire
    any category. Scores are standardised per category (benign mean and std) and every
    category gets the same threshold in those units, the `allowed+1`-th highest of each
    prompt's largest standardised score. A probe fires when its threshold is exceeded.
    """
    if not 0.0 < target_fpr < 1.0:
        raise ValueError("target_fpr must be in (0, 1)")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; known: {', '.join(SCOPES)}")
    count = benign_scores.shape[0]
    if count == 0:
        raise ValueError("calibration needs benign prompts")
    scores = benign_scores.double()
    allowed = min(math.floor(target_fpr * count + 1e-9), count - 1)
    if scope == "category":
        return scores.sort(dim=0, descending=True).values[allowed].float()
    mean = scores.mean(dim=0)
    std = scores.std(dim=0, correction=0).clamp(min=1e-12)
    largest = ((scores - mean) / std).max(dim=1).values
    level = largest.sort(descending=True).values[allowed]
    thresholds = (mean + level * std).float()
    # Rounding to fp32 must not let a prompt at or below the level fire.
    below = torch.where((largest <= level)[:, None], benign_scores.float(), -math.inf)
    return torch.maximum(thresholds, below.max(dim=0).values)


def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    if positive.numel() == 0 or negative.numel() == 0:
        return math.nan
    greater = (positive[:, None] > negative[None, :]).double().mean()
    ties = (positive[:, None] == negative[None, :]).double().mean()
    return float(greater + 0.5 * ties)


@dataclass(frozen=True)
class FittedGate:
    """Probes and their calibrated gate, ready for `with_gate`, and what they measured on dev."""

    spec: GateSpec
    probes: Mapping[str, torch.Tensor]  # category -> [hidden]
    auc: Mapping[str, float]  # category: its harmful dev vs benign dev scores
    harmful_any: float  # share of all harmful dev prompts on which any category fires
    benign_any: float  # share of benign dev prompts on which any category fires (held out)
    questions_any: float | None = None  # the same on the benchmark-style questions, if given

    def scores(self, pooled: torch.Tensor) -> torch.Tensor:
        """`[prompts, categories]` scores of pooled activations `[prompts, hidden]`."""
        names = list(self.spec.categories)
        directions = torch.stack([self.probes[c] for c in names])
        bias = torch.tensor([self.spec.categories[c].bias for c in names])
        return pooled.float() @ directions.T + bias

    def fired(self, pooled: torch.Tensor) -> torch.Tensor:
        thresholds = torch.tensor([g.threshold for g in self.spec.categories.values()])
        return self.scores(pooled) > thresholds

    def record(self) -> dict[str, Any]:
        """Where the gate reads and what it measured on dev, as recipes store it."""
        questions = self.questions_any
        return {
            "detection_layer": self.spec.detection_layer,
            "pooling": self.spec.pooling,
            "harmful_dev_tpr": round(self.harmful_any, 4),
            "benign_dev_fpr_held_out": round(self.benign_any, 4),
            "questions_dev_fpr_held_out": None if questions is None else round(questions, 4),
        }


def fit_gate_from_activations(
    harmful_fit: Mapping[str, torch.Tensor],
    benign_fit: torch.Tensor,
    benign_dev: torch.Tensor,
    harmful_dev: Mapping[str, torch.Tensor],
    *,
    detection_layer: int,
    pooling: str,
    target_fpr: float = DEFAULT_TARGET_FPR,
    scope: str = "any",
    method: str = "lda",
    shrinkage: float = DEFAULT_SHRINKAGE,
    questions_dev: torch.Tensor | None = None,
    fit_folds: int = 0,
) -> FittedGate:
    """Fit a probe per category of `harmful_fit` and calibrate it on `benign_dev`.

    Every argument holds pooled detection-layer activations (`[prompts, hidden]`); the harmful
    ones per category. TPR is measured on each category's `harmful_dev` prompts (None where it
    has none), FPR on `benign_dev` leave-one-out (each prompt judged by thresholds calibrated
    on the others: on the calibration set itself it would be at most the target by design).

    `fit_folds > 0` calibrates on `benign_dev` plus `benign_fit` scored out of fold
    (`out_of_fold_scores`): a threshold at a 3 % FPR then rests on a dozen prompts instead of
    three. The held-out FPR is still measured on the `benign_dev` prompts alone.

    `questions_dev`, benign prompts of another format (benchmark questions), is a second
    calibration set: each threshold is the higher of the two sets' thresholds, so neither set
    fires above the target, and its held-out FPR is measured the same way.
    """
    probes = fit_probes(harmful_fit, benign_fit, method, shrinkage)
    names = list(probes)
    directions = torch.stack([probes[c][0] for c in names])
    bias = torch.tensor([probes[c][1] for c in names])

    def scores(pooled: torch.Tensor) -> torch.Tensor:
        return pooled.float() @ directions.T + bias

    benign_scores = scores(benign_dev)
    calibration = benign_scores
    if fit_folds > 0:
        folded = out_of_fold_scores(harmful_fit, benign_fit, fit_folds, method, shrinkage)
        calibration = torch.cat([folded, benign_scores])
    dev_rows = slice(calibration.shape[0] - benign_scores.shape[0], None)
    thresholds = calibrate_thresholds(calibration, target_fpr, scope)
    benign_fired = held_out_fired(calibration, target_fpr, scope, rows=dev_rows)
    questions_any: float | None = None
    if questions_dev is not None and questions_dev.shape[0] > 0:
        question_scores = scores(questions_dev)
        question_thresholds = calibrate_thresholds(question_scores, target_fpr, scope)
        question_fired = held_out_fired(question_scores, target_fpr, scope, floor=thresholds)
        questions_any = float(question_fired.any(dim=1).double().mean())
        benign_fired = held_out_fired(
            calibration, target_fpr, scope, floor=question_thresholds, rows=dev_rows
        )
        thresholds = torch.maximum(thresholds, question_thresholds)
    entries: dict[str, CategoryGate] = {}
    aucs: dict[str, float] = {}
    harmful_hits: list[torch.Tensor] = []
    for index, category in enumerate(names):
        dev = harmful_dev.get(category)
        tpr: float | None = None
        aucs[category] = math.nan
        if dev is not None and dev.shape[0] > 0:
            dev_scores = scores(dev)
            tpr = float((dev_scores[:, index] > thresholds[index]).double().mean())
            aucs[category] = auc(dev_scores[:, index], benign_scores[:, index])
            harmful_hits.append((dev_scores > thresholds).any(dim=1))
        entries[category] = CategoryGate(
            bias=float(bias[index]),
            threshold=float(thresholds[index]),
            target_fpr=target_fpr,
            tpr=tpr,
            fpr=float(benign_fired[:, index].double().mean()),
        )
    hits = torch.cat(harmful_hits) if harmful_hits else torch.zeros(0, dtype=torch.bool)
    return FittedGate(
        spec=GateSpec(detection_layer, pooling, entries),
        probes={c: probes[c][0] for c in names},
        auc=aucs,
        harmful_any=float(hits.double().mean()) if hits.numel() else math.nan,
        benign_any=float(benign_fired.any(dim=1).double().mean()),
        questions_any=questions_any,
    )


def fit_gate(
    model: Any,
    tokenizer: Any,
    harmful_by_category: Mapping[str, Sequence[str]],
    benign_fit: Sequence[str],
    benign_dev: Sequence[str],
    harmful_dev: Mapping[str, Sequence[str]],
    detection_layer: int,
    target_fpr: float = DEFAULT_TARGET_FPR,
    *,
    pooling: str = "mean",
    scope: str = "any",
    method: str = "lda",
    shrinkage: float = DEFAULT_SHRINKAGE,
    batch_size: int = 16,
    show_progress: bool = True,
) -> FittedGate:
    """Fit per-category probes at `detection_layer` on chat prompts and calibrate them.

    `harmful_by_category` and `benign_fit` fit the probes, `benign_dev` calibrates the
    thresholds to `target_fpr`, `harmful_dev` measures each probe's TPR.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; known: {', '.join(POOLINGS)}")

    def pooled(prompts: Sequence[str], desc: str) -> torch.Tensor:
        acts = prompt_activations(
            model,
            tokenizer,
            prompts,
            [detection_layer],
            batch_size=batch_size,
            show_progress=show_progress,
            desc=desc,
        )
        return acts[pooling][:, 0]

    return fit_gate_from_activations(
        {c: pooled(p, f"harmful fit {c}") for c, p in harmful_by_category.items()},
        pooled(benign_fit, "benign fit"),
        pooled(benign_dev, "benign dev"),
        {c: pooled(p, f"harmful dev {c}") for c, p in harmful_dev.items() if p},
        detection_layer=detection_layer,
        pooling=pooling,
        target_fpr=target_fpr,
        scope=scope,
        method=method,
        shrinkage=shrinkage,
    )


def with_gate(
    adapter: SafetyAdapter, gate: FittedGate, recipe: Mapping[str, Any] | None = None
) -> SafetyAdapter:
    """`adapter` with `gate`'s probes and calibration (replacing any gate it had).

    `recipe`, when given, is recorded as the adapter recipe's `gate` entry.

    Raises:
        AdapterFormatError: the gate does not fit the adapter (a category it lacks, a
            detection layer not before its steering layers, a probe of the wrong size).
    """
    meta = adapter.metadata
    new_recipe = dict(meta.recipe)
    if recipe is not None:
        new_recipe["gate"] = dict(recipe)
    metadata = replace(meta, gate=gate.spec, recipe=new_recipe)
    return replace(adapter, metadata=metadata, conditions=dict(gate.probes))


# ----- the real-model experiment ----------------------------------------------------------------
@dataclass(frozen=True)
class GateData:
    """Prompt texts of the splits a gate is fitted, calibrated and measured on."""

    harmful_fit: Mapping[str, Sequence[str]]
    harmful_dev: Mapping[str, Sequence[str]]
    benign_fit: Sequence[str]
    benign_dev: Sequence[str]
    edgy_dev: Sequence[bool]  # per benign dev prompt: edgy but safe?
    source: str


def load_gate_data() -> GateData:
    """The project's fixed fit/dev splits (`safesteer.adapters.splits`)."""

    def by_category(split: Split) -> dict[str, list[str]]:
        grouped: dict[str, list[str]] = {}
        for prompt in harmful_split(split):
            grouped.setdefault(prompt.category, []).append(prompt.prompt)
        return grouped

    benign_dev = benign_split("dev")
    return GateData(
        harmful_fit=by_category("fit"),
        harmful_dev=by_category("dev"),
        benign_fit=[p.prompt for p in benign_split("fit")],
        benign_dev=[p.prompt for p in benign_dev],
        edgy_dev=[p.edgy for p in benign_dev],
        source="safesteer.adapters.splits: fit / dev",
    )


def held_out_fired(
    benign_scores: torch.Tensor,
    target_fpr: float,
    scope: str,
    floor: torch.Tensor | None = None,
    rows: slice = slice(None),
) -> torch.Tensor:
    """`[prompts, categories]` fired for `rows` of `benign_scores`, each prompt judged by
    thresholds calibrated on all the others.

    The calibration set's own FPR is at most the target by construction; this leave-one-out
    rate is the honest estimate of the FPR on unseen benign prompts. `floor` (`[categories]`)
    raises the thresholds where another calibration set asks for higher ones.
    """
    indices = range(benign_scores.shape[0])[rows]
    fired = torch.zeros(len(indices), benign_scores.shape[1], dtype=torch.bool)
    for slot, index in enumerate(indices):
        others = torch.cat([benign_scores[:index], benign_scores[index + 1 :]])
        thresholds = calibrate_thresholds(others, target_fpr, scope)
        if floor is not None:
            thresholds = torch.maximum(thresholds, floor)
        fired[slot] = benign_scores[index] > thresholds
    return fired


def _percent(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.0f}"


TABLE_HEADER: tuple[str, ...] = ("category", "n dev", "AUC", "TPR", "FPR", "edgy", "xFPR", "xedgy")


def render(rows: Sequence[Sequence[str]]) -> str:
    """Rows as text columns: the first left-aligned, the others right-aligned."""
    return "\n".join(f"  {row[0]:<22}" + "".join(f"{cell:>7}" for cell in row[1:]) for row in rows)


def dev_rows(
    fitted: FittedGate,
    benign_dev: torch.Tensor,
    edgy: Sequence[bool],
    harmful_dev_counts: Mapping[str, int],
    scope: str,
) -> list[list[str]]:
    """Per category, then for the union: dev prompts, AUC, TPR, FPR, edgy FPR (in %).

    TPR on harmful dev; FPR on benign dev and its edgy part, in-sample (the thresholds were
    calibrated there) and held out (`x`: leave-one-out, the honest estimate).
    """
    target = next(iter(fitted.spec.categories.values())).target_fpr
    scores = fitted.scores(benign_dev)
    fired = fitted.fired(benign_dev)
    held_out = held_out_fired(scores, target, scope)
    edgy_rows = torch.tensor(list(edgy), dtype=torch.bool)

    def cells(tpr: float | None, hits: torch.Tensor, held: torch.Tensor) -> list[str]:
        shares = [tpr]
        for fired_rows in (hits, held):
            edgy_hits = fired_rows[edgy_rows]
            shares.append(float(fired_rows.double().mean()))
            shares.append(float(edgy_hits.double().mean()) if edgy_hits.numel() else math.nan)
        return [_percent(share) for share in shares]

    rows: list[list[str]] = []
    for index, (category, entry) in enumerate(fitted.spec.categories.items()):
        area = fitted.auc[category]
        rows.append(
            [
                category,
                str(harmful_dev_counts.get(category, 0)),
                "-" if math.isnan(area) else f"{area:.3f}",
                *cells(entry.tpr, fired[:, index], held_out[:, index]),
            ]
        )
    rows.append(
        [
            "any category",
            str(sum(harmful_dev_counts.values())),
            "",
            *cells(fitted.harmful_any, fired.any(dim=1), held_out.any(dim=1)),
        ]
    )
    return rows


def _csv(kind: str, known: Sequence[str] | None = None) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [v for v in values if known is not None and v not in known]
        if unknown or not values:
            allowed = f" among {', '.join(known)}" if known is not None else ""
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind}{allowed}")
        return values

    return parse


def _layers(text: str) -> list[int]:
    values = _csv("layers")(text)
    if not all(v.isdigit() for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers: {text!r}")
    return [int(v) for v in values]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m safesteer.adapters.gating",
        description=(
            "Fit per-category condition probes at candidate detection layers on the fit "
            "splits, calibrate their thresholds on benign dev, and print per category the "
            "AUC and TPR on harmful dev and the FPR on benign dev and its edgy part, "
            "in-sample and leave-one-out (x). Optionally write an adapter with the gate of "
            "one layer, pooling and method."
        ),
    )
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model to load")
    parser.add_argument(
        "--layers", type=_layers, default=[6, 8, 10], help="detection layers (default 6,8,10)"
    )
    parser.add_argument(
        "--pooling",
        type=_csv("poolings", POOLINGS),
        default=["mean", "last"],
        help="mean, last or both (default mean,last)",
    )
    parser.add_argument(
        "--method",
        type=_csv("methods", METHODS),
        default=["lda", "diffmean"],
        help="comma list of lda, diffmean, pooled-lda (default lda,diffmean)",
    )
    parser.add_argument("--shrinkage", type=float, default=DEFAULT_SHRINKAGE, help="for lda")
    parser.add_argument("--target-fpr", type=float, default=DEFAULT_TARGET_FPR)
    parser.add_argument(
        "--scope", choices=SCOPES, default="any", help="calibrate the union or each category"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--adapter", type=Path, help="adapter to add the gate to (with --out)")
    parser.add_argument("--out", type=Path, help="write --adapter with the gate here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (args.adapter is None) != (args.out is None):
        print("error: --adapter and --out go together", file=sys.stderr)
        return 2
    if args.out is not None and len(args.layers) * len(args.pooling) * len(args.method) != 1:
        print("error: --out needs one layer, one pooling and one method", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    data = load_gate_data()
    loaded = load_model(args.model)

    def acts(prompts: Sequence[str], desc: str) -> dict[str, torch.Tensor]:
        return prompt_activations(
            loaded.model,
            loaded.tokenizer,
            prompts,
            args.layers,
            batch_size=args.batch_size,
            show_progress=not args.no_progress,
            desc=desc,
        )

    harmful_fit = {c: acts(p, f"harmful fit {c}") for c, p in data.harmful_fit.items()}
    harmful_dev = {c: acts(p, f"harmful dev {c}") for c, p in data.harmful_dev.items() if p}
    benign_fit = acts(data.benign_fit, "benign fit")
    benign_dev = acts(data.benign_dev, "benign dev")
    # The project's own probe prompts: written apart from every data set, so a check of how
    # the gate carries over to prompts in another style.
    probe = load_probe_prompts()
    probe_harmful, probe_benign = acts(probe.harmful, "probe"), acts(probe.benign, "probe")
    counts = {c: len(p) for c, p in data.harmful_dev.items()}
    print(
        f"model {loaded.name}; data {data.source}; harmful fit "
        f"{sum(len(p) for p in data.harmful_fit.values())}, harmful dev {sum(counts.values())}, "
        f"benign fit {len(data.benign_fit)}, benign dev {len(data.benign_dev)} "
        f"(edgy {sum(data.edgy_dev)}); target FPR {args.target_fpr:g} ({args.scope}); in %",
        flush=True,
    )
    summary: list[list[str]] = []
    fitted: FittedGate | None = None
    for slot, layer in enumerate(args.layers):
        for pooling in args.pooling:
            for method in args.method:
                fitted = fit_gate_from_activations(
                    {c: a[pooling][:, slot] for c, a in harmful_fit.items()},
                    benign_fit[pooling][:, slot],
                    benign_dev[pooling][:, slot],
                    {c: a[pooling][:, slot] for c, a in harmful_dev.items()},
                    detection_layer=layer,
                    pooling=pooling,
                    target_fpr=args.target_fpr,
                    scope=args.scope,
                    method=method,
                    shrinkage=args.shrinkage,
                )
                rows = dev_rows(
                    fitted, benign_dev[pooling][:, slot], data.edgy_dev, counts, args.scope
                )
                label = f"layer {layer} {pooling} {method}"
                print(f"\n{label}\n{render([TABLE_HEADER, *rows])}", flush=True)
                fired_on = [
                    float(fitted.fired(a[pooling][:, slot]).any(dim=1).double().mean())
                    for a in (probe_harmful, probe_benign)
                ]
                summary.append([label, *rows[-1][1:], *map(_percent, fired_on)])
    header = ("gate", *TABLE_HEADER[1:], "probeH", "probeB")
    print(
        f"\nany category fires (probeH / probeB: the {len(probe.harmful)} harmful / "
        f"{len(probe.benign)} benign probe prompts)\n{render([header, *summary])}"
    )
    if args.out is not None and fitted is not None:
        recipe = {
            "method": args.method[0],
            "shrinkage": args.shrinkage if args.method[0] == "lda" else None,
            "data": data.source,
            "target_fpr": args.target_fpr,
            "scope": args.scope,
            "model": loaded.name,
            "dev_any_category": dict(zip(header[1:], summary[-1][1:], strict=True)),
        }
        gated = with_gate(SafetyAdapter.load(args.adapter), fitted, recipe)
        print(f"\nwrote {gated.save(args.out)} ({gated.id})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
