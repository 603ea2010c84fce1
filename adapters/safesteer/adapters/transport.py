"""Cross-family transport: carry an adapter of one model family into another's residual stream.

Two models that read the same prompts have residual streams related, to a useful degree, by a
linear map (after arXiv 2606.05290). `transport_adapter` fits such maps on **benign prompts
only** and pushes a source adapter's vectors (and its gate, if it has one) through them:

1. **Layers.** Source layer `l` of `L_s` goes to the target layer at the same relative depth,
   `round((l + 1) * L_t / L_s) - 1` (the output of block `l` lies `(l + 1) / L_s` of the way
   through the stack).
2. **Maps.** For every pair of layers used (steering layers, and the gate's detection layer),
   both models' pooled prompt activations on the fit prompts (each prompt in each model's own
   chat template; `mean` and `last` pooling stacked as samples, so a map covers both), centred;
   ridge regression `W = argmin |Y - X W|^2 + lam |W|^2` with `lam = ridge * trace(X^T X) / d`
   (`d` the input width). Reported: R^2 (within each pooling) of a map fitted on four fifths
   of the prompts on the fifth it never saw; the map used is then fitted on all of them.
3. **Vectors.** A category's effective vector `e` (coefficient x vector) at source layer `l`
   becomes `e W` at target layer `l'`, rescaled so that its norm relative to the target
   layer's typical norm equals `|e|` relative to the source layer's (typical norm: the mean
   norm of the layer's output at the last prompt token over the fit prompts). The same push,
   in the target's units. Stored as a unit vector with that norm as its coefficient.
4. **Gate.** A source probe scores `d . x_s + b`. With `M` the reverse map (target -> source)
   at the detection layers, `x_s ~ (x_t - mu_t) M + mu_s`, so the target probe is `M d` with
   bias `b + d . mu_s - (M d) . mu_t`. Its thresholds are calibrated again on the target's
   benign calibration prompts, to the source gate's target false-positive rate for the union
   of categories (`gating.calibrate_thresholds`, scope `any`).

The result is an ordinary adapter of the target family (its fingerprint, `recipe.method =
"transport"`, the layer map, the ridge, every map's R^2 and sha256, and the prompts' digest in
its recipe), served and evaluated like any other. `python -m safesteer.adapters.transport
A.safetensors B.safetensors` prints the cosine similarity of two adapters' effective vectors
per category and layer (e.g. transported against natively extracted).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from safesteer.adapters.adapter import (
    AdapterMetadata,
    CategoryGate,
    GateSpec,
    SafetyAdapter,
)
from safesteer.adapters.extract import package_version
from safesteer.adapters.gating import calibrate_thresholds, prompt_activations
from safesteer.adapters.loading import LoadedModel

DEFAULT_RIDGE = 0.1
HELD_OUT_EVERY = 5  # every fifth fit prompt measures the map's R^2
POOLINGS_STACKED: tuple[str, ...] = ("mean", "last")


def corresponding_layer(layer: int, source_layers: int, target_layers: int) -> int:
    """The target layer at the relative depth of source layer `layer` (0-based outputs).

    Raises:
        ValueError: `layer` is not a layer of the source.
    """
    if not 0 <= layer < source_layers:
        raise ValueError(f"layer {layer} outside 0..{source_layers - 1}")
    mapped = round((layer + 1) * target_layers / source_layers) - 1
    return min(max(mapped, 0), target_layers - 1)


@dataclass(frozen=True)
class LinearMap:
    """`y ~ (x - x_mean) @ weight + y_mean`, fitted by ridge regression."""

    weight: torch.Tensor  # [d_in, d_out], float64
    x_mean: torch.Tensor  # [d_in]
    y_mean: torch.Tensor  # [d_out]
    ridge: float
    held_out_r2: float  # R^2 on prompts the map was not fitted on (nan: too few prompts)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (x.double() - self.x_mean) @ self.weight + self.y_mean

    def sha256(self) -> str:
        return hashlib.sha256(self.weight.float().contiguous().numpy().tobytes()).hexdigest()


def _ridge_weight(x: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    gram = x.T @ x
    lam = ridge * float(gram.diagonal().sum()) / x.shape[1]
    gram += torch.eye(x.shape[1], dtype=torch.float64) * max(lam, 1e-12)
    weight: torch.Tensor = torch.linalg.solve(gram, x.T @ y)
    return weight


def r_squared(
    predicted: torch.Tensor, actual: torch.Tensor, groups: torch.Tensor | None = None
) -> float:
    """1 - residual sum of squares / total sum of squares around `actual`'s mean.

    With `groups` (`[rows]` labels), the total is taken around each group's own mean, so a
    map gets no credit for telling the groups (e.g. poolings) apart.
    """
    residual = float(((actual - predicted) ** 2).sum())
    centres = actual.mean(0).expand_as(actual).clone()
    if groups is not None:
        for label in sorted(set(groups.tolist())):
            rows = groups == label
            centres[rows] = actual[rows].mean(0)
    total = float(((actual - centres) ** 2).sum())
    return 1.0 - residual / total if total > 0 else float("nan")


def fit_linear_map(
    x: torch.Tensor, y: torch.Tensor, ridge: float = DEFAULT_RIDGE, groups: int | None = None
) -> LinearMap:
    """Ridge map from rows of `x` `[n, d_in]` to rows of `y` `[n, d_out]`.

    Rows come in `groups` consecutive blocks of the same prompts (one block per pooling); a
    prompt's rows are held out together when measuring R^2 (every `HELD_OUT_EVERY`-th prompt),
    which is taken within each block (`r_squared` with groups).

    Raises:
        ValueError: the row counts differ, there are fewer than 2 rows, or `ridge` < 0.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} source rows but {y.shape[0]} target rows")
    if x.shape[0] < 2:
        raise ValueError("a map needs at least 2 prompts")
    if ridge < 0:
        raise ValueError("ridge must not be negative")
    x, y = x.double(), y.double()
    rows = x.shape[0]
    blocks = groups or 1
    prompts = rows // blocks
    held = torch.tensor([(i % prompts) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 for i in range(rows)])
    held_out_r2 = float("nan")
    if prompts >= 2 * HELD_OUT_EVERY:
        fit_x, fit_y = x[~held], y[~held]
        x_mean, y_mean = fit_x.mean(0), fit_y.mean(0)
        weight = _ridge_weight(fit_x - x_mean, fit_y - y_mean, ridge)
        block = torch.arange(rows) // prompts
        predicted = (x[held] - x_mean) @ weight + y_mean
        held_out_r2 = r_squared(predicted, y[held], block[held])
    x_mean, y_mean = x.mean(0), y.mean(0)
    weight = _ridge_weight(x - x_mean, y - y_mean, ridge)
    return LinearMap(weight, x_mean, y_mean, ridge, held_out_r2)


@dataclass(frozen=True)
class PooledActivations:
    """Per layer: both poolings stacked `[2n, hidden]`, and the typical per-token norm."""

    stacked: Mapping[int, torch.Tensor]
    typical_norm: Mapping[int, float]


def pooled_activations(
    loaded: LoadedModel,
    prompts: Sequence[str],
    layers: Sequence[int],
    *,
    batch_size: int = 16,
    show_progress: bool = True,
    desc: str = "activations",
) -> PooledActivations:
    """`mean` then `last` pooled outputs of `layers` on `prompts`, and their typical norms."""
    ordered = sorted(set(layers))
    acts = prompt_activations(
        loaded.model,
        loaded.tokenizer,
        prompts,
        ordered,
        batch_size=batch_size,
        show_progress=show_progress,
        desc=desc,
    )
    stacked = {
        layer: torch.cat([acts[p][:, slot] for p in POOLINGS_STACKED])
        for slot, layer in enumerate(ordered)
    }
    norms = {
        layer: float(acts["last"][:, slot].norm(dim=-1).mean())
        for slot, layer in enumerate(ordered)
    }
    return PooledActivations(stacked, norms)


@dataclass(frozen=True)
class TransportConfig:
    """How to transport; every field ends up in the adapter's recipe."""

    ridge: float = DEFAULT_RIDGE
    gate: bool = True  # transport the gate too (when the source has one)
    name: str | None = None
    batch_size: int = 16
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.ridge < 0:
            raise ValueError("ridge must not be negative")
        if self.batch_size < 1:
            raise ValueError("batch size must be positive")


@dataclass(frozen=True)
class TransportResult:
    """The transported adapter and the maps it went through."""

    adapter: SafetyAdapter
    layer_map: Mapping[int, int]  # source layer -> target layer
    maps: Mapping[int, LinearMap]  # by source layer: source -> target


def _digest(prompts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


def transport_adapter(
    source: SafetyAdapter,
    source_model: LoadedModel,
    target_model: LoadedModel,
    fit_prompts: Sequence[str],
    calibration_prompts: Sequence[str] = (),
    config: TransportConfig | None = None,
) -> TransportResult:
    """`source` (an adapter of `source_model`'s family) carried into `target_model`'s family.

    `fit_prompts` (benign) fit the maps; `calibration_prompts` (benign; default: the fit
    prompts) calibrate the transported gate's thresholds.

    Raises:
        AdapterMismatch: `source` does not fit `source_model`.
        ValueError: too few prompts, or the gate's detection layer would not come before the
            steering layers in the target.
    """
    config = config or TransportConfig()
    source.check_fits(source_model.family)
    s_layers, t_layers = source_model.family.num_layers, target_model.family.num_layers
    layer_map = {la: corresponding_layer(la, s_layers, t_layers) for la in source.layers}
    if len(set(layer_map.values())) != len(layer_map):
        raise ValueError(f"two source layers land on one target layer: {layer_map}")
    gate = source.metadata.gate if config.gate else None
    target_of = dict(layer_map)  # every source layer read -> its target layer
    if gate is not None:
        detection = corresponding_layer(gate.detection_layer, s_layers, t_layers)
        early = [t for t in layer_map.values() if t <= detection]
        if early:
            raise ValueError(
                f"the gate's detection layer {gate.detection_layer} lands on target layer "
                f"{detection}, not before steering layers {early}; transport without the gate"
            )
        target_of[gate.detection_layer] = detection
    prompts = list(fit_prompts)
    if len(prompts) < 2:
        raise ValueError("transport needs at least 2 fit prompts")
    options: dict[str, Any] = {
        "batch_size": config.batch_size,
        "show_progress": config.show_progress,
    }
    src = pooled_activations(source_model, prompts, sorted(target_of), desc="source", **options)
    tgt = pooled_activations(
        target_model, prompts, sorted(set(target_of.values())), desc="target", **options
    )
    groups = len(POOLINGS_STACKED)
    maps = {
        la: fit_linear_map(src.stacked[la], tgt.stacked[layer_map[la]], config.ridge, groups)
        for la in layer_map
    }
    vectors: dict[str, dict[int, torch.Tensor]] = {}
    coefficients: dict[str, dict[int, float]] = {}
    for category in source.categories:
        vectors[category], coefficients[category] = {}, {}
        for la, target_layer in layer_map.items():
            effective = source.effective(category, la).double()
            moved = effective @ maps[la].weight
            relative = float(effective.norm()) / src.typical_norm[la]
            norm = relative * tgt.typical_norm[target_layer]
            length = float(moved.norm())
            if length == 0.0 or norm == 0.0:
                raise ValueError(f"category {category!r} at layer {la} maps to a zero vector")
            vectors[category][target_layer] = (moved / length).float()
            coefficients[category][target_layer] = norm
    recipe: dict[str, Any] = {
        "method": "transport",
        "description": (
            "vectors of the source adapter pushed through ridge maps between the two "
            "families' residual streams, fitted on benign prompts only (safesteer.adapters."
            "transport)"
        ),
        "source": {
            "adapter": source.id,
            "family": source.metadata.family,
            "model": source_model.name,
        },
        "model": {
            "name": target_model.name,
            "source": target_model.source,
            "family_alias": target_model.family.alias,
        },
        "layer_map": {str(s): t for s, t in layer_map.items()},
        "layer_rule": "target = round((source + 1) * L_target / L_source) - 1",
        "map": {
            "kind": "ridge",
            "ridge": config.ridge,
            "poolings": list(POOLINGS_STACKED),
            "fit_prompts": len(prompts),
            "fit_prompts_sha256": _digest(prompts),
            "held_out_every": HELD_OUT_EVERY,
            "held_out_r2": {str(la): round(m.held_out_r2, 4) for la, m in maps.items()},
            "weight_sha256": {str(la): m.sha256() for la, m in maps.items()},
        },
        "norm_rule": (
            "|e_target| / typical_norm_target[l'] = |e_source| / typical_norm_source[l]; "
            "typical_norm: mean norm of the layer's output at the last prompt token over "
            "the fit prompts"
        ),
        "typical_norm": {
            "source": {str(la): round(src.typical_norm[la], 3) for la in layer_map},
            "target": {str(t): round(tgt.typical_norm[t], 3) for t in layer_map.values()},
        },
        "merge": source.metadata.recipe.get("merge", "orthogonal"),
        "safesteer_version": package_version(),
    }
    name = config.name or f"{target_model.family.alias}-safety-transported"
    metadata = AdapterMetadata.for_family(
        name,
        target_model.family,
        source.metadata.categories,
        base_fingerprint=target_model.fingerprint,
        recipe=recipe,
    )
    adapter = SafetyAdapter(metadata, vectors, coefficients)
    if gate is not None:
        adapter, gate_recipe = _transport_gate(
            source,
            adapter,
            src,
            tgt,
            target_model,
            list(calibration_prompts) or prompts,
            target_of[gate.detection_layer],
            config,
        )
        recipe["gate"] = gate_recipe
        adapter = replace(adapter, metadata=replace(adapter.metadata, recipe=recipe))
    return TransportResult(adapter, layer_map, maps)


def _transport_gate(
    source: SafetyAdapter,
    adapter: SafetyAdapter,
    src: PooledActivations,
    tgt: PooledActivations,
    target_model: LoadedModel,
    calibration_prompts: list[str],
    target_detection: int,
    config: TransportConfig,
) -> tuple[SafetyAdapter, dict[str, Any]]:
    gate = source.metadata.gate
    assert gate is not None
    groups = len(POOLINGS_STACKED)
    reverse = fit_linear_map(
        tgt.stacked[target_detection], src.stacked[gate.detection_layer], config.ridge, groups
    )
    categories = [c for c in source.categories if c in gate.categories]
    directions: dict[str, torch.Tensor] = {}
    biases: dict[str, float] = {}
    for category in categories:
        probe = source.conditions[category].double()
        moved = reverse.weight @ probe
        directions[category] = moved.float()
        biases[category] = float(
            gate.categories[category].bias + probe @ reverse.y_mean - moved @ reverse.x_mean
        )
    calibration = prompt_activations(
        target_model.model,
        target_model.tokenizer,
        calibration_prompts,
        [target_detection],
        batch_size=config.batch_size,
        show_progress=config.show_progress,
        desc="target calibration",
    )[gate.pooling][:, 0]
    stacked = torch.stack([directions[c] for c in categories])
    bias = torch.tensor([biases[c] for c in categories])
    scores = calibration.float() @ stacked.T + bias
    target_fpr = max(g.target_fpr for g in gate.categories.values())
    thresholds = calibrate_thresholds(scores, target_fpr, "any")
    spec = GateSpec(
        target_detection,
        gate.pooling,
        {
            c: CategoryGate(bias=biases[c], threshold=float(thresholds[i]), target_fpr=target_fpr)
            for i, c in enumerate(categories)
        },
    )
    fired = float((scores > thresholds).any(dim=1).double().mean())
    metadata = replace(adapter.metadata, gate=spec)
    transported = SafetyAdapter(metadata, adapter.vectors, adapter.coefficients, directions)
    record = {
        "source_detection_layer": gate.detection_layer,
        "detection_layer": target_detection,
        "pooling": gate.pooling,
        "rule": (
            "probe M d, bias b + d . mu_s - (M d) . mu_t, with M the reverse ridge map "
            "(target -> source); thresholds calibrated on the target's benign calibration "
            "prompts to the source gate's target FPR for the union of categories"
        ),
        "target_fpr": target_fpr,
        "calibration_prompts": len(calibration_prompts),
        "calibration_prompts_sha256": _digest(calibration_prompts),
        "calibration_fired": round(fired, 4),
        "reverse_map_held_out_r2": round(reverse.held_out_r2, 4),
        "reverse_map_weight_sha256": reverse.sha256(),
    }
    return transported, record


# ----- comparing two adapters -----------------------------------------------------------------
def cosine_table(first: SafetyAdapter, second: SafetyAdapter) -> dict[str, dict[int, float]]:
    """Per shared category and shared layer, the cosine of the two effective vectors.

    Raises:
        ValueError: the adapters are of different families or share no category and layer.
    """
    if first.metadata.family != second.metadata.family:
        raise ValueError(
            f"adapters of families {first.metadata.family} and {second.metadata.family}: "
            "compare vectors within one family"
        )
    layers = sorted(set(first.layers) & set(second.layers))
    categories = [c for c in first.categories if c in second.categories]
    if not layers or not categories:
        raise ValueError("the adapters share no category at a common layer")
    return {
        c: {
            la: float(
                torch.nn.functional.cosine_similarity(
                    first.effective(c, la).double(), second.effective(c, la).double(), dim=0
                )
            )
            for la in layers
        }
        for c in categories
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m safesteer.adapters.transport",
        description="Cosine similarity of two adapters' effective vectors (same family), per "
        "category and shared layer: e.g. a transported adapter against a native one.",
    )
    parser.add_argument("first", help="adapter file")
    parser.add_argument("second", help="adapter file of the same family")
    args = parser.parse_args(argv)
    try:
        table = cosine_table(SafetyAdapter.load(args.first), SafetyAdapter.load(args.second))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    layers = sorted({la for row in table.values() for la in row})
    print(f"{'category':15s}" + "".join(f"  layer {la:>3d}" for la in layers))
    for category, row in table.items():
        print(f"{category:15s}" + "".join(f"  {row[la]:+9.3f}" for la in layers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
