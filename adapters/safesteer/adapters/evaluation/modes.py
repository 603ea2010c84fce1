"""Evaluation modes as strategies: how one batch of prompts is steered, and what steered it.

A mode's `generation(prompts)` is the context a batch of chat prompts is generated in (one row
per prompt, in that order); `scoring(prompts)` is the context of one forward pass over rows
that start with those prompts and continue with an answer to score. Both yield a list that
holds, once the context has exited, a `RowSteering` per row: the categories that steered it
and, in gated modes, the categories whose gate fired.

`gated` decides at the prefill (`SteeringHooks.gated_steering`). For scoring, the gate decides
on the question prompt alone (a prompt-only pass), and the answer is then scored with the
weights it chose, as if the model had been asked the question and were writing that answer.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.extract import chat_prompt_ids
from safesteer.adapters.gating import PromptGate
from safesteer.adapters.hooks import SteeringHooks
from safesteer.adapters.loading import LoadedModel
from safesteer.adapters.merging import MergingBasis
from safesteer.adapters.padding import left_pad
from safesteer.adapters.table import SteeringBasis

NONE = "none"
ALWAYS = "always"
GATED = "gated"
MODE_NAMES: tuple[str, ...] = (NONE, ALWAYS, GATED)


@dataclass(frozen=True)
class RowSteering:
    """What steered one row: categories with a non-zero weight; gate firings (None: no gate)."""

    steered: tuple[str, ...] = ()
    fired: tuple[str, ...] | None = None


class SteeringMode(Protocol):
    """One way of steering, bound to a model."""

    @property
    def name(self) -> str: ...

    def generation(self, prompts: Sequence[str]) -> AbstractContextManager[list[RowSteering]]: ...

    def scoring(self, prompts: Sequence[str]) -> AbstractContextManager[list[RowSteering]]: ...

    def without(self, category: str) -> SteeringMode:
        """The same mode with `category` switched off (weight 0), the others unchanged."""
        ...


class Unsteered:
    """The plain model: no table is set, so the hooks (if any) leave every output alone."""

    name = NONE

    @contextmanager
    def generation(self, prompts: Sequence[str]) -> Iterator[list[RowSteering]]:
        yield [RowSteering() for _ in prompts]

    def scoring(self, prompts: Sequence[str]) -> AbstractContextManager[list[RowSteering]]:
        return self.generation(prompts)

    def without(self, category: str) -> Unsteered:
        del category
        return self


def _nonzero(categories: Sequence[str], weights: torch.Tensor) -> tuple[str, ...]:
    return tuple(c for c, w in zip(categories, weights.tolist(), strict=True) if w != 0.0)


class AlwaysSteered:
    """Every row steered with the same category weights (the adapter's defaults by default)."""

    def __init__(
        self,
        hooks: SteeringHooks,
        basis: SteeringBasis,
        overrides: Mapping[str, float] | None = None,
        name: str = ALWAYS,
    ) -> None:
        self.name = name
        self._hooks = hooks
        self._basis = basis
        self._overrides = dict(overrides or {})
        self._weights = basis.weights(self._overrides)
        self._row = RowSteering(_nonzero(basis.categories, self._weights))

    @contextmanager
    def generation(self, prompts: Sequence[str]) -> Iterator[list[RowSteering]]:
        table = self._basis.table(self._weights.expand(len(prompts), -1))
        with self._hooks.steering(table):
            yield [self._row for _ in prompts]

    def scoring(self, prompts: Sequence[str]) -> AbstractContextManager[list[RowSteering]]:
        return self.generation(prompts)

    def without(self, category: str) -> AlwaysSteered:
        overrides = {**self._overrides, category: 0.0}
        return AlwaysSteered(self._hooks, self._basis, overrides, f"{self.name} -{category}")


class GatedSteered:
    """Each row steered by the categories whose gate fires on its prompt (at their weights)."""

    def __init__(
        self,
        loaded: LoadedModel,
        hooks: SteeringHooks,
        basis: SteeringBasis,
        gate: PromptGate,
        overrides: Mapping[str, float] | None = None,
        name: str = GATED,
    ) -> None:
        self.name = name
        self._loaded = loaded
        self._hooks = hooks
        self._basis = basis
        self._gate = gate
        self._overrides = dict(overrides or {})
        self._weights = basis.weights(self._overrides)

    @contextmanager
    def generation(self, prompts: Sequence[str]) -> Iterator[list[RowSteering]]:
        tokenizer = self._loaded.tokenizer
        # The same ids and left padding as the batch's prefill, so the gate pools the same rows.
        ids = [chat_prompt_ids(tokenizer, prompt) for prompt in prompts]
        _, mask = left_pad(ids, 0)
        gated = self._weights.expand(len(prompts), -1)
        rows: list[RowSteering] = []
        with self._hooks.gated_steering(
            self._basis, self._gate, torch.zeros_like(gated), gated, mask
        ) as run:
            yield rows
        if run.decision is None:
            raise RuntimeError("no forward pass ran inside the gated context")
        for fired, weights in zip(run.fired_categories(), run.decision.weights, strict=True):
            rows.append(RowSteering(_nonzero(self._basis.categories, weights), tuple(fired)))

    @contextmanager
    def scoring(self, prompts: Sequence[str]) -> Iterator[list[RowSteering]]:
        unique = list(dict.fromkeys(prompts))
        decided = self._decide(unique)
        rows = [decided[prompt] for prompt in prompts]
        weights = [self._weights * self._mask(row.steered) for row in rows]
        with self._hooks.steering(self._basis.table(weights)):
            yield rows

    def _mask(self, categories: Sequence[str]) -> torch.Tensor:
        return torch.tensor([float(c in categories) for c in self._basis.categories])

    @torch.inference_mode()
    def _decide(self, prompts: Sequence[str]) -> dict[str, RowSteering]:
        """The gate's decision on each prompt alone (a prefill of the prompts, nothing more)."""
        tokenizer = self._loaded.tokenizer
        input_ids, mask = left_pad([chat_prompt_ids(tokenizer, p) for p in prompts], 0)
        with self.generation(prompts) as rows:
            self._loaded.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=False,
                logits_to_keep=1,
            )
        return dict(zip(prompts, rows, strict=True))

    def without(self, category: str) -> GatedSteered:
        overrides = {**self._overrides, category: 0.0}
        return GatedSteered(
            self._loaded,
            self._hooks,
            self._basis,
            self._gate,
            overrides,
            f"{self.name} -{category}",
        )


class ModeSet:
    """The hooks of one model and adapter, and the modes built on them; `close()` unhooks.

    `merge` is how a row's categories combine (`safesteer.adapters.merging`), as the server's
    per-family `merge` setting does.
    """

    def __init__(
        self, loaded: LoadedModel, adapter: SafetyAdapter | None, merge: str = "naive"
    ) -> None:
        self.loaded = loaded
        self.adapter = adapter
        self.merge = merge
        self.basis = (
            MergingBasis.of(SteeringBasis.from_adapter(adapter), merge)
            if adapter is not None
            else None
        )
        self.hooks = (
            SteeringHooks(loaded.model, loaded.family.num_layers, self.basis.layers)
            if self.basis is not None
            else None
        )

    def mode(self, name: str) -> SteeringMode:
        """The mode called `name` (one of `MODE_NAMES`).

        Raises:
            ValueError: the name is unknown, or the mode needs an adapter (or a gate) that
                is not there.
        """
        if name == NONE:
            return Unsteered()
        if name not in MODE_NAMES:
            raise ValueError(f"unknown mode {name!r}; known: {', '.join(MODE_NAMES)}")
        if self.adapter is None or self.hooks is None or self.basis is None:
            raise ValueError(f"mode {name!r} needs an adapter (--adapter FILE)")
        if name == ALWAYS:
            return AlwaysSteered(self.hooks, self.basis)
        if self.adapter.metadata.gate is None:
            raise ValueError(
                f"mode 'gated' needs an adapter with a gate; {self.adapter.id} has none"
            )
        return GatedSteered(
            self.loaded, self.hooks, self.basis, PromptGate.from_adapter(self.adapter)
        )

    def close(self) -> None:
        if self.hooks is not None:
            self.hooks.remove()


def default_modes(adapter: SafetyAdapter | None) -> tuple[str, ...]:
    """Without `--mode`: the plain model, and the adapter's own default mode if there is one."""
    if adapter is None:
        return (NONE,)
    return (NONE, GATED if adapter.metadata.gate is not None else ALWAYS)
