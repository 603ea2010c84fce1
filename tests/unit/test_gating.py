"""Gated steering: probes, calibration, gate metadata, and per-row gating inside one forward."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest
import torch
from torch import nn
from transformers import PreTrainedModel

from safesteer.adapters.adapter import CategoryGate, GateSpec, SafetyAdapter
from safesteer.adapters.errors import AdapterFormatError, AdapterMismatch
from safesteer.adapters.family import ModelFamily
from safesteer.adapters.gating import (
    POOLED_SHARE,
    TABLE_HEADER,
    FittedGate,
    PromptGate,
    auc,
    calibrate_thresholds,
    dev_rows,
    fit_gate,
    fit_gate_from_activations,
    fit_probe,
    fit_probes,
    held_out_fired,
    main,
    out_of_fold_scores,
    pool,
    prompt_activations,
    render,
    with_gate,
)
from safesteer.adapters.hooks import SteeringHooks
from safesteer.adapters.layers import decoder_layers
from safesteer.adapters.padding import left_pad
from safesteer.adapters.table import SteeringBasis

if TYPE_CHECKING:
    from conftest import AdapterFactory

FAMILY = ModelFamily("llama", 64, 4)
HIDDEN = FAMILY.hidden_size
NUM_LAYERS = 4
STEERING_LAYERS = (1, 2)
DETECTION_LAYER = 0
BUILT_IN = Path(__file__).resolve().parents[2] / "adapters" / "smollm2-135m" / "safety.safetensors"


def _unit(index: int) -> torch.Tensor:
    vector = torch.zeros(HIDDEN)
    vector[index] = 1.0
    return vector


def _gate(
    probes: dict[str, torch.Tensor],
    *,
    bias: float = 0.0,
    threshold: float = 0.5,
    layer: int = DETECTION_LAYER,
    pooling: str = "last",
) -> FittedGate:
    entries = {c: CategoryGate(bias, threshold, 0.02, tpr=0.9, fpr=0.01) for c in probes}
    return FittedGate(GateSpec(layer, pooling, entries), probes, {}, math.nan, math.nan)


@pytest.fixture
def adapter(random_adapter: AdapterFactory) -> SafetyAdapter:
    return random_adapter(FAMILY, layers=STEERING_LAYERS, norm=2.0)


@pytest.fixture
def gated_adapter(adapter: SafetyAdapter) -> SafetyAdapter:
    return with_gate(adapter, _gate({"violence": _unit(0), "fraud": _unit(1)}))


# ----- pooling and probe scores -------------------------------------------------------------------


def test_pool_reads_positions_from_the_mask() -> None:
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1]])
    right = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])

    assert torch.equal(pool(hidden, left, "last"), hidden[:, 3])
    assert torch.equal(pool(hidden, right, "last"), torch.stack([hidden[0, 2], hidden[1, 0]]))
    # `mean` leaves out the first attended position (the attention sink) unless it is alone.
    assert torch.equal(pool(hidden, left, "mean")[0], hidden[0, 2:].mean(0))
    assert torch.equal(pool(hidden, left, "mean")[1], hidden[1, 3])
    assert torch.equal(pool(hidden, right, "mean")[0], hidden[0, 1:3].mean(0))
    with pytest.raises(ValueError, match="pooling"):
        pool(hidden, left, "max")
    with pytest.raises(ValueError, match="mask"):
        pool(hidden, left[:, :3], "last")


def test_probe_fires_only_where_the_projection_exceeds_the_threshold(
    gated_adapter: SafetyAdapter,
) -> None:
    gate = PromptGate.from_adapter(gated_adapter)
    # Last positions project onto violence (unit 0) and fraud (unit 1) as listed.
    projections = [(0.9, 0.1), (0.2, 0.7), (0.51, 0.49), (-3.0, 0.5)]
    hidden = torch.randn(4, 3, HIDDEN, generator=torch.Generator().manual_seed(0))
    hidden[:, -1, :2] = torch.tensor(projections)
    mask = torch.ones(4, 3, dtype=torch.long)

    scores = gate.scores(hidden, mask)
    fired = gate.fired(hidden, mask)

    assert gate.categories == ("violence", "fraud", "drugs")
    torch.testing.assert_close(scores[:, :2], torch.tensor(projections))
    assert torch.equal(scores[:, 2], torch.full((4,), -math.inf))  # drugs: no probe
    expected = [[True, False, False], [False, True, False], [True, False, False]]
    assert fired.tolist() == [*expected, [False, False, False]]
    assert gate.names(fired) == [["violence"], ["fraud"], ["violence"], []]
    assert gate.gated.tolist() == [True, True, False]


def test_decide_weights_are_forced_plus_gated_where_fired(gated_adapter: SafetyAdapter) -> None:
    gate = PromptGate.from_adapter(gated_adapter)
    hidden = torch.zeros(3, 2, HIDDEN)
    hidden[0, -1, 0] = 1.0  # violence fires on row 0 only
    forced = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    gated = torch.tensor([[1.5, 1.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])

    decision = gate.decide(hidden, torch.ones(3, 2), forced, gated)

    assert decision.weights.tolist() == [[1.5, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0]]
    assert decision.steered.tolist() == [True, True, False]
    with pytest.raises(ValueError, match="rows, categories"):
        gate.decide(hidden, torch.ones(3, 2), forced[:, :2], gated)


def test_adapter_without_gate_has_no_prompt_gate(adapter: SafetyAdapter) -> None:
    with pytest.raises(ValueError, match="no gate"):
        PromptGate.from_adapter(adapter)


# ----- fitting and calibration --------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lda", "diffmean"])
def test_probe_scores_harmful_mean_plus_one_and_benign_mean_minus_one(method: str) -> None:
    generator = torch.Generator().manual_seed(3)
    harmful = torch.randn(40, HIDDEN, generator=generator) + 2.0 * _unit(5)
    benign = torch.randn(60, HIDDEN, generator=generator)

    direction, bias = fit_probe(harmful, benign, method)

    assert float(harmful.mean(0) @ direction + bias) == pytest.approx(1.0, abs=1e-4)
    assert float(benign.mean(0) @ direction + bias) == pytest.approx(-1.0, abs=1e-4)
    with pytest.raises(ValueError, match="coincide"):
        fit_probe(benign, benign, method)
    with pytest.raises(ValueError, match="method"):
        fit_probe(harmful, benign, "svm")


def test_pooled_lda_with_one_category_is_plain_lda() -> None:
    generator = torch.Generator().manual_seed(7)
    harmful = torch.randn(30, HIDDEN, generator=generator) + 2.0 * _unit(2)
    benign = torch.randn(50, HIDDEN, generator=generator)

    pooled = fit_probes({"only": harmful}, benign, "pooled-lda")["only"]
    plain = fit_probe(harmful, benign, "lda")

    assert torch.allclose(pooled[0], plain[0], atol=1e-5)
    assert pooled[1] == pytest.approx(plain[1], abs=1e-5)


def test_pooled_lda_lets_a_small_category_borrow_the_shared_harmful_direction() -> None:
    # Every harmful prompt shares a "harmful" shift; each category adds its own. The small
    # category's 4 prompts give a noisy mean; pooled-lda draws it towards the shared one.
    generator = torch.Generator().manual_seed(11)
    shared = 2.0 * _unit(0)

    def prompts(count: int, own: torch.Tensor) -> torch.Tensor:
        return torch.randn(count, HIDDEN, generator=generator) + shared + own

    groups = {"large": prompts(200, 1.5 * _unit(1)), "small": prompts(4, 1.5 * _unit(2))}
    benign = torch.randn(200, HIDDEN, generator=generator)
    unseen_small = prompts(300, 1.5 * _unit(2))
    unseen_benign = torch.randn(300, HIDDEN, generator=generator)

    def held_out_auc(method: str) -> float:
        direction, _ = fit_probes(groups, benign, method)["small"]
        return auc(unseen_small @ direction, unseen_benign @ direction)

    pooled = fit_probes(groups, benign, "pooled-lda")
    drawn = (1 - POOLED_SHARE) * groups["small"].mean(0) + POOLED_SHARE * torch.cat(
        list(groups.values())
    ).mean(0)
    direction, bias = pooled["small"]
    assert float(drawn @ direction + bias) == pytest.approx(1.0, abs=1e-4)
    assert float(benign.mean(0) @ direction + bias) == pytest.approx(-1.0, abs=1e-4)
    assert held_out_auc("pooled-lda") > held_out_auc("lda") + 0.02
    with pytest.raises(ValueError, match="harmful and benign"):
        fit_probes({"large": groups["large"], "empty": benign[:0]}, benign, "pooled-lda")
    with pytest.raises(ValueError, match="known here"):
        fit_probe(groups["large"], benign, "pooled-lda")


def test_lda_discounts_a_direction_in_which_everything_varies() -> None:
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(400, HIDDEN, generator=generator)
    noise[:, 0] *= 20.0  # a nuisance direction: large spread in both sets
    shift = _unit(0) * 3.0 + _unit(1) * 1.0  # the means differ most along the nuisance
    harmful, benign = noise[:200] + shift, noise[200:]

    lda, _ = fit_probe(harmful, benign, "lda", shrinkage=0.01)
    plain, _ = fit_probe(harmful, benign, "diffmean")

    def separation(direction: torch.Tensor) -> float:
        return auc(harmful @ direction, benign @ direction)

    assert abs(float(lda[0])) < abs(float(lda[1]))  # leans on the quiet direction
    assert separation(lda) > separation(plain) + 0.1


@pytest.mark.parametrize("target", [0.01, 0.02, 0.05, 0.1])
def test_per_category_calibration_hits_the_target_fpr(target: float) -> None:
    scores = torch.randn(1000, 3, generator=torch.Generator().manual_seed(1))

    thresholds = calibrate_thresholds(scores, target, "category")

    rates = (scores > thresholds).double().mean(0)
    assert rates.tolist() == pytest.approx([target] * 3)
    held_out = torch.randn(20000, 3, generator=torch.Generator().manual_seed(2))
    assert (held_out > thresholds).double().mean(0).tolist() == pytest.approx(
        [target] * 3, abs=0.5 * target + 0.005
    )


def test_union_calibration_keeps_any_category_within_the_target() -> None:
    scores = torch.randn(1000, 5, generator=torch.Generator().manual_seed(1))

    union = calibrate_thresholds(scores, 0.05, "any")
    each = calibrate_thresholds(scores, 0.05, "category")

    any_rate = float((scores > union).any(dim=1).double().mean())
    assert any_rate == pytest.approx(0.05)
    assert bool((union >= each).all())  # stricter than per-category calibration
    assert float((scores > each).any(dim=1).double().mean()) > 0.05
    with pytest.raises(ValueError, match="target_fpr"):
        calibrate_thresholds(scores, 0.0, "any")
    with pytest.raises(ValueError, match="scope"):
        calibrate_thresholds(scores, 0.05, "all")


@pytest.mark.parametrize("scope", ["any", "category"])
def test_held_out_fpr_is_near_the_target_on_exchangeable_scores(scope: str) -> None:
    scores = torch.randn(400, 4, generator=torch.Generator().manual_seed(6))

    fired = held_out_fired(scores, 0.05, scope)

    rate = fired.any(dim=1) if scope == "any" else fired
    assert rate.double().mean().item() == pytest.approx(0.05, abs=0.02)


def test_fit_gate_from_activations_separates_synthetic_clusters() -> None:
    generator = torch.Generator().manual_seed(4)

    def cluster(count: int, centre: torch.Tensor) -> torch.Tensor:
        return torch.randn(count, HIDDEN, generator=generator) + centre

    harmful_fit = {"violence": cluster(50, 6 * _unit(0)), "fraud": cluster(50, 6 * _unit(1))}
    harmful_dev = {"violence": cluster(30, 6 * _unit(0)), "fraud": cluster(30, 6 * _unit(1))}

    fitted = fit_gate_from_activations(
        harmful_fit,
        cluster(200, torch.zeros(HIDDEN)),
        cluster(200, torch.zeros(HIDDEN)),
        harmful_dev,
        detection_layer=0,
        pooling="mean",
        target_fpr=0.02,
        scope="category",
    )

    for category in ("violence", "fraud"):
        entry = fitted.spec.categories[category]
        assert entry.fpr is not None and entry.fpr <= 0.04  # held out
        assert entry.tpr is not None and entry.tpr >= 0.9
        assert fitted.auc[category] > 0.95
    assert fitted.harmful_any >= 0.9
    assert (fitted.spec.detection_layer, fitted.spec.pooling) == (0, "mean")
    benign = torch.randn(10, HIDDEN, generator=generator)
    rows = dev_rows(fitted, benign, [True] * 5 + [False] * 5, {"violence": 30}, "category")
    assert [row[0] for row in rows] == ["violence", "fraud", "any category"]
    assert all(len(row) == len(TABLE_HEADER) for row in rows)
    assert "any category" in render([TABLE_HEADER, *rows])


def test_a_second_calibration_set_holds_both_sets_to_the_target() -> None:
    generator = torch.Generator().manual_seed(5)

    def cluster(count: int, centre: torch.Tensor) -> torch.Tensor:
        return torch.randn(count, HIDDEN, generator=generator) + centre

    harmful = {"violence": cluster(60, 6 * _unit(0))}
    requests = cluster(200, torch.zeros(HIDDEN))
    # Benign prompts of another format that lean towards the harmful cluster.
    questions = cluster(200, 3 * _unit(0))

    def fit(questions_dev: torch.Tensor | None) -> FittedGate:
        return fit_gate_from_activations(
            harmful,
            requests,
            cluster(200, torch.zeros(HIDDEN)),
            {"violence": cluster(40, 6 * _unit(0))},
            detection_layer=0,
            pooling="mean",
            target_fpr=0.05,
            questions_dev=questions_dev,
        )

    alone, both = fit(None), fit(questions)
    assert alone.questions_any is None and both.questions_any is not None
    assert both.questions_any <= 0.08  # held out, near the target
    assert float(alone.fired(questions).any(dim=1).double().mean()) > 0.3
    assert both.spec.categories["violence"].threshold > alone.spec.categories["violence"].threshold
    assert both.benign_any <= alone.benign_any


def _scores(probes: dict[str, tuple[torch.Tensor, float]], rows: torch.Tensor) -> torch.Tensor:
    directions = torch.stack([probe[0] for probe in probes.values()])
    return rows @ directions.T + torch.tensor([probe[1] for probe in probes.values()])


def test_out_of_fold_scores_look_like_unseen_prompts_where_in_sample_scores_do_not() -> None:
    # 40 benign prompts in 64 dimensions: LDA overfits them, so their in-sample scores sit
    # below those of fresh benign prompts (at -1 by construction); out of fold they do not.
    generator = torch.Generator().manual_seed(12)
    harmful = {"violence": torch.randn(40, HIDDEN, generator=generator) + 3 * _unit(0)}
    benign = torch.randn(40, HIDDEN, generator=generator)
    fresh = torch.randn(400, HIDDEN, generator=generator)
    probes = fit_probes(harmful, benign, "lda", shrinkage=0.05)

    in_sample = _scores(probes, benign).mean().item()
    unseen = _scores(probes, fresh).mean().item()
    folded = out_of_fold_scores(harmful, benign, 5, "lda", shrinkage=0.05).mean().item()

    assert unseen - in_sample > 0.2
    assert abs(folded - unseen) < 0.4 * (unseen - in_sample)


def test_out_of_fold_scores_refuse_impossible_folds() -> None:
    harmful = {"violence": torch.randn(5, HIDDEN) + _unit(0)}
    for folds in (1, 7):
        with pytest.raises(ValueError, match="folds"):
            out_of_fold_scores(harmful, torch.randn(6, HIDDEN), folds)


def test_fit_folds_calibrate_on_dev_and_the_fit_prompts_out_of_fold() -> None:
    generator = torch.Generator().manual_seed(12)

    def cluster(count: int, centre: torch.Tensor) -> torch.Tensor:
        return torch.randn(count, HIDDEN, generator=generator) + centre

    harmful = {"violence": cluster(60, 4 * _unit(0)), "fraud": cluster(60, 4 * _unit(1))}
    benign_fit, benign_dev = cluster(200, torch.zeros(HIDDEN)), cluster(30, torch.zeros(HIDDEN))
    harmful_dev = {"violence": cluster(20, 4 * _unit(0))}

    def fit(folds: int) -> FittedGate:
        return fit_gate_from_activations(
            harmful,
            benign_fit,
            benign_dev,
            harmful_dev,
            detection_layer=0,
            pooling="mean",
            target_fpr=0.05,
            fit_folds=folds,
        )

    folded, alone = fit(5), fit(0)
    calibration = torch.cat(
        [
            out_of_fold_scores(harmful, benign_fit, 5),
            _scores(fit_probes(harmful, benign_fit), benign_dev),
        ]
    )
    expected = calibrate_thresholds(calibration, 0.05, "any")
    thresholds = [g.threshold for g in folded.spec.categories.values()]
    assert thresholds == pytest.approx(expected.tolist(), abs=1e-5)
    assert thresholds != pytest.approx([g.threshold for g in alone.spec.categories.values()])
    # The held-out FPR is still a rate over the 30 dev prompts.
    assert (folded.benign_any * 30) == pytest.approx(round(folded.benign_any * 30))


@pytest.mark.parametrize(
    "argv",
    [
        ["--adapter", "a.safetensors"],
        ["--out", "b.safetensors"],
        ["--adapter", "a.safetensors", "--out", "b.safetensors", "--layers", "6,8"],
    ],
)
def test_cli_refuses_incomplete_output_options(argv: list[str]) -> None:
    assert main(argv) == 2  # before any model is loaded


@pytest.mark.parametrize("argv", [["--layers", "6,x"], ["--pooling", "max"], ["--method", "svm"]])
def test_cli_refuses_bad_lists(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        main(argv)


# ----- gate metadata in the adapter file ----------------------------------------------------------


def test_gate_round_trips_through_the_file(tmp_path: Path, gated_adapter: SafetyAdapter) -> None:
    loaded = SafetyAdapter.load(gated_adapter.save(tmp_path / "gated.safetensors"))

    assert loaded.metadata.gate == gated_adapter.metadata.gate
    assert loaded.metadata == gated_adapter.metadata
    assert loaded.conditions.keys() == {"violence", "fraud"}
    assert torch.equal(loaded.conditions["fraud"], _unit(1))
    header = loaded.to_header()["gate"]
    assert header["detection_layer"] == DETECTION_LAYER
    assert header["pooling"] == "last"
    assert header["categories"]["violence"] == {
        "bias": 0.0,
        "threshold": 0.5,
        "target_fpr": 0.02,
        "tpr": 0.9,
        "fpr": 0.01,
    }
    assert loaded.payload_sha256 == gated_adapter.payload_sha256


def test_with_gate_records_its_recipe_and_keeps_the_vectors(
    adapter: SafetyAdapter, gated_adapter: SafetyAdapter
) -> None:
    again = with_gate(gated_adapter, _gate({"drugs": _unit(2)}), {"data": "synthetic"})

    assert again.conditions.keys() == {"drugs"}  # replaces the previous gate
    assert again.metadata.recipe["gate"] == {"data": "synthetic"}
    assert again.vectors is adapter.vectors
    assert again.payload_sha256 != adapter.payload_sha256


def test_adapters_without_gate_still_load(tmp_path: Path, adapter: SafetyAdapter) -> None:
    path = adapter.save(tmp_path / "plain.safetensors")

    assert "gate" not in adapter.to_header()
    assert SafetyAdapter.load(path).metadata.gate is None


def test_the_built_in_adapter_carries_a_gate_for_every_category() -> None:
    built_in = SafetyAdapter.load(BUILT_IN)
    gate = built_in.metadata.gate
    assert gate is not None and gate.detection_layer < min(built_in.layers)
    assert set(built_in.conditions) == set(built_in.categories)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"layer": 1}, "before every steering layer"),
        ({"layer": 3}, "before every steering layer"),
        ({"layer": -1}, "outside"),
        ({"pooling": "max"}, "pooling"),
        ({"threshold": math.inf}, "finite"),
        ({"bias": math.nan}, "finite"),
    ],
)
def test_bad_gate_raises(adapter: SafetyAdapter, change: dict[str, Any], message: str) -> None:
    with pytest.raises(AdapterFormatError, match=message):
        with_gate(adapter, _gate({"violence": _unit(0)}, **change))


def test_gate_and_conditions_must_match(adapter: SafetyAdapter) -> None:
    fitted = _gate({"violence": _unit(0)})
    with pytest.raises(AdapterFormatError, match=r"condition\.fraud has no gate entry"):
        replace(with_gate(adapter, fitted), conditions={"violence": _unit(0), "fraud": _unit(1)})
    with pytest.raises(AdapterFormatError, match=r"has no condition\.violence"):
        replace(with_gate(adapter, fitted), conditions={})
    with pytest.raises(AdapterFormatError, match="shape"):
        with_gate(adapter, _gate({"violence": torch.ones(HIDDEN - 1)}))
    with pytest.raises(AdapterFormatError, match="not in metadata"):
        with_gate(adapter, _gate({"weapons": _unit(0)}))
    empty = FittedGate(GateSpec(0, "last", {}), {}, {}, math.nan, math.nan)
    with pytest.raises(AdapterFormatError, match="no categories"):
        with_gate(adapter, empty)
    bad_rate = replace(
        fitted,
        spec=replace(fitted.spec, categories={"violence": CategoryGate(0.0, 0.5, 0.02, tpr=1.5)}),
    )
    with pytest.raises(AdapterFormatError, match="tpr"):
        with_gate(adapter, bad_rate)


@pytest.mark.parametrize("field", ["threshold", "detection_layer"])
def test_file_with_incomplete_gate_raises(
    tmp_path: Path, gated_adapter: SafetyAdapter, field: str
) -> None:
    path = gated_adapter.save(tmp_path / "a.safetensors")
    tensors, header = _read(path)
    if field == "threshold":
        del header["gate"]["categories"]["violence"]["threshold"]
    else:
        del header["gate"][field]
    _write(path, tensors, header)

    with pytest.raises(AdapterFormatError, match="incomplete"):
        SafetyAdapter.load(path)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    return load_file(str(path)), json.loads(metadata["safesteer"])


def _write(path: Path, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"safesteer": json.dumps(header)})


# ----- gate arithmetic ----------------------------------------------------------------------------


def test_scaling_keeps_the_gate(gated_adapter: SafetyAdapter) -> None:
    for scaled in (2.0 * gated_adapter, -gated_adapter, gated_adapter / 4):
        assert scaled.metadata.gate == gated_adapter.metadata.gate
        assert scaled.conditions.keys() == gated_adapter.conditions.keys()


def test_sum_keeps_the_left_probe_per_category(
    adapter: SafetyAdapter, random_adapter: AdapterFactory
) -> None:
    left = with_gate(adapter, _gate({"violence": _unit(0)}, threshold=0.1))
    other = random_adapter(FAMILY, layers=(2, 3), seed=5)
    right = with_gate(other, _gate({"violence": _unit(3), "drugs": _unit(4)}, threshold=0.7))

    total = left + right
    gate = total.metadata.gate

    assert gate is not None
    assert list(gate.categories) == ["violence", "drugs"]
    assert gate.categories["violence"].threshold == pytest.approx(0.1)
    assert gate.categories["drugs"].threshold == pytest.approx(0.7)
    assert torch.equal(total.conditions["violence"], _unit(0))
    assert torch.equal(total.conditions["drugs"], _unit(4))
    # An ungated adapter on either side keeps the gate; ungated probes are dropped.
    legacy = replace(other, conditions={"fraud": _unit(7)})
    assert (left + legacy).metadata.gate == left.metadata.gate
    assert (legacy + left).conditions.keys() == {"violence"}
    assert (other + other).metadata.gate is None


def test_sum_of_gates_on_different_layers_raises(
    adapter: SafetyAdapter, random_adapter: AdapterFactory
) -> None:
    late = random_adapter(FAMILY, layers=(2, 3), seed=5)
    left = with_gate(adapter, _gate({"violence": _unit(0)}, layer=0))
    right = with_gate(late, _gate({"violence": _unit(0)}, layer=1))
    mean = with_gate(late, _gate({"violence": _unit(0)}, pooling="mean"))

    with pytest.raises(AdapterMismatch, match=r"gate\.detection_layer"):
        _ = left + right
    with pytest.raises(AdapterMismatch, match=r"gate\.pooling"):
        _ = left + mean
    with pytest.raises(AdapterFormatError, match="before every steering layer"):
        _ = right + adapter  # the sum steers at layer 1, where right's gate reads


# ----- gating inside the forward pass -------------------------------------------------------------


class _LayerOutput:
    """Records what a decoder layer outputs, for building probes by construction."""

    def __init__(self, module: nn.Module) -> None:
        self.outputs: list[torch.Tensor] = []
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, _module: nn.Module, _args: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        self.outputs.append(hidden.detach().clone())


def _two_prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(1, 128, (n,), generator=generator).tolist() for n in (6, 4)]


@torch.no_grad()
def _prefill_logits(model: PreTrainedModel, prompts: list[list[int]]) -> torch.Tensor:
    input_ids, mask = left_pad(prompts, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions)
    logits: torch.Tensor = out.logits[:, -1]
    return logits


@torch.no_grad()
def _greedy(model: PreTrainedModel, prompts: list[list[int]]) -> list[list[int]]:
    input_ids, mask = left_pad(prompts, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generate = cast(Callable[..., torch.Tensor], model.generate)
    out = generate(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        do_sample=False,
        max_new_tokens=6,
        pad_token_id=0,
    )
    new: list[list[int]] = out[:, input_ids.shape[1] :].tolist()
    return new


def _separating_probe(model: PreTrainedModel, harmful: list[int], benign: list[int]) -> FittedGate:
    """A violence probe on layer 0's last position that fires on `harmful`, not on `benign`."""
    capture = _LayerOutput(decoder_layers(model, NUM_LAYERS)[DETECTION_LAYER])
    _prefill_logits(model, [harmful])
    _prefill_logits(model, [benign])
    capture.handle.remove()
    high, low = (out[0, -1] for out in capture.outputs)
    direction = high - low
    bias = -float(direction @ (high + low)) / 2  # scores: +|d|^2/2 and -|d|^2/2
    entries = {"violence": CategoryGate(bias, 0.0, 0.02)}
    return FittedGate(
        GateSpec(DETECTION_LAYER, "last", entries), {"violence": direction}, {}, 1.0, 0.0
    )


@pytest.fixture
def gated_setup(
    tiny_model: PreTrainedModel, random_adapter: AdapterFactory
) -> Iterator[tuple[PreTrainedModel, SteeringHooks, SteeringBasis, PromptGate]]:
    harmful, benign = _two_prompts()
    strong = random_adapter(tiny_model, layers=STEERING_LAYERS, norm=4.0, seed=11)
    adapter = with_gate(strong, _separating_probe(tiny_model, harmful, benign))
    basis = SteeringBasis.from_adapter(adapter)
    hooks = SteeringHooks(tiny_model, NUM_LAYERS, basis.layers)
    yield tiny_model, hooks, basis, PromptGate.from_adapter(adapter)
    hooks.remove()


def test_only_the_row_whose_probe_fires_is_steered(
    gated_setup: tuple[PreTrainedModel, SteeringHooks, SteeringBasis, PromptGate],
) -> None:
    model, hooks, basis, gate = gated_setup
    prompts = _two_prompts()  # [harmful, benign]
    weights = basis.weights({"violence": 1.0, "fraud": 1.0, "drugs": 1.0})[None].repeat(2, 1)
    forced = torch.zeros_like(weights)
    _, mask = left_pad(prompts, 0)
    violence_only = basis.table(basis.weights({"violence": 1.0, "fraud": 0.0, "drugs": 0.0})[None])

    with hooks.gated_steering(basis, gate, forced, weights, mask) as run:
        logits = _prefill_logits(model, prompts)
    with hooks.gated_steering(basis, gate, forced, weights, mask) as generated_run:
        generated = _greedy(model, prompts)
    with hooks.steering(violence_only):
        steered_logits = _prefill_logits(model, prompts[:1])
        steered_tokens = _greedy(model, prompts[:1])
    plain_logits = _prefill_logits(model, prompts[1:])
    plain_tokens = _greedy(model, prompts[1:])
    unsteered_harmful = _greedy(model, prompts[:1])

    assert run.fired_categories() == [["violence"], []]
    assert generated_run.fired_categories() == [["violence"], []]
    assert run.table is not None and not bool(run.table[1].any())
    # fraud has no probe, drugs neither: only violence steers the harmful row.
    torch.testing.assert_close(run.table[0], violence_only[0])
    torch.testing.assert_close(logits[0], steered_logits[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], plain_logits[0], atol=1e-4, rtol=1e-4)
    assert generated == [steered_tokens[0], plain_tokens[0]]
    assert steered_tokens != unsteered_harmful  # steering decides the harmful row's tokens


def test_forced_weights_steer_a_row_whose_probe_stays_silent(
    gated_setup: tuple[PreTrainedModel, SteeringHooks, SteeringBasis, PromptGate],
) -> None:
    model, hooks, basis, gate = gated_setup
    prompts = _two_prompts()
    _, mask = left_pad(prompts, 0)
    forced = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.5]])
    gated = torch.zeros(2, 3)

    with hooks.gated_steering(basis, gate, forced, gated, mask) as run:
        generated = _greedy(model, prompts)
    with hooks.steering(basis.table(forced[1:])):
        forced_solo = _greedy(model, prompts[1:])

    assert run.fired_categories() == [["violence"], []]
    assert generated[0] == _greedy(model, prompts[:1])[0]  # fired, but gated weight 0
    assert generated[1] == forced_solo[0]


def test_no_row_steered_means_no_table_and_the_plain_model(
    gated_setup: tuple[PreTrainedModel, SteeringHooks, SteeringBasis, PromptGate],
) -> None:
    model, hooks, basis, gate = gated_setup
    prompts = _two_prompts()[::-1]  # benign first
    _, mask = left_pad(prompts, 0)
    weights = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])  # the harmful row asks for none

    reference = _prefill_logits(model, prompts)
    with hooks.gated_steering(basis, gate, torch.zeros(2, 3), weights, mask) as run:
        logits = _prefill_logits(model, prompts)
        again = _prefill_logits(model, prompts)  # later passes reuse the decision

    assert run.fired.tolist() == [[False, False, False], [True, False, False]]
    assert run.table is None
    assert torch.equal(logits, reference)
    assert torch.equal(again, reference)
    assert torch.equal(_prefill_logits(model, prompts), reference)  # nothing left behind


def test_gated_context_restores_plain_steering(
    gated_setup: tuple[PreTrainedModel, SteeringHooks, SteeringBasis, PromptGate],
) -> None:
    model, hooks, basis, gate = gated_setup
    prompts = _two_prompts()
    _, mask = left_pad(prompts, 0)
    table = basis.table(basis.weights({}, strength=0.5)[None].repeat(2, 1))
    with hooks.steering(table):
        expected = _prefill_logits(model, prompts)

    ones, zeros = torch.ones(2, 3), torch.zeros(2, 3)
    with hooks.steering(table):
        # A plain context inside a gated one never evaluates the gate.
        with hooks.gated_steering(basis, gate, zeros, ones, mask) as run, hooks.steering(None):
            plain = _prefill_logits(model, prompts)
        after = _prefill_logits(model, prompts)

    assert run.decision is None
    with pytest.raises(RuntimeError, match="not been evaluated"):
        _ = run.fired
    torch.testing.assert_close(plain, _prefill_logits(model, prompts))
    assert torch.equal(after, expected)


def test_gated_steering_refuses_mismatched_inputs(
    gated_setup: tuple[PreTrainedModel, SteeringHooks, SteeringBasis, PromptGate],
) -> None:
    model, hooks, basis, gate = gated_setup
    mask = torch.ones(2, 4, dtype=torch.long)
    zeros = torch.zeros(2, 3)
    late = replace(gate, detection_layer=STEERING_LAYERS[0])
    other = replace(gate, categories=("violence", "drugs", "fraud"))

    with pytest.raises(ValueError, match="do not come after detection layer"):
        hooks.gated_steering(basis, late, zeros, zeros, mask).__enter__()
    with pytest.raises(ValueError, match="categories"):
        hooks.gated_steering(basis, other, zeros, zeros, mask).__enter__()
    with pytest.raises(ValueError, match="rows, categories"):
        hooks.gated_steering(basis, gate, zeros[:, :2], zeros, mask).__enter__()
    with pytest.raises(ValueError, match="rows, categories"):
        hooks.gated_steering(basis, gate, zeros, zeros, mask[:1]).__enter__()
    with (
        pytest.raises(ValueError, match="mask"),
        hooks.gated_steering(basis, gate, zeros, zeros, mask[:, :2]),
    ):
        _prefill_logits(model, [[1, 2, 3, 4], [5, 6, 7, 8]])  # the prefill is longer
    # The failed pass left no pending gate behind.
    assert torch.equal(_prefill_logits(model, [[1, 2, 3]]), _prefill_logits(model, [[1, 2, 3]]))
    hooks.remove()
    with hooks.gated_steering(basis, gate, zeros, torch.ones(2, 3), mask):
        pass  # removed hooks install no detector again
    assert all(not m._forward_hooks for m in decoder_layers(model, NUM_LAYERS))


# ----- activations of real (tiny) prompts ---------------------------------------------------------


class _CharTokenizer:
    """Just enough of a tokenizer for `chat_prompt_ids`: one token per character."""

    pad_token_id = 0
    eos_token_id = 0

    def apply_chat_template(self, messages: list[dict[str, str]], **_: Any) -> str:
        return f"<user>{messages[0]['content']}<bot>"

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [1 + ord(ch) % 120 for ch in text]}


def test_prompt_activations_pool_the_detection_layer_output(
    tiny_model_factory: Callable[[str], PreTrainedModel],
) -> None:
    model = tiny_model_factory("llama")
    tokenizer = _CharTokenizer()
    prompts = ["hurt someone", "bake bread please", "hi"]
    capture = _LayerOutput(decoder_layers(model, NUM_LAYERS)[1])
    solo = []
    for prompt in prompts:
        ids = tokenizer(tokenizer.apply_chat_template([{"content": prompt}]))["input_ids"]
        _prefill_logits(model, [ids])
        solo.append(capture.outputs[-1][0])
    capture.handle.remove()

    acts = prompt_activations(model, tokenizer, prompts, [0, 1], batch_size=2, show_progress=False)

    assert acts["last"].shape == (3, 2, HIDDEN)
    for row, hidden in enumerate(solo):
        torch.testing.assert_close(acts["last"][row, 1], hidden[-1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(acts["mean"][row, 1], hidden[1:].mean(0), atol=1e-4, rtol=1e-4)
    fitted = fit_gate(
        model,
        tokenizer,
        {"violence": ["hurt someone badly", "hit him hard"]},
        ["bake bread please", "sing a song"],
        ["plant a tree", "read a book", "walk the dog"],
        {"violence": ["punch a man"]},
        detection_layer=1,
        pooling="mean",
        show_progress=False,
    )
    assert fitted.spec.detection_layer == 1
    # 2% of two prompts is none: held out, only the highest-scoring one of three fires.
    assert fitted.spec.categories["violence"].fpr == pytest.approx(1 / 3)
    assert fitted.probes["violence"].shape == (HIDDEN,)
