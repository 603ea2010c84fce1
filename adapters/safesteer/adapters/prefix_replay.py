"""Replay the lower decoder layers of a batch instead of computing them again.

Calibration scores the same prompts under many steering settings that differ only from some
decoder layer `d` upward: everything below `d` is the same in every pass. `PrefixReplay`
records what layer `d - 1` outputs for a batch once (under a key naming the batch and whatever
steering the layers below `d` had) and, in later passes with that key, swaps layers
`0 .. d - 1` for stand-ins that return the recorded output. The embedding still runs (a
lookup), the layers from `d` on run as usual with their hooks, and the logits are those of
the full pass (tested bit for bit on tiny Llama, Qwen2, Gemma and Mistral models).

Requirements the caller keeps: the same inputs (ids, mask, positions) for one key, no KV
cache (`use_cache=False`), and forward hooks that change layers below `d` (steering) already
installed when the output is recorded, so that it includes them.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from safesteer.adapters.layers import decoder_layers


class _Replayed(nn.Module):
    """Stands in for a decoder layer: returns a recorded output, whatever it is given."""

    def __init__(self, original: nn.Module, output: Any) -> None:
        super().__init__()
        # Plain attributes, not submodules: the stand-in owns no parameters.
        self.__dict__["_original"] = original
        self.__dict__["_output"] = output

    def forward(self, *_args: Any, **_kwargs: Any) -> Any:
        return self.__dict__["_output"]

    def __getattr__(self, name: str) -> Any:
        # A model's forward may read attributes of its layers (an attention type, an index).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_original"], name)


class PrefixReplay:
    """Recorded outputs of lower decoder layers, by key; `run` records or replays them."""

    def __init__(self, model: nn.Module, num_layers: int) -> None:
        self._layers = decoder_layers(model, num_layers)
        self._outputs: dict[Hashable, Any] = {}

    def __len__(self) -> int:
        return len(self._outputs)

    def recorded(self, key: Hashable) -> bool:
        return key in self._outputs

    @contextmanager
    def run(
        self, key: Hashable, depth: int, shallower: tuple[Hashable, int] | None = None
    ) -> Iterator[bool]:
        """One forward pass inside: layers `0 .. depth - 1` replayed if `key` was recorded.

        Yields True when it replays at `depth`. Otherwise the output of layer `depth - 1` is
        recorded under `key` during the pass, which replays `shallower` (`(key, depth)` of an
        earlier recording valid for this pass) when that was recorded, else runs in full.
        `depth` 0 does nothing.

        Raises:
            ValueError: a depth outside `0 .. number of layers - 1`, or a shallower one that
                is deeper than `depth`.
        """
        self._check(depth)
        if depth == 0:
            yield False
            return
        recorded = self._outputs.get(key)
        if recorded is not None:
            with self._replaying(depth, recorded):
                yield True
            return
        below, below_depth = shallower if shallower is not None else (None, 0)
        self._check(below_depth)
        if below_depth > depth:
            raise ValueError(f"shallower depth {below_depth} is deeper than {depth}")
        earlier = self._outputs.get(below) if below_depth > 0 else None

        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            self._outputs[key] = output

        # Appended after any steering hook on that layer, so it records the steered output.
        handle = self._layers[depth - 1].register_forward_hook(hook)
        try:
            if earlier is not None and below_depth < depth:
                with self._replaying(below_depth, earlier):
                    yield False
            else:
                yield False
        finally:
            handle.remove()

    def _check(self, depth: int) -> None:
        if not 0 <= depth < len(self._layers):
            raise ValueError(f"replay depth {depth} outside 0..{len(self._layers) - 1}")

    @contextmanager
    def _replaying(self, depth: int, output: Any) -> Iterator[None]:
        originals = [self._layers[i] for i in range(depth)]
        for i, original in enumerate(originals):
            self._layers[i] = _Replayed(original, output)
        try:
            yield
        finally:
            for i, original in enumerate(originals):
                self._layers[i] = original
