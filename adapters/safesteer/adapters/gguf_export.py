"""Export one category mix of a safety adapter as a llama.cpp control-vector GGUF.

The file holds what the server would add for a request with that mix: at each layer,
`strength * sum_c weight[c] * coefficient[c, l] * vector[c, l]` (`SteeringBasis` does the mix;
weights not named keep the adapter's default, as in the server's `safety` block).

Layer mapping, checked against llama.cpp's source (`common_control_vector_load_one` in
common/common.cpp, `llama_adapter_cvec` in src/llama-adapter.cpp, the model graphs'
`build_cvec(cur, il)`):

- the loader reads tensor `direction.N` (N >= 1; `direction.0` is rejected as invalid) into
  slot N of the control vector (`data[(N - 1) * n_embd ...]`, and `apply` copies that range
  into `tensors[N]`; there is never a tensor for slot 0);
- each model graph calls `build_cvec(cur, il)` on the output of decoder block `il`, with `il`
  the 0-based index of the block in its layer loop, and adds `tensors[il]` to it, at every
  token position.

So `direction.N` is added to the output of the 0-based decoder block N, which is safesteer's
layer N in its "decoder-output-0" convention: the index carries over unchanged, and layer 0
cannot be expressed (an adapter that steers there is refused). llama.cpp's own
`cvector-generator` writes the direction it measured at block il's output as `direction.il+1`,
one block later than where it was measured; this exporter follows the runtime, not that tool.

Like llama.cpp's writer, the file has one float32 tensor per slot 1 .. num_layers-1 (zero
where the adapter does not steer), `controlvector.layer_count` = num_layers - 1 and
`controlvector.model_hint` = the model architecture. Keys under `safesteer.` record the
adapter and the mix; llama.cpp ignores them. Use with `llama-server -m MODEL
--control-vector FILE` (the strength is baked in; `--control-vector-scaled FILE 1.0` is the
same).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFWriter

from safesteer.adapters.adapter import LAYER_CONVENTION, SafetyAdapter
from safesteer.adapters.table import MAX_WEIGHT, SteeringBasis

ARCHITECTURE = "controlvector"
MODEL_HINT_KEY = f"{ARCHITECTURE}.model_hint"
LAYER_COUNT_KEY = f"{ARCHITECTURE}.layer_count"


class ControlVectorExportError(ValueError):
    """The adapter or the mix cannot be written as a llama.cpp control vector."""


def direction_name(layer: int) -> str:
    """GGUF tensor name for safesteer layer `layer` ("decoder-output-0"): `direction.<layer>`.

    Raises:
        ControlVectorExportError: layer 0, which llama.cpp cannot steer.
    """
    if layer < 1:
        raise ControlVectorExportError(
            f"layer {layer} cannot be exported: llama.cpp control vectors start at the output "
            "of decoder layer 1 (direction.0 is invalid)"
        )
    return f"direction.{layer}"


@dataclass(frozen=True)
class ControlVector:
    """The mixed steering of one adapter, per safesteer layer, ready to write."""

    adapter_id: str
    adapter_sha256: str
    model_hint: str
    num_layers: int
    hidden_size: int
    weights: Mapping[str, float]  # per category, strength included
    directions: Mapping[int, torch.Tensor]  # safesteer layer -> [hidden], layers with steering

    @property
    def layer_count(self) -> int:
        """Slots in the file: one per decoder layer except layer 0."""
        return self.num_layers - 1

    def tensors(self) -> dict[str, np.ndarray]:
        """`direction.N` -> float32 [hidden] for N = 1 .. num_layers-1 (zeros if unsteered)."""
        zeros = torch.zeros(self.hidden_size)
        return {
            direction_name(layer): self.directions.get(layer, zeros)
            .detach()
            .to(torch.float32)
            .numpy()
            .copy()
            for layer in range(1, self.num_layers)
        }


def _check_mix(weights: Mapping[str, float], strength: float) -> None:
    if not math.isfinite(strength) or not 0 <= strength <= MAX_WEIGHT:
        raise ControlVectorExportError(f"strength must be between 0 and {MAX_WEIGHT:g}")
    for name, value in weights.items():
        if not math.isfinite(value) or not 0 <= value <= MAX_WEIGHT:
            raise ControlVectorExportError(
                f"weight of {name!r} is {value}; weights must be between 0 and {MAX_WEIGHT:g}"
            )


def mix_control_vector(
    adapter: SafetyAdapter,
    weights: Mapping[str, float] | None = None,
    *,
    strength: float = 1.0,
    only: bool = False,
) -> ControlVector:
    """The control vector of one mix: `weights` override the adapter's default weights.

    With `only`, categories not in `weights` get weight 0 instead of their default.

    Raises:
        ControlVectorExportError: a weight or the strength is out of range, the mix adds
            nothing at any layer, or it steers layer 0.
        UnknownCategory: `weights` names a category the adapter does not have.
    """
    if adapter.metadata.layer_convention != LAYER_CONVENTION:
        raise ControlVectorExportError(
            f"adapter layer convention {adapter.metadata.layer_convention!r} is not "
            f"{LAYER_CONVENTION!r}"
        )
    given = dict(weights or {})
    _check_mix(given, strength)
    basis = SteeringBasis.from_adapter(adapter)
    overrides = {**dict.fromkeys(basis.categories, 0.0), **given} if only else given
    row = basis.weights(overrides, strength)
    mixed = basis.table(row[None])[0]  # [layers, hidden]
    directions = {
        layer: mixed[index] for index, layer in enumerate(basis.layers) if mixed[index].any()
    }
    if not directions:
        applied = ", ".join(f"{c}={float(w):g}" for c, w in zip(basis.categories, row, strict=True))
        raise ControlVectorExportError(
            f"the mix adds nothing at any layer (weight x strength per category: {applied}); "
            "give at least one category a positive weight"
        )
    if 0 in directions:
        raise ControlVectorExportError(
            "the mix steers layer 0, which llama.cpp control vectors cannot express (they "
            "start at the output of decoder layer 1); give the categories steering layer 0 "
            "weight 0, or export an adapter without layer 0"
        )
    return ControlVector(
        adapter_id=adapter.id,
        adapter_sha256=adapter.payload_sha256,
        model_hint=adapter.metadata.architecture,
        num_layers=adapter.metadata.num_layers,
        hidden_size=adapter.metadata.hidden_size,
        weights={c: float(w) for c, w in zip(basis.categories, row, strict=True)},
        directions=directions,
    )


def write_control_vector(vector: ControlVector, path: str | Path) -> Path:
    """Write `vector` as a llama.cpp control-vector GGUF (atomically) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = GGUFWriter(tmp, ARCHITECTURE)
    writer.add_string(MODEL_HINT_KEY, vector.model_hint)
    writer.add_int32(LAYER_COUNT_KEY, vector.layer_count)
    writer.add_name(vector.adapter_id)
    writer.add_string("safesteer.adapter_id", vector.adapter_id)
    writer.add_string("safesteer.adapter_sha256", vector.adapter_sha256)
    writer.add_string("safesteer.weights", json.dumps(dict(vector.weights), sort_keys=True))
    writer.add_string(
        "safesteer.layer_mapping",
        "direction.N is added to the output of decoder layer N (0-based) = safesteer layer N",
    )
    for name, tensor in vector.tensors().items():
        writer.add_tensor(name, tensor)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    tmp.replace(path)
    return path


def export_control_vector(
    adapter: SafetyAdapter,
    path: str | Path,
    weights: Mapping[str, float] | None = None,
    *,
    strength: float = 1.0,
    only: bool = False,
) -> ControlVector:
    """Mix (`mix_control_vector`) and write (`write_control_vector`) in one step."""
    vector = mix_control_vector(adapter, weights, strength=strength, only=only)
    write_control_vector(vector, path)
    return vector
