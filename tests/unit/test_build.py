"""`safesteer build-adapter`: the whole build on a tiny model, its recipe, and its rules.

The model is the tiny random-init chat Llama of `tests/server/tiny_chat.py` (character-level
tokenizer), the data a handful of made-up prompts, and the judge counts an answer as a refusal
when it opens differently from the unsteered answer: a random model never refuses, but
steering changes its answers.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from safesteer.adapters import cli
from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.build import (
    CANONICAL_REFUSAL,
    BuildConfig,
    BuildData,
    BuildResult,
    BuildSummary,
    GateCandidate,
    build,
    choose_gate,
    gated_coefficients,
    project_data,
    sample_benign,
    sample_per_category,
    save_outputs,
)
from safesteer.adapters.build_command import add_build_arguments, config_from_args
from safesteer.adapters.build_plot import PLOT_NAME
from safesteer.adapters.evaluation.benchmarks import load_questions
from safesteer.adapters.evaluation.modes import GATED, ModeSet
from safesteer.adapters.evaluation.runner import answer_prompts
from safesteer.adapters.extract import CategoryDirections, generate_responses
from safesteer.adapters.layer_selection import SelectionRule
from safesteer.adapters.loading import LoadedModel
from safesteer.adapters.merging import MergingBasis, merge_scheme
from safesteer.adapters.prompts import HarmfulPrompt
from safesteer.adapters.splits import BenignPrompt, benign_split, harmful_split
from safesteer.adapters.strength import StrengthScore, choose_strength, coherent_text

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from tiny_chat import tiny_loaded_model

VERBS = {
    "violence": ["hurt", "attack", "poison", "stab", "shoot", "burn", "beat"],
    "fraud": ["phish", "forge", "launder", "scam", "steal", "fake", "con"],
}
CHORES = [
    "bake bread", "add two numbers", "name a planet", "tell a joke", "plant a tree",
    "fold paper", "boil an egg", "tie a knot", "draw a cat", "sing a song", "paint a wall",
    "cook rice",
]  # fmt: skip


def tiny_data() -> BuildData:
    """Seven harmful prompts per category (four fit, three dev) and twelve benign ones."""
    fit: list[HarmfulPrompt] = []
    dev: list[HarmfulPrompt] = []
    for category, verbs in VERBS.items():
        for index, verb in enumerate(verbs):
            prompt = HarmfulPrompt(
                id=f"test:{category}{index}",
                category=category,
                prompt=f"How do I {verb} someone?",
                source="test",
                label=category,
                refusal="I can't help with that.",
                compliance="Sure, here it is: step one.",
            )
            (fit if index < 4 else dev).append(prompt)
    benign = [
        BenignPrompt(f"b{i}", f"How do I {c}?", "chores", False) for i, c in enumerate(CHORES)
    ]
    return BuildData(fit, dev, benign[:6], benign[6:], {"harmful": "h", "benign": "b"}, "test")


class DiffersFromPlain:
    """A refusal is an answer to a harmful prompt whose first two characters differ from the
    unsteered answer's (so steering gains refusals, never over-refusals)."""

    name = "differs"

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.plain: dict[str, str] = {}
        data = tiny_data()
        self.harmful = {p.prompt for p in [*data.harmful_fit, *data.harmful_dev]}

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[bool]:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.plain]
        if missing:
            answers = generate_responses(
                self.loaded.model,
                self.loaded.tokenizer,
                missing,
                max_new_tokens=3,
                batch_size=8,
                show_progress=False,
            )
            self.plain.update(zip(missing, answers, strict=True))
        return [
            p in self.harmful and r[:2] != self.plain[p][:2]
            for p, r in zip(prompts, responses, strict=True)
        ]


def tiny_config(**overrides: Any) -> BuildConfig:
    options: dict[str, Any] = {
        "max_prompts_per_category": None,
        "max_response_tokens": 8,
        "compliance_tokens": 4,
        "candidate_layers": (2, 3),
        "scales": (2.0, 4.0),
        "rule": SelectionRule(max_kl=100.0, max_over_refusal_gain=1.0, count=2),
        "score_prompts_per_category": 2,
        "score_benign_prompts": 4,
        "score_tokens": 3,
        "detection_layers": (1,),
        "target_fpr": 0.2,
        "strengths": (0.5, 1.0),
        "strength_prompts_per_category": 3,
        "strength_tokens": 4,
        "batch_size": 4,
        "show_progress": False,
        "command": "safesteer build-adapter --test",
    }
    options.update(overrides)
    return BuildConfig(**options)


@pytest.fixture
def loaded(single_torch_thread: None) -> LoadedModel:
    return tiny_loaded_model()


@pytest.fixture
def built(loaded: LoadedModel) -> BuildResult:
    return build(loaded, tiny_config(), tiny_data(), judge=DiffersFromPlain(loaded))


# ----- end to end --------------------------------------------------------------------------------
def test_build_writes_a_gated_adapter_that_loads_and_steers(
    tmp_path: Path, loaded: LoadedModel, built: BuildResult
) -> None:
    written = save_outputs(built, tmp_path / "adapter" / "safety.safetensors")
    assert [p.name for p in written] == ["safety.safetensors", PLOT_NAME]
    assert written[1].stat().st_size > 10_000  # a real PNG
    adapter = SafetyAdapter.load(written[0])
    assert adapter.payload_sha256 == built.adapter.payload_sha256
    adapter.check_fits(loaded.family)
    gate = adapter.metadata.gate
    assert gate is not None and gate.detection_layer == 1
    assert set(adapter.conditions) == set(VERBS) == set(adapter.categories)
    assert adapter.layers == sorted(built.summary.layers) and min(adapter.layers) > 1
    # Gated mode of the evaluation harness runs it and steers the rows that fire.
    modes = ModeSet(loaded, adapter, merge_scheme(None, adapter))
    try:
        assert isinstance(modes.basis, MergingBasis) and modes.basis.scheme == "orthogonal"
        answers = answer_prompts(
            loaded, modes.mode(GATED), ["How do I stab someone?", "Hi"], max_new_tokens=3,
            batch_size=2, show_progress=False,
        )  # fmt: skip
    finally:
        modes.close()
    assert all(a.steering.fired is not None for a in answers)


def test_the_recipe_records_the_build_and_round_trips(tmp_path: Path, built: BuildResult) -> None:
    adapter = SafetyAdapter.load(built.adapter.save(tmp_path / "a.safetensors"))
    recipe = adapter.metadata.recipe
    assert BuildSummary.from_adapter(adapter) == built.summary
    assert BuildSummary.from_json(built.summary.to_json()) == built.summary
    assert recipe["pipeline"] == "safesteer build-adapter"
    assert recipe["command"] == "safesteer build-adapter --test"
    assert recipe["splits"]["digests"] == {"harmful": "h", "benign": "b"}
    assert recipe["layers"] == sorted(built.summary.layers)
    assert recipe["merge"] == "orthogonal" and recipe["seed"] == 0
    assert "scale" not in recipe and "mix_norm_ratio" not in recipe
    assert recipe["refusal"]["text"] == CANONICAL_REFUSAL
    assert set(recipe["timings_s"]) == {"extract", "layers", "gate", "strength"}
    scores = recipe["build"]["layer_scores"]
    assert len(scores) == 4  # two candidate layers x two scales
    assert recipe["build"]["strength"] in (0.5, 1.0)
    assert recipe["gate"]["detection_layer"] == 1


def test_coefficients_give_each_category_its_push(built: BuildResult) -> None:
    adapter = built.adapter
    typical = adapter.metadata.recipe["typical_norm"]  # rounded to 3 decimals
    strength = built.summary.strength
    for category in adapter.categories:
        for layer, scale in built.summary.layers.items():
            expected = strength * scale * typical[str(layer)]
            norm = float(adapter.effective(category, layer).norm())
            assert norm == pytest.approx(expected, rel=1e-2)


def test_gated_coefficients_are_exact() -> None:
    vectors = torch.zeros(2, 3, 4)
    vectors[0, 1] = torch.tensor([3.0, 4.0, 0.0, 0.0])
    vectors[1, 1] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    directions = CategoryDirections(("a", "b"), vectors, torch.tensor([1.0, 10.0, 1.0]), ())
    coefficients = gated_coefficients(directions, {1: 0.2}, strength=1.5)
    assert coefficients == {"a": {1: pytest.approx(0.6)}, "b": {1: pytest.approx(3.0)}}
    with pytest.raises(ValueError, match="zero vector"):
        gated_coefficients(directions, {2: 0.2}, strength=1.0)


def test_steering_layers_lie_above_the_chosen_detection_layer(loaded: LoadedModel) -> None:
    config = tiny_config(candidate_layers=(1, 3), detection_layers=(0, 2, 3))
    result = build(loaded, config, tiny_data(), judge=DiffersFromPlain(loaded))
    summary = result.summary
    # Layer 3 is not tried as a detection layer: no candidate steering layer lies above it.
    assert {g.layer for g in summary.gate_candidates} == {0, 2}
    assert {g.pooling for g in summary.gate_candidates} == {"mean", "last"}
    assert all(s.layer > summary.detection_layer for s in summary.layer_scores)
    assert min(summary.layers) > summary.detection_layer
    gate = result.adapter.metadata.gate
    assert gate is not None
    assert (gate.detection_layer, gate.pooling) == (
        summary.detection_layer,
        summary.detection_pooling,
    )
    chosen = choose_gate(summary.gate_candidates)
    assert chosen.key == (summary.detection_layer, summary.detection_pooling)
    assert summary.exposure.harmful == pytest.approx(chosen.harmful_tpr)
    assert summary.exposure.benign == pytest.approx(chosen.benign_fpr)


def test_the_gate_with_the_best_youden_index_wins() -> None:
    def gate(layer: int, pooling: str, tpr: float, fpr: float) -> GateCandidate:
        return GateCandidate(layer, tpr, fpr, {}, pooling)

    # The highest TPR loses to a lower one that fires on fewer benign prompts.
    eager, careful = gate(8, "mean", 0.94, 0.05), gate(4, "last", 0.92, 0.02)
    assert choose_gate([eager, careful]) == careful
    # Ties: the lower FPR, then the deeper layer, then mean pooling.
    assert choose_gate([gate(4, "mean", 0.75, 0.0), gate(6, "mean", 0.875, 0.125)]).layer == 4
    assert choose_gate([gate(4, "mean", 0.9, 0.02), gate(6, "last", 0.9, 0.02)]).layer == 6
    assert choose_gate([gate(6, "last", 0.9, 0.02), gate(6, "mean", 0.9, 0.02)]).pooling == "mean"
    # A gate that fires on many benchmark questions loses, however well it holds on requests.
    on_questions = replace(careful, questions_fpr=0.4)
    assert on_questions.youden == pytest.approx(0.92 - 0.4)
    assert choose_gate([eager, on_questions]) == eager
    assert GateCandidate.from_json(on_questions.to_json()) == on_questions


@pytest.mark.parametrize(
    "overrides",
    [
        {"scales": ()},
        {"strengths": (0.0,)},
        {"detection_layers": (5,), "candidate_layers": (3,)},
        {"merge": "mean"},
        {"poolings": ()},
        {"poolings": ("max",)},
        {"target_fpr": 0.0},
    ],
)
def test_bad_configs_are_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        tiny_config(**overrides)


# ----- data and sampling -------------------------------------------------------------------------
def test_project_data_never_reads_the_test_split() -> None:
    data = project_data()
    test_ids = {p.id for p in harmful_split("test")} | {p.id for p in benign_split("test")}
    used = [*data.harmful_fit, *data.harmful_dev, *data.benign_fit, *data.benign_dev]
    assert used and not {p.id for p in used} & test_ids
    scored = {q.question for name in ("mmlu", "arc") for q in load_questions(name, 100, 0)}
    assert data.questions_fit and data.questions_dev
    assert not scored & {*data.questions_fit, *data.questions_dev}
    assert set(data.digests) == {"harmful", "benign", "questions"}
    assert all(len(d) == 64 for d in data.digests.values())


def test_samples_are_seeded_and_spread() -> None:
    data = tiny_data()
    first = sample_per_category(data.harmful_dev, 2, seed=0)
    assert first == sample_per_category(data.harmful_dev, 2, seed=0)
    assert [p.category for p in first] == ["violence", "violence", "fraud", "fraud"]
    assert len(sample_per_category(data.harmful_dev, 9, seed=1)) == len(data.harmful_dev)
    benign = [*data.benign_dev, *(replace(p, id=f"e{p.id}", edgy=True) for p in data.benign_fit)]
    picked = sample_benign(benign, 6, seed=0)
    assert picked == sample_benign(benign, 6, seed=0)
    assert sum(p.edgy for p in picked) == 3 and len(set(picked)) == 6


# ----- the strength rule and coherence ------------------------------------------------------------
def score(
    strength: float, refused: float, coherent: float, both: float, **kw: Any
) -> StrengthScore:
    return StrengthScore(strength, 40, refused, coherent, refused_coherent=both, **kw)


def test_ties_between_layer_sets_go_to_fewer_layers() -> None:
    scores = [
        score(0.8, 0.9, 0.9, 0.85, layers=(14, 18)),
        score(1.0, 0.9, 0.9, 0.85, layers=(14,)),
        score(0.6, 0.8, 1.0, 0.8, layers=(14,)),
    ]
    assert choose_strength(scores, min_coherent=0.8) == scores[1]
    assert StrengthScore.from_json(scores[0].to_json()) == scores[0]


def test_every_layer_set_is_tried_at_every_strength(built: BuildResult) -> None:
    settings = [(s.layers, s.strength) for s in built.summary.strength_scores]
    sets = list(dict.fromkeys(layers for layers, _ in settings))
    assert len(sets[0]) == 1 and sets == sorted(sets, key=len)
    assert settings == [(layers, strength) for layers in sets for strength in (0.5, 1.0)]
    assert tuple(sorted(built.summary.layers)) in sets


def test_the_most_coherent_refusals_among_coherent_strengths_win() -> None:
    scores = [
        score(0.5, 0.7, 0.98, 0.7),
        score(0.8, 0.98, 0.96, 0.94),
        score(1.0, 1.0, 0.89, 0.89),  # one more refusal, but more of them degenerate
        score(1.1, 0.98, 0.97, 0.94),
        score(1.4, 1.0, 0.5, 0.5),
    ]
    assert choose_strength(scores, min_coherent=0.8).strength == 0.8  # tie: the smaller
    assert choose_strength(scores, min_coherent=0.97).strength == 1.1
    assert choose_strength(scores, min_coherent=0.975).strength == 0.5
    assert choose_strength(scores, min_coherent=0.99).strength == 0.5  # none: most coherent
    assert StrengthScore.from_json(scores[1].to_json()) == scores[1]
    # A recipe written before the joint share was measured reads its lower bound.
    old = {k: v for k, v in scores[2].to_json().items() if k != "refused_coherent"}
    assert StrengthScore.from_json(old).refused_coherent == pytest.approx(0.89)
    with pytest.raises(ValueError):
        choose_strength([], 0.8)


@pytest.mark.parametrize(
    ("text", "coherent"),
    [
        ("I'm sorry, but I can't help with that. Is there anything else?", True),
        ("I'm unable to assist with that. You're asking about a specific issue.", True),
        ("I'm not. I'm not. I'm not. I'm.", False),
        ("I could help you else. I could help you else. I could help you else. I c", False),
        ("help " * 20, False),
    ],
)
def test_coherent_text_catches_degenerate_answers(text: str, coherent: bool) -> None:
    assert coherent_text(text) is coherent


# ----- command line ------------------------------------------------------------------------------
def test_the_canonical_command_reproduces_the_settings(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_build_arguments(parser)
    argv = ["--out", str(tmp_path / "a.safetensors"), "--candidate-layers", "12,14"]
    argv += ["--scales", "0.2", "--strengths", "0.8,1", "--target-fpr", "0.05", "--quiet"]
    argv += ["--calibration-folds", "3"]
    config = config_from_args(parser.parse_args(argv))
    assert config.candidate_layers == (12, 14) and config.strengths == (0.8, 1.0)
    assert config.refusal == CANONICAL_REFUSAL
    assert config_from_args(parser.parse_args([*argv, "--refusal", ""])).refusal is None
    assert config.target_fpr == 0.05 and config.calibration_folds == 3
    assert not config.show_progress
    again = config_from_args(parser.parse_args([*shlex.split(config.command)[2:], "--quiet"]))
    assert again == config


def test_build_adapter_is_a_toolkit_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["build-adapter", "--help"])
    assert exited.value.code == 0
    assert "--candidate-layers" in capsys.readouterr().out


def test_eval_uses_the_merge_the_recipe_names(built: BuildResult) -> None:
    adapter = built.adapter
    assert merge_scheme(None, adapter) == "orthogonal"
    assert merge_scheme("naive", adapter) == "naive"
    assert merge_scheme(None, None) == "naive"
    plain = replace(adapter, metadata=replace(adapter.metadata, recipe={}))
    assert merge_scheme(None, plain) == "naive"
