"""Data-aware layer selection (SafeGene-style): score steering layers by their effect on dev data.

Each candidate layer `l` is tried alone at a few scales `s`: every dev prompt is steered with
the category mix direction at `l` (the normalised mean of the categories' unit vectors there),
pushed by `s * typical_norm[l]` at every position. Three effects are measured against the
unsteered model:

- `refusal`: share of harmful dev prompts whose greedy answer the judge counts as a refusal;
- `over_refusal`: the same share on benign dev prompts;
- `kl`: mean KL(unsteered || steered) of the next-token distribution at the first answer
  position of the benign prompts (how much the push disturbs answers it should leave alone).

The cells are measured always-on, but a gated adapter steers only the prompts its gate fires
on. `Exposure` says which share of each kind is steered: everything always-on; under a gate,
its harmful dev TPR and its held-out benign dev FPR. A cell's *expected* gains are its measured
gains times the exposure: refusal gain x harmful share, over-refusal gain x benign share.

The rule (`SelectionRule`, `select_layers`): a (layer, scale) cell is *admissible* when its KL
is at most `max_kl` and its expected over-refusal gain at most `max_over_refusal_gain`. A cell's
score is its expected *selective* gain, refusal gain minus over-refusal gain: always-on, a push
that makes harmful prompts refuse but leaves benign ones alone works with the model's own sense
of harm; behind a gate, over-refusal matters only on the few benign prompts it lets through, so
the push that refuses most wins (the strength step still checks coherence). A layer scores its best
admissible cell (ties: the smaller KL, then the smaller scale); the `count` layers with the
highest positive scores are chosen (ties: the smaller KL), each with its best cell's scale as
its coefficient. `LayerChoice.prefixes` lists the best 1, 2, ..., `count` of them, so that a
later step (the build's strength search) can settle how many to steer at together.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm import tqdm

from safesteer.adapters.extract import chat_prompt_ids, generate_responses
from safesteer.adapters.hooks import SteeringHooks
from safesteer.adapters.judge import RefusalJudge
from safesteer.adapters.loading import LoadedModel
from safesteer.adapters.padding import left_pad


@dataclass(frozen=True)
class LayerScore:
    """What steering at one layer and scale did on the dev prompts (shares in [0, 1])."""

    layer: int
    scale: float
    refusal: float
    over_refusal: float
    kl: float
    baseline_refusal: float = 0.0
    baseline_over_refusal: float = 0.0

    @property
    def refusal_gain(self) -> float:
        return self.refusal - self.baseline_refusal

    @property
    def over_refusal_gain(self) -> float:
        return self.over_refusal - self.baseline_over_refusal

    @property
    def selective_gain(self) -> float:
        """Refusal gain minus over-refusal gain: the score of the cell."""
        return self.refusal_gain - self.over_refusal_gain

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> LayerScore:
        return cls(
            layer=int(raw["layer"]),
            scale=float(raw["scale"]),
            refusal=float(raw["refusal"]),
            over_refusal=float(raw["over_refusal"]),
            kl=float(raw["kl"]),
            baseline_refusal=float(raw.get("baseline_refusal", 0.0)),
            baseline_over_refusal=float(raw.get("baseline_over_refusal", 0.0)),
        )


@dataclass(frozen=True)
class Exposure:
    """Shares of harmful and benign prompts that steering reaches (1, 1: always-on)."""

    harmful: float = 1.0
    benign: float = 1.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.harmful <= 1.0 and 0.0 <= self.benign <= 1.0):
            raise ValueError("exposure shares must lie in [0, 1]")

    def refusal_gain(self, score: LayerScore) -> float:
        return self.harmful * score.refusal_gain

    def over_refusal_gain(self, score: LayerScore) -> float:
        return self.benign * score.over_refusal_gain

    def selective_gain(self, score: LayerScore) -> float:
        """Expected refusal gain minus expected over-refusal gain: the score of the cell."""
        return self.refusal_gain(score) - self.over_refusal_gain(score)


ALWAYS_ON = Exposure()


@dataclass(frozen=True)
class SelectionRule:
    """Budgets a (layer, scale) cell must keep, and how many layers to choose."""

    max_kl: float = 2.0
    max_over_refusal_gain: float = 0.75
    count: int = 2

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError("choose at least one layer")
        if self.max_kl <= 0 or not 0 <= self.max_over_refusal_gain <= 1:
            raise ValueError("max_kl must be positive and max_over_refusal_gain in [0, 1]")

    def admissible(self, score: LayerScore, exposure: Exposure = ALWAYS_ON) -> bool:
        over = exposure.over_refusal_gain(score)
        return score.kl <= self.max_kl and over <= self.max_over_refusal_gain

    def describe(self) -> str:
        return (
            f"a (layer, scale) cell is admissible when its benign next-token KL <= {self.max_kl:g} "
            f"and its expected benign over-refusal gain <= {self.max_over_refusal_gain:g}; a cell "
            "scores its expected harmful refusal gain minus its expected benign over-refusal gain "
            "(measured gains times the shares of harmful and benign prompts steering reaches: 1 "
            "always-on, the gate's harmful dev TPR and held-out benign dev FPR gated); a layer "
            "scores its best "
            "admissible cell (ties: smaller KL, then smaller scale); the "
            f"{self.count} best-scoring layers with a positive score are chosen (ties: smaller "
            "KL), each with its best cell's scale"
        )


@dataclass(frozen=True)
class LayerChoice:
    """The chosen layers, each with its scale (a fraction of the typical norm there)."""

    scales: Mapping[int, float]
    best: Mapping[int, LayerScore]  # every layer with an admissible cell -> that cell
    ranked: tuple[LayerScore, ...] = ()  # the chosen layers' best cells, best first

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.scales))

    def prefixes(self) -> list[dict[int, float]]:
        """The best layer, the best two, ..., all chosen ones: `{layer: scale}` each."""
        return [
            {cell.layer: cell.scale for cell in self.ranked[:size]}
            for size in range(1, len(self.ranked) + 1)
        ]


def select_layers(
    scores: Sequence[LayerScore], rule: SelectionRule, exposure: Exposure = ALWAYS_ON
) -> LayerChoice:
    """Apply `rule` to the measured cells under `exposure` (see the module docstring).

    Raises:
        ValueError: no layer has an admissible cell with a positive score.
    """
    gain = exposure.selective_gain
    by_layer: dict[int, list[LayerScore]] = {}
    for score in scores:
        if rule.admissible(score, exposure):
            by_layer.setdefault(score.layer, []).append(score)
    best = {
        layer: max(cells, key=lambda s: (gain(s), -s.kl, -s.scale))
        for layer, cells in by_layer.items()
    }
    ranked = sorted(
        (cell for cell in best.values() if gain(cell) > 0),
        key=lambda cell: (-gain(cell), cell.kl, cell.layer),
    )
    if not ranked:
        raise ValueError(
            "no candidate layer gains more refusals than over-refusals within the budgets "
            f"(KL <= {rule.max_kl:g}, over-refusal gain <= {rule.max_over_refusal_gain:g})"
        )
    chosen = tuple(ranked[: rule.count])
    return LayerChoice({cell.layer: cell.scale for cell in chosen}, best, chosen)


# ----- measuring -------------------------------------------------------------------------------
def mix_direction(vectors: torch.Tensor) -> torch.Tensor:
    """Unit vector along the mean of the categories' unit vectors (`vectors`: `[C, hidden]`).

    Raises:
        ValueError: a category vector is zero, or the unit vectors cancel out.
    """
    norms = vectors.norm(dim=-1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("a category vector is zero")
    mean = (vectors / norms).mean(dim=0)
    length = float(mean.norm())
    if length == 0.0:
        raise ValueError("the category directions cancel out")
    unit: torch.Tensor = mean / length
    return unit


@torch.inference_mode()
def first_token_logprobs(
    loaded: LoadedModel,
    prompts: Sequence[str],
    *,
    hooks: SteeringHooks | None = None,
    push: torch.Tensor | None = None,
    batch_size: int = 16,
) -> torch.Tensor:
    """`[prompts, vocab]` log-probabilities of the first answer token of each chat prompt.

    With `hooks` and `push` (`[len(hooks.layers), hidden]`), every row is steered by `push`.
    """
    tokenizer = loaded.tokenizer
    encoded = [chat_prompt_ids(tokenizer, prompt) for prompt in prompts]
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    rows: list[torch.Tensor] = []
    for start in range(0, len(encoded), batch_size):
        input_ids, mask = left_pad(encoded[start : start + batch_size], pad)
        table = None if push is None else push.expand(input_ids.shape[0], -1, -1).contiguous()
        context = hooks.steering(table) if hooks is not None else _nothing()
        with context:
            logits = loaded.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=False,
                logits_to_keep=1,
            ).logits[:, -1]
        rows.append(torch.log_softmax(logits.float(), dim=-1))
    return torch.cat(rows)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def mean_kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over rows of KL(reference || other), both `[rows, vocab]` log-probabilities."""
    return float((reference.exp() * (reference - other)).sum(dim=-1).mean())


def _share(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else math.nan


def score_layers(
    loaded: LoadedModel,
    vectors: torch.Tensor,
    typical_norms: torch.Tensor,
    candidates: Sequence[int],
    scales: Sequence[float],
    harmful: Sequence[str],
    benign: Sequence[str],
    judge: RefusalJudge,
    *,
    max_new_tokens: int = 20,
    batch_size: int = 32,
    show_progress: bool = True,
) -> list[LayerScore]:
    """Measure every (candidate layer, scale) cell on the dev prompts.

    `vectors` is `[categories, layers, hidden]` (layers from 0), `typical_norms` `[layers]`.
    Answers are greedy, `max_new_tokens` long: the judge reads only their opening.
    """
    layers = list(candidates)
    hooks = SteeringHooks(loaded.model, loaded.family.num_layers, layers)
    prompts = [*harmful, *benign]
    split = len(harmful)
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "show_progress": False,
    }
    try:
        plain = generate_responses(loaded.model, loaded.tokenizer, prompts, **options)
        refused = judge.judge(prompts, plain)
        base_refusal, base_over = _share(refused[:split]), _share(refused[split:])
        reference = first_token_logprobs(loaded, benign, batch_size=batch_size)
        cells = [(layer, scale) for layer in layers for scale in scales]
        scores: list[LayerScore] = []
        for layer, scale in tqdm(cells, desc="layer scores", disable=not show_progress):
            push = torch.zeros(len(layers), vectors.shape[-1])
            slot = layers.index(layer)
            push[slot] = mix_direction(vectors[:, layer]) * scale * float(typical_norms[layer])

            @contextmanager
            def steering(batch: Sequence[str], push: torch.Tensor = push) -> Iterator[None]:
                with hooks.steering(push.expand(len(batch), -1, -1).contiguous()):
                    yield

            answers = generate_responses(
                loaded.model, loaded.tokenizer, prompts, steering=steering, **options
            )
            verdicts = judge.judge(prompts, answers)
            steered = first_token_logprobs(
                loaded, benign, hooks=hooks, push=push, batch_size=batch_size
            )
            scores.append(
                LayerScore(
                    layer=layer,
                    scale=scale,
                    refusal=_share(verdicts[:split]),
                    over_refusal=_share(verdicts[split:]),
                    kl=mean_kl(reference, steered),
                    baseline_refusal=base_refusal,
                    baseline_over_refusal=base_over,
                )
            )
    finally:
        hooks.remove()
    return scores
