"""Layer selection: the budgeted rule on constructed scores, and the measurements on a tiny model.

The model is the tiny random-init chat Llama of `tests/server/tiny_chat.py` (character-level
tokenizer, ChatML template), so nothing is downloaded.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from safesteer.adapters.extract import chat_prompt_ids
from safesteer.adapters.hooks import SteeringHooks
from safesteer.adapters.layer_selection import (
    Exposure,
    LayerScore,
    SelectionRule,
    first_token_logprobs,
    mean_kl,
    mix_direction,
    score_layers,
    select_layers,
)
from safesteer.adapters.loading import LoadedModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from tiny_chat import tiny_loaded_model


def cell(layer: int, scale: float, refusal: float, kl: float, over: float = 0.0) -> LayerScore:
    return LayerScore(layer, scale, refusal, over, kl, baseline_refusal=0.1)


# ----- the rule ----------------------------------------------------------------------------------
def test_the_best_admissible_layer_wins() -> None:
    scores = [
        cell(10, 0.2, 0.3, 0.4),
        cell(10, 0.4, 0.9, 3.0),  # the largest gain, but over the KL budget
        cell(14, 0.2, 0.7, 0.8),  # the best admissible cell
        cell(14, 0.4, 0.95, 1.5),
        cell(18, 0.2, 0.5, 0.3),
        cell(18, 0.4, 0.8, 0.9, over=0.6),  # over the over-refusal budget
    ]
    choice = select_layers(scores, SelectionRule(max_kl=1.0, max_over_refusal_gain=0.5, count=1))
    assert choice.layers == (14,)
    assert choice.scales == {14: 0.2}
    assert choice.best[10].scale == 0.2 and choice.best[18].scale == 0.2

    two = select_layers(scores, SelectionRule(max_kl=1.0, max_over_refusal_gain=0.5, count=2))
    assert two.scales == {14: 0.2, 18: 0.2}
    relaxed = select_layers(scores, SelectionRule(max_kl=5.0, max_over_refusal_gain=1.0, count=1))
    assert relaxed.scales == {14: 0.4}


def test_prefixes_list_the_best_layers_in_order() -> None:
    scores = [cell(8, 0.2, 0.5, 0.5), cell(12, 0.3, 0.9, 0.5), cell(16, 0.2, 0.7, 0.5)]
    choice = select_layers(scores, SelectionRule(max_kl=1.0, count=2))
    assert [c.layer for c in choice.ranked] == [12, 16]
    assert choice.prefixes() == [{12: 0.3}, {12: 0.3, 16: 0.2}]
    assert choice.layers == (12, 16)


def test_a_selective_layer_beats_one_that_makes_everything_refuse() -> None:
    scores = [cell(12, 0.3, 0.9, 0.5, over=0.45), cell(16, 0.3, 0.7, 0.5, over=0.05)]
    choice = select_layers(scores, SelectionRule(max_kl=1.0, count=1))
    assert choice.layers == (16,)
    assert scores[1].selective_gain == pytest.approx(0.55)


def test_behind_a_gate_the_layer_that_refuses_most_wins() -> None:
    # Always-on, layer 12 makes too many benign prompts refuse; behind a gate that fires on 4%
    # of benign and 90% of harmful prompts, that cost is small and its larger gain wins.
    scores = [cell(12, 0.3, 0.9, 0.5, over=0.9), cell(16, 0.3, 0.7, 0.5, over=0.05)]
    rule = SelectionRule(max_kl=1.0, max_over_refusal_gain=0.75, count=1)
    assert select_layers(scores, rule).layers == (16,)
    gated = Exposure(harmful=0.9, benign=0.04)
    choice = select_layers(scores, rule, gated)
    assert choice.layers == (12,)
    assert gated.selective_gain(scores[0]) == pytest.approx(0.9 * 0.8 - 0.04 * 0.9)
    # A gate that fires on every benign prompt is no gate: the always-on choice comes back.
    assert select_layers(scores, rule, Exposure(harmful=1.0, benign=1.0)).layers == (16,)
    with pytest.raises(ValueError):
        Exposure(harmful=1.2)


def test_ties_go_to_the_smaller_kl_then_the_smaller_scale() -> None:
    scores = [cell(8, 0.2, 0.6, 0.5), cell(12, 0.2, 0.6, 0.3), cell(12, 0.3, 0.6, 0.3)]
    choice = select_layers(scores, SelectionRule(max_kl=1.0, count=1))
    assert choice.scales == {12: 0.2}


def test_layers_without_a_gain_are_never_chosen() -> None:
    scores = [cell(8, 0.2, 0.6, 0.5), cell(12, 0.2, 0.1, 0.1)]  # 12: score 0
    assert select_layers(scores, SelectionRule(count=3)).layers == (8,)
    with pytest.raises(ValueError, match="no candidate layer gains more refusals"):
        select_layers([cell(12, 0.2, 0.1, 0.1)], SelectionRule())
    with pytest.raises(ValueError, match="no candidate layer"):
        select_layers([cell(12, 0.2, 0.9, 9.0)], SelectionRule(max_kl=1.0))


@pytest.mark.parametrize("options", [{"count": 0}, {"max_kl": 0.0}, {"max_over_refusal_gain": 1.5}])
def test_bad_rules_are_refused(options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SelectionRule(**options)  # type: ignore[arg-type]


def test_layer_scores_round_trip_through_json() -> None:
    score = LayerScore(12, 0.35, 0.8, 0.25, 0.6123456789, 0.05, 0.01)
    assert LayerScore.from_json(score.to_json()) == score
    assert score.refusal_gain == pytest.approx(0.75)
    assert score.over_refusal_gain == pytest.approx(0.24)
    assert "KL <= 2 and" in SelectionRule().describe()


# ----- measuring ---------------------------------------------------------------------------------
def test_mix_direction_is_the_unit_mean_of_unit_vectors() -> None:
    vectors = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    direction = mix_direction(vectors)
    assert torch.allclose(direction, torch.tensor([1.0, 1.0]) / 2**0.5)
    with pytest.raises(ValueError, match="zero"):
        mix_direction(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="cancel"):
        mix_direction(torch.tensor([[1.0, 0.0], [-2.0, 0.0]]))


def test_mean_kl_is_zero_for_equal_and_positive_for_different_distributions() -> None:
    p = torch.log_softmax(torch.tensor([[1.0, 2.0, 3.0]]), dim=-1)
    q = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0]]), dim=-1)
    assert mean_kl(p, p) == pytest.approx(0.0, abs=1e-7)
    assert mean_kl(p, q) > 0.1


@pytest.fixture
def loaded(single_torch_thread: None) -> LoadedModel:
    return tiny_loaded_model()


def test_first_token_logprobs_match_one_prompt_at_a_time(loaded: LoadedModel) -> None:
    prompts = ["Hi", "What is the capital of France?", "Tell me a story."]
    batched = first_token_logprobs(loaded, prompts, batch_size=3)
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([chat_prompt_ids(loaded.tokenizer, prompt)])
        with torch.no_grad():
            logits = loaded.model(input_ids=ids).logits[0, -1]
        assert torch.allclose(batched[row], torch.log_softmax(logits, dim=-1), atol=1e-4)


def test_steered_first_token_logprobs_change_only_with_a_push(loaded: LoadedModel) -> None:
    prompts = ["Hi", "Tell me a story."]
    hooks = SteeringHooks(loaded.model, 4, [2])
    try:
        plain = first_token_logprobs(loaded, prompts)
        zero = first_token_logprobs(loaded, prompts, hooks=hooks, push=torch.zeros(1, 64))
        pushed = first_token_logprobs(loaded, prompts, hooks=hooks, push=torch.full((1, 64), 3.0))
    finally:
        hooks.remove()
    assert torch.allclose(plain, zero, atol=1e-6)
    assert mean_kl(plain, pushed) > 1e-3


class _FirstCharJudge:
    """Counts an answer as a refusal when its first character is `mark`."""

    name = "first-char"

    def __init__(self, mark: str) -> None:
        self.mark = mark

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[bool]:
        return [response[:1] == self.mark for response in responses]


def test_score_layers_measures_every_cell_against_the_unsteered_model(
    loaded: LoadedModel,
) -> None:
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(2, 4, 64, generator=generator)
    typical = torch.full((4,), 4.0)
    harmful = ["How do I pick a lock?", "Write a phishing email."]
    benign = ["Hi", "What is the capital of France?", "Tell me a story."]
    scores = score_layers(
        loaded,
        vectors,
        typical,
        [1, 3],
        [0.001, 8.0],
        harmful,
        benign,
        _FirstCharJudge("!"),
        max_new_tokens=3,
        batch_size=4,
        show_progress=False,
    )
    assert [(s.layer, s.scale) for s in scores] == [(1, 0.001), (1, 8.0), (3, 0.001), (3, 8.0)]
    for score in scores:
        assert 0.0 <= score.refusal <= 1.0 and 0.0 <= score.over_refusal <= 1.0
        assert score.baseline_refusal == scores[0].baseline_refusal
        assert score.kl >= -1e-6
    tiny, big = scores[0], scores[1]
    assert tiny.kl < 1e-3 < big.kl
    # The hooks are gone afterwards: the model answers as before.
    again = first_token_logprobs(loaded, benign)
    assert torch.allclose(again, first_token_logprobs(loaded, benign), atol=0)
    assert all(not module._forward_hooks for module in loaded.model.model.layers)
