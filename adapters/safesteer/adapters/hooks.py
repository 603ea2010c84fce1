"""Forward hooks that add a per-row steering table to decoder-layer outputs.

Hooks are installed once per model. Before each forward pass the caller sets a table
`[rows, layers, hidden]` (or none): the hook on adapter layer `j` adds `table[r, j]` to every
position of row `r`. With no table set a hook returns the layer's output untouched.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from safesteer.adapters.layers import decoder_layers


class SteeringHooks:
    """Hooks on the given decoder layers of one model; `remove()` takes them off again."""

    def __init__(self, model: nn.Module, num_layers: int, layers: Sequence[int]) -> None:
        modules = decoder_layers(model, num_layers)
        config = getattr(model, "config", None)
        text_config = config.get_text_config() if config is not None else None
        self.hidden_size: int | None = getattr(text_config, "hidden_size", None)
        self.layers: tuple[int, ...] = tuple(layers)
        self._table: torch.Tensor | None = None
        self._handles: list[RemovableHandle] = [
            modules[layer].register_forward_hook(self._make_hook(slot))
            for slot, layer in enumerate(self.layers)
        ]

    def _make_hook(self, slot: int) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            table = self._table
            if table is None:
                return output
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.shape[0] != table.shape[0]:
                raise RuntimeError(
                    f"steering table has {table.shape[0]} rows, batch has {hidden.shape[0]}"
                )
            steered = hidden + table[:, slot, None, :].to(hidden.dtype)
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        return hook

    @contextmanager
    def steering(self, table: torch.Tensor | None) -> Iterator[None]:
        """Apply `table` (`[rows, len(layers), hidden]`, or None for no steering) inside."""
        if table is not None and (
            table.ndim != 3
            or table.shape[1] != len(self.layers)
            or (self.hidden_size is not None and table.shape[2] != self.hidden_size)
        ):
            raise ValueError(
                f"steering table must be [rows, {len(self.layers)}, {self.hidden_size}], got "
                f"{tuple(table.shape)}"
            )
        previous, self._table = self._table, table
        try:
            yield
        finally:
            self._table = previous

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
