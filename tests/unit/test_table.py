"""`SteeringBasis`: per-row weights (defaults, overrides, strength) and the mixed table."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.errors import UnknownCategory
from safesteer.adapters.family import ModelFamily
from safesteer.adapters.table import SteeringBasis

if TYPE_CHECKING:
    from conftest import AdapterFactory

FAMILY = ModelFamily("llama", 64, 4)


@pytest.fixture
def adapter(random_adapter: AdapterFactory) -> SafetyAdapter:
    # Default weights: violence 1.0, fraud 1.0, drugs 0.0 (see `make_random_adapter`).
    return random_adapter(FAMILY, layers=(0, 2, 3))


def test_basis_holds_effective_vectors(adapter: SafetyAdapter) -> None:
    basis = SteeringBasis.from_adapter(adapter)

    assert basis.categories == ("violence", "fraud", "drugs")
    assert basis.layers == (0, 2, 3)
    assert basis.basis.shape == (3, 3, 64)
    for i, category in enumerate(basis.categories):
        for j, layer in enumerate(basis.layers):
            assert torch.equal(basis.basis[i, j], adapter.effective(category, layer))


def test_weights_defaults(adapter: SafetyAdapter) -> None:
    basis = SteeringBasis.from_adapter(adapter)

    assert torch.equal(basis.weights({}), torch.tensor([1.0, 1.0, 0.0]))


def test_weights_overrides_and_strength(adapter: SafetyAdapter) -> None:
    basis = SteeringBasis.from_adapter(adapter)

    weights = basis.weights({"drugs": 0.5, "violence": 0.0}, strength=2.0)

    assert torch.equal(weights, torch.tensor([0.0, 2.0, 1.0]))
    # The defaults are not changed by an override.
    assert torch.equal(basis.weights({}), torch.tensor([1.0, 1.0, 0.0]))


def test_weights_unknown_category_raises(adapter: SafetyAdapter) -> None:
    basis = SteeringBasis.from_adapter(adapter)

    with pytest.raises(UnknownCategory, match="weapons") as info:
        basis.weights({"fraud": 1.0, "weapons": 1.0})

    assert info.value.category == "weapons"
    assert info.value.known == ["violence", "fraud", "drugs"]


def test_table_equals_loop_sum(adapter: SafetyAdapter) -> None:
    basis = SteeringBasis.from_adapter(adapter)
    rows = [
        basis.weights({}),
        basis.weights({"violence": 0.0, "drugs": 1.0}, strength=0.5),
        basis.weights({"fraud": -1.0, "drugs": 3.0}, strength=1.5),
    ]

    table = basis.table(rows)

    assert table.shape == (3, 3, 64)
    for r, weights in enumerate(rows):
        for j, layer in enumerate(adapter.layers):
            expected = torch.zeros(64)
            for c, category in enumerate(adapter.categories):
                expected += (
                    float(weights[c])
                    * adapter.coefficients[category][layer]
                    * (adapter.vectors[category][layer])
                )
            torch.testing.assert_close(table[r, j], expected, rtol=1e-5, atol=1e-6)


def test_table_accepts_stacked_tensor(adapter: SafetyAdapter) -> None:
    basis = SteeringBasis.from_adapter(adapter)
    rows = [basis.weights({}), basis.weights({"drugs": 2.0})]

    assert torch.equal(basis.table(torch.stack(rows)), basis.table(rows))


def test_zero_weights_give_zero_table(adapter: SafetyAdapter) -> None:
    basis = SteeringBasis.from_adapter(adapter)

    table = basis.table([basis.weights({}, strength=0.0), torch.zeros(3)])

    assert table.shape == (2, 3, 64)
    assert torch.count_nonzero(table) == 0


def test_basis_dtype(adapter: SafetyAdapter) -> None:
    basis = SteeringBasis.from_adapter(adapter, dtype=torch.bfloat16)

    table = basis.table([basis.weights({})])

    assert basis.basis.dtype == torch.bfloat16
    assert table.dtype == torch.bfloat16
    assert basis.default_weights.dtype == torch.float32
