"""Merge schemes for rows with several categories on: naive, orthogonal, ties."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from transformers import PreTrainedModel

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.merging import (
    SCHEMES,
    MergingBasis,
    comparison_report,
    cosine_matrix,
    main,
    merge,
    mix_ratios,
    naive_merge,
    orthogonal_merge,
    ties_merge,
)
from safesteer.adapters.table import SteeringBasis

if TYPE_CHECKING:
    from conftest import AdapterFactory

BUILTIN_ADAPTER = Path(__file__).resolve().parents[2] / "adapters/smollm2-135m/safety.safetensors"
HIDDEN = 32


def _basis(*vectors: torch.Tensor) -> torch.Tensor:
    """`[categories, 1 layer, hidden]` from one vector per category."""
    return torch.stack(vectors)[:, None, :]


def _random(seed: int, count: int = 1) -> torch.Tensor:
    return torch.randn(count, HIDDEN, generator=torch.Generator().manual_seed(seed))


def _orthogonal(count: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(_random(3, HIDDEN))
    return q[:count] * torch.arange(1.0, count + 1.0)[:, None]  # different norms


# ----- orthogonal -------------------------------------------------------------------------------
def test_identical_vectors_are_counted_once() -> None:
    v = _random(0)[0]
    merged = orthogonal_merge(_basis(v, v), torch.tensor([[1.0, 1.0]]))
    torch.testing.assert_close(merged[0, 0], v, rtol=1e-5, atol=1e-5)
    assert float(naive_merge(_basis(v, v), torch.tensor([[1.0, 1.0]])).norm()) == pytest.approx(
        2 * float(v.norm())
    )


def test_identical_directions_with_different_demands_get_their_mean_demand_once() -> None:
    v = _random(0)[0]
    merged = orthogonal_merge(_basis(v, 2 * v), torch.tensor([[1.0, 1.0]]))
    torch.testing.assert_close(merged[0, 0], 1.5 * v, rtol=1e-5, atol=1e-5)


def test_orthogonal_vectors_give_the_naive_sum() -> None:
    basis = _basis(*_orthogonal(4))
    weights = torch.tensor([[1.0, 0.5, 2.0, 0.0], [0.0, 3.0, 1.0, 1.0]])
    torch.testing.assert_close(
        orthogonal_merge(basis, weights), naive_merge(basis, weights), rtol=1e-5, atol=1e-5
    )


def test_each_active_category_gets_exactly_its_demand() -> None:
    vectors = _random(5, 3) + 0.8 * _random(6)  # correlated, but well conditioned
    basis = _basis(*vectors)
    weights = torch.tensor([[1.0, 2.0, 0.0]])
    merged = orthogonal_merge(basis, weights)[0, 0]
    units = torch.nn.functional.normalize(vectors, dim=-1)
    demands = weights[0, :2] * vectors[:2].norm(dim=-1)
    torch.testing.assert_close(units[:2] @ merged, demands, rtol=1e-4, atol=1e-4)
    # An inactive category constrains nothing: same as merging the two alone.
    alone = orthogonal_merge(basis[:2], weights[:, :2])[0, 0]
    torch.testing.assert_close(merged, alone, rtol=1e-5, atol=1e-5)


def test_near_duplicates_with_conflicting_demands_stay_bounded() -> None:
    v = _random(0)[0]
    nearly = v + 1e-3 * _random(1)[0]
    merged = orthogonal_merge(_basis(v, nearly), torch.tensor([[1.0, 2.0]]))
    assert float(merged.norm()) == pytest.approx(1.5 * float(v.norm()), rel=1e-2)


def test_zero_vectors_and_zero_weights_give_zeros_not_nans() -> None:
    basis = torch.zeros(3, 2, HIDDEN)
    basis[0, 0] = _random(0)[0]
    merged = orthogonal_merge(basis, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert torch.isfinite(merged).all()
    torch.testing.assert_close(merged[0, 0], basis[0, 0])
    assert not merged[0, 1].any() and not merged[1].any()


# ----- ties -------------------------------------------------------------------------------------
def test_ties_drops_sign_conflicting_entries_and_averages_the_rest() -> None:
    first = torch.tensor([1.0, 2.0, 0.0, -1.0])
    second = torch.tensor([3.0, -3.0, 5.0, -3.0])
    merged = ties_merge(_basis(first, second), torch.tensor([[1.0, 1.0]]))[0, 0]
    # coord 0: both +, mean 2; coord 1: sum -1 elects -, keep -3; coord 2: only 5;
    # coord 3: both -, mean -2.
    assert torch.equal(merged, torch.tensor([2.0, -3.0, 5.0, -2.0]))
    weighted = ties_merge(_basis(first, second), torch.tensor([[2.0, 1.0]]))[0, 0]
    assert float(weighted[1]) == 4.0  # 2*2 - 3 > 0: the first category's sign wins


def test_ties_counts_identical_vectors_once_and_disjoint_supports_fully() -> None:
    v = _random(0)[0]
    torch.testing.assert_close(ties_merge(_basis(v, v), torch.tensor([[1.0, 1.0]]))[0, 0], v)
    a, b = torch.zeros(HIDDEN), torch.zeros(HIDDEN)
    a[:10], b[10:] = 1.0, -2.0
    basis, weights = _basis(a, b), torch.tensor([[1.0, 0.5]])
    torch.testing.assert_close(ties_merge(basis, weights), naive_merge(basis, weights))


def test_ties_density_keeps_each_categorys_largest_coordinates() -> None:
    v = torch.tensor([4.0, -3.0, 0.5, 0.1])
    merged = ties_merge(_basis(v), torch.tensor([[1.0]]), density=0.5)[0, 0]
    assert torch.equal(merged, torch.tensor([4.0, -3.0, 0.0, 0.0]))


# ----- all schemes --------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_lone_category_at_weight_k_adds_k_times_its_vector(scheme: str) -> None:
    basis = torch.stack([_random(i, 2) for i in range(3)])  # [3, 2 layers, hidden]
    merged = merge(basis, torch.tensor([[0.0, 2.5, 0.0]]), scheme)
    torch.testing.assert_close(merged[0], 2.5 * basis[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_rows_are_merged_independently(scheme: str) -> None:
    basis = torch.stack([_random(i, 2) + _random(9, 2) for i in range(3)])
    weights = torch.tensor([[1.0, 1.0, 0.0], [0.5, 2.0, 1.0], [0.0, 0.0, 0.0]])
    batched = merge(basis, weights, scheme)
    for row in range(3):
        torch.testing.assert_close(batched[row], merge(basis, weights[row : row + 1], scheme)[0])


def test_bad_arguments_are_refused() -> None:
    basis = _basis(_random(0)[0])
    with pytest.raises(ValueError, match="unknown merge scheme"):
        merge(basis, torch.ones(1, 1), "sum")
    with pytest.raises(ValueError, match="weights"):
        merge(basis, torch.ones(1, 2))
    with pytest.raises(ValueError, match="tolerance"):
        orthogonal_merge(basis, torch.ones(1, 1), tolerance=0.0)
    with pytest.raises(ValueError, match="density"):
        ties_merge(basis, torch.ones(1, 1), density=1.5)


# ----- MergingBasis -------------------------------------------------------------------------------
def test_naive_merging_basis_is_exactly_the_steering_basis(
    random_adapter: AdapterFactory, tiny_model_factory: Callable[[str], PreTrainedModel]
) -> None:
    adapter = random_adapter(tiny_model_factory("llama"), layers=(0, 2, 3))
    plain = SteeringBasis.from_adapter(adapter)
    weights = torch.tensor([[1.0, 0.5, 2.0], [0.0, 1.0, 1.0]])
    assert torch.equal(MergingBasis.of(plain, "naive").table(weights), plain.table(weights))
    merged = MergingBasis.of(plain, "orthogonal")
    assert merged.table(list(weights)).shape == plain.table(weights).shape
    assert merged.weights({"fraud": 0.5}).tolist() == plain.weights({"fraud": 0.5}).tolist()
    with pytest.raises(ValueError, match="unknown merge scheme"):
        MergingBasis.of(plain, "sum")


def test_merging_basis_keeps_padding_layers_zero(
    random_adapter: AdapterFactory, tiny_model_factory: Callable[[str], PreTrainedModel]
) -> None:
    adapter = random_adapter(tiny_model_factory("llama"), layers=(1,))
    plain = SteeringBasis.from_adapter(adapter, layers=(0, 1, 3))
    for scheme in SCHEMES:
        table = MergingBasis.of(plain, scheme).table(torch.ones(2, 3))
        assert torch.isfinite(table).all()
        assert not table[:, 0].any() and not table[:, 2].any()


# ----- the report on the built-in adapter ---------------------------------------------------------
def test_builtin_adapter_report() -> None:
    adapter = SafetyAdapter.load(BUILTIN_ADAPTER)
    base = SteeringBasis.from_adapter(adapter)
    ratios = mix_ratios(base, base.categories)
    for slot in range(len(base.layers)):
        # The categories share most of their direction: the naive sum of ten is ~9 vectors long,
        # orthogonal and ties keep it near one.
        assert ratios["naive"][slot] > 8.0
        assert 1.0 <= ratios["orthogonal"][slot] < 1.5
        assert 0.8 < ratios["ties"][slot] < 1.2
    cosines = cosine_matrix(base.basis)
    torch.testing.assert_close(cosines.diagonal(dim1=1, dim2=2), torch.ones(len(base.layers), 10))
    text = comparison_report(adapter)
    assert "all 10 on" in text and f"pairwise cosine similarity, layer {base.layers[-1]}" in text


def test_report_command(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--adapter", str(BUILTIN_ADAPTER), "--categories", "hate,fraud"]) == 0
    out = capsys.readouterr().out
    assert "all 2 on" in out and "hate+fraud" in out
    assert main(["--adapter", str(BUILTIN_ADAPTER), "--categories", "astrology"]) == 2
    assert main(["--adapter", str(tmp_path / "missing.safetensors")]) == 2
