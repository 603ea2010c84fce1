"""Forward hooks that add a per-row steering table to decoder-layer outputs.

Hooks are installed once per model. Before each forward pass the caller sets a table
`[rows, layers, hidden]` (or none): the hook on adapter layer `j` adds `table[r, j]` to every
position of row `r`. With no table set a hook returns the layer's output untouched.

Gated steering (`gated_steering`) decides the table inside the first forward pass: a hook on
the gate's detection layer (installed on first use, kept until `remove()`) evaluates the
condition probes on the prefill and sets the table before any steering layer runs, so the
prefill is steered without a second pass; later passes (decode steps) reuse that table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from safesteer.adapters.layers import decoder_layers
from safesteer.adapters.table import SteeringBasis

if TYPE_CHECKING:
    from safesteer.adapters.gating import GateDecision, PromptGate

# Callbacks on decoder-layer outputs during a forward pass, by layer index.
Observers = Mapping[int, Callable[[torch.Tensor], None]]


@dataclass(eq=False)
class GatedSteering:
    """One gated run: the rows' weights before, and the gate's decision after the prefill."""

    basis: SteeringBasis
    gate: PromptGate
    forced: torch.Tensor  # [rows, categories]
    gated: torch.Tensor  # [rows, categories]
    attention_mask: torch.Tensor  # [rows, prompt positions]
    decision: GateDecision | None = field(default=None, init=False)
    table: torch.Tensor | None = field(default=None, init=False)  # None: no row steered

    @property
    def fired(self) -> torch.Tensor:
        """`[rows, categories]` bool: which probes fired per row (after the prefill)."""
        if self.decision is None:
            raise RuntimeError("the gate has not been evaluated: no forward pass ran yet")
        return self.decision.fired

    def fired_categories(self) -> list[list[str]]:
        """Per row, the names of the categories whose probes fired."""
        return self.gate.names(self.fired)

    def evaluate(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Decide from the detection layer's prefill output; return the table (None: none)."""
        decision = self.gate.decide(hidden, self.attention_mask, self.forced, self.gated)
        self.decision = decision
        steered = bool(decision.steered.any())
        self.table = self.basis.table(decision.weights) if steered else None
        return self.table


class SteeringHooks:
    """Hooks on the given decoder layers of one model; `remove()` takes them off again."""

    def __init__(self, model: nn.Module, num_layers: int, layers: Sequence[int]) -> None:
        modules = decoder_layers(model, num_layers)
        self._modules = modules
        config = getattr(model, "config", None)
        text_config = config.get_text_config() if config is not None else None
        self.hidden_size: int | None = getattr(text_config, "hidden_size", None)
        self.layers: tuple[int, ...] = tuple(layers)
        self._table: torch.Tensor | None = None
        self._pending: GatedSteering | None = None  # a gated run waiting for its prefill
        self._detectors: dict[int, RemovableHandle] = {}
        self._observers: Observers | None = None
        self._observer_handles: dict[int, RemovableHandle] = {}
        self._removed = False
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
    def steering(
        self, table: torch.Tensor | None, observers: Observers | None = None
    ) -> Iterator[None]:
        """Apply `table` (`[rows, len(layers), hidden]`, or None for no steering) inside.

        `observers` maps decoder layers to callbacks that get the layer's (steered) output
        during each forward pass inside; a callback may change `table` in place to steer the
        layers after it (the engine decides gated rows this way at their prefill).
        """
        if table is not None and (
            table.ndim != 3
            or table.shape[1] != len(self.layers)
            or (self.hidden_size is not None and table.shape[2] != self.hidden_size)
        ):
            raise ValueError(
                f"steering table must be [rows, {len(self.layers)}, {self.hidden_size}], got "
                f"{tuple(table.shape)}"
            )
        for layer in observers or {}:
            self._observe(layer)
        previous = self._table, self._pending, self._observers
        self._table, self._pending, self._observers = table, None, observers
        try:
            yield
        finally:
            self._table, self._pending, self._observers = previous

    @contextmanager
    def gated_steering(
        self,
        basis: SteeringBasis,
        gate: PromptGate,
        forced: torch.Tensor,
        gated: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> Iterator[GatedSteering]:
        """Steer rows by `forced + gated * fired`, `fired` decided at the first forward pass.

        The first pass inside must be the prefill of the prompts that `attention_mask`
        (`[rows, prompt length]`) describes; `forced` and `gated` are `[rows, categories]`
        weights in `basis` order. The yielded run holds, after that pass, the decision (which
        categories fired per row) and the table (None when no row is steered).

        Raises:
            ValueError: the basis is not for these hooks' layers, the gate's categories are
                not the basis's, the weights are not `[rows, categories]` for the mask's rows,
                or a steering layer does not come after the detection layer.
        """
        if tuple(basis.layers) != self.layers:
            raise ValueError(f"basis layers {list(basis.layers)} are not the hooks' {self.layers}")
        if tuple(gate.categories) != tuple(basis.categories):
            raise ValueError("the gate's categories are not the basis's (same order)")
        expected = (attention_mask.shape[0], len(basis.categories))
        if attention_mask.ndim != 2 or forced.shape != expected or gated.shape != expected:
            raise ValueError(
                f"forced {tuple(forced.shape)} and gated {tuple(gated.shape)} weights must be "
                f"[rows, categories] = {list(expected)} for a [rows, seq] attention mask"
            )
        live = basis.basis.ne(0).any(dim=2).any(dim=0).tolist()  # one sync, not one per layer
        early = [
            layer
            for layer, steers in zip(self.layers, live, strict=True)
            if layer <= gate.detection_layer and steers
        ]
        if early:
            raise ValueError(
                f"steering layers {early} do not come after detection layer "
                f"{gate.detection_layer}: the gate would decide too late for them"
            )
        run = GatedSteering(basis, gate, forced, gated, attention_mask)
        self._detector(gate.detection_layer)
        previous = self._table, self._pending
        self._table, self._pending = None, run
        try:
            yield run
        finally:
            self._table, self._pending = previous

    def _detector(self, layer: int) -> None:
        if layer in self._detectors or self._removed:
            return

        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            run = self._pending
            if run is None or run.gate.detection_layer != layer:
                return
            self._pending = None
            self._table = run.evaluate(output[0] if isinstance(output, tuple) else output)

        self._detectors[layer] = self._modules[layer].register_forward_hook(hook)

    def _observe(self, layer: int) -> None:
        if layer in self._observer_handles or self._removed:
            return

        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            callback = (self._observers or {}).get(layer)
            if callback is not None:
                callback(output[0] if isinstance(output, tuple) else output)

        self._observer_handles[layer] = self._modules[layer].register_forward_hook(hook)

    def remove(self) -> None:
        handles = [*self._handles, *self._detectors.values(), *self._observer_handles.values()]
        for handle in handles:
            handle.remove()
        self._handles.clear()
        self._detectors.clear()
        self._observer_handles.clear()
        self._removed = True
