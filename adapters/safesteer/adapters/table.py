"""Per-row steering tables: an adapter packed into one tensor, mixed per row by one matmul.

A row's steering at layer l is `strength * sum_c weight[c] * coefficient[c, l] * vector[c, l]`.
`SteeringBasis` holds `coefficient * vector` as a `[categories, layers, hidden]` tensor, so a
batch's `[rows, layers, hidden]` table is `weights[rows, categories] @ basis`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.errors import UnknownCategory

MAX_WEIGHT = 4.0


@dataclass(frozen=True, eq=False)
class SteeringBasis:
    """An adapter's effective vectors on the model's device, ready to mix per row."""

    categories: tuple[str, ...]
    layers: tuple[int, ...]
    basis: torch.Tensor  # [categories, layers, hidden]
    default_weights: torch.Tensor  # [categories], on CPU

    @classmethod
    def from_adapter(
        cls,
        adapter: SafetyAdapter,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        layers: Sequence[int] | None = None,
    ) -> SteeringBasis:
        """Pack the adapter's vectors; `layers` (default: the adapter's) may add zero layers,
        so that tables of different adapters of one family line up on one set of hooks.

        Raises:
            ValueError: `layers` leaves out a layer the adapter steers.
        """
        categories = tuple(adapter.categories)
        layers = tuple(adapter.layers) if layers is None else tuple(layers)
        missing = sorted(set(adapter.layers) - set(layers))
        if missing:
            raise ValueError(f"layers {missing} of the adapter are not among {list(layers)}")
        basis = torch.stack(
            [torch.stack([adapter.effective(c, layer) for layer in layers]) for c in categories]
        )
        defaults = torch.tensor(
            [adapter.metadata.categories[c].default_weight for c in categories],
            dtype=torch.float32,
        )
        return cls(categories, layers, basis.to(device=device, dtype=dtype), defaults)

    def weights(self, overrides: Mapping[str, float], strength: float = 1.0) -> torch.Tensor:
        """One row's category weights: defaults, with `overrides` by name, times `strength`.

        Raises:
            UnknownCategory: an override names a category the adapter does not have.
        """
        weights = self.default_weights.clone()
        for name, value in overrides.items():
            if name not in self.categories:
                raise UnknownCategory(name, list(self.categories))
            weights[self.categories.index(name)] = float(value)
        return weights * float(strength)

    def table(self, row_weights: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """The `[rows, layers, hidden]` steering table for rows of category weights."""
        weights = (
            row_weights if isinstance(row_weights, torch.Tensor) else torch.stack(list(row_weights))
        )
        weights = weights.to(device=self.basis.device, dtype=self.basis.dtype)
        flat = self.basis.reshape(len(self.categories), -1)
        return (weights @ flat).reshape(weights.shape[0], len(self.layers), -1)
