"""`SafetyAdapter`: per-category, per-layer steering vectors with calibrated coefficients.

An adapter is a value. Arithmetic returns new adapters and acts on what is applied to the
model, `coefficient * vector`: `effective(a + b) == effective(a) + effective(b)` and
`effective(k * a) == k * effective(a)`.

On disk it is one safetensors file: tensors `vector.<category>.<layer>` (fp32, hidden size),
optional `condition.<category>` probes, and the metadata as JSON under the header key
`safesteer`. No pickle anywhere.

Gates (optional, `AdapterMetadata.gate`): a category with a condition probe steers a row only
when `condition . pooled(h) + bias > threshold`, `h` being what the gate's detection layer
outputs for the row's prompt (see `gating`). Gates decide *whether* a category steers, vectors
*how much*: `k * a` leaves them alone; `a + b` keeps, for each category, the probe of the left
operand if it gates that category, else the right one's (both gates must read the same
detection layer with the same pooling), and drops probes that have no gate entry. A file
without a gate reads as before.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from safesteer.adapters.errors import (
    AdapterFormatError,
    AdapterIntegrityError,
    AdapterMismatch,
    UnknownCategory,
)
from safesteer.adapters.family import ModelFamily

FORMAT_VERSION = 1
# The vector stored for layer i is added to the hidden states that decoder layer i outputs
# (0-based, the index into the model's decoder `ModuleList`).
LAYER_CONVENTION = "decoder-output-0"
_HEADER_KEY = "safesteer"
_VECTOR_NAME = re.compile(r"^vector\.([a-z0-9_]+)\.(\d+)$")
_CONDITION_NAME = re.compile(r"^condition\.([a-z0-9_]+)$")
_CATEGORY_NAME = re.compile(r"^[a-z0-9_]+$")

POOLINGS: tuple[str, ...] = ("last", "mean")

Vectors = Mapping[str, Mapping[int, torch.Tensor]]
Coefficients = Mapping[str, Mapping[int, float]]


@dataclass(frozen=True)
class CategorySpec:
    """A harm category as the adapter describes it."""

    description: str
    default_weight: float = 1.0


@dataclass(frozen=True)
class CategoryGate:
    """When one category's probe fires: `condition . pooled(h) + bias > threshold`.

    `target_fpr` is the false-positive rate the threshold was calibrated to on benign dev
    prompts; `tpr` and `fpr` are what the probe measured on harmful and benign dev prompts
    (`gating` records the FPR leave-one-out, as the calibration set's own is the target).
    """

    bias: float
    threshold: float
    target_fpr: float
    tpr: float | None = None
    fpr: float | None = None


@dataclass(frozen=True)
class GateSpec:
    """The condition probes' shared reading point and their per-category calibration."""

    detection_layer: int  # the decoder layer whose output the probes read (0-based)
    pooling: str  # how prompt positions become one vector: one of POOLINGS
    categories: Mapping[str, CategoryGate]

    def to_json(self) -> dict[str, Any]:
        return {
            "detection_layer": self.detection_layer,
            "pooling": self.pooling,
            "categories": {
                c: {
                    "bias": g.bias,
                    "threshold": g.threshold,
                    "target_fpr": g.target_fpr,
                    "tpr": g.tpr,
                    "fpr": g.fpr,
                }
                for c, g in self.categories.items()
            },
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> GateSpec:
        def rate(value: Any) -> float | None:
            return None if value is None else float(value)

        return cls(
            detection_layer=int(raw["detection_layer"]),
            pooling=str(raw["pooling"]),
            categories={
                str(c): CategoryGate(
                    bias=float(g["bias"]),
                    threshold=float(g["threshold"]),
                    target_fpr=float(g["target_fpr"]),
                    tpr=rate(g.get("tpr")),
                    fpr=rate(g.get("fpr")),
                )
                for c, g in raw["categories"].items()
            },
        )


@dataclass(frozen=True)
class AdapterMetadata:
    """Everything in the file besides tensors."""

    name: str
    family: str
    architecture: str
    hidden_size: int
    num_layers: int
    categories: Mapping[str, CategorySpec]
    layer_convention: str = LAYER_CONVENTION
    base_fingerprint: str = ""
    recipe: Mapping[str, Any] = field(default_factory=dict)
    gate: GateSpec | None = None

    @classmethod
    def for_family(
        cls, name: str, family: ModelFamily, categories: Mapping[str, CategorySpec], **kw: Any
    ) -> AdapterMetadata:
        return cls(
            name=name,
            family=family.id,
            architecture=family.model_type,
            hidden_size=family.hidden_size,
            num_layers=family.num_layers,
            categories=dict(categories),
            **kw,
        )


@dataclass(frozen=True, eq=False)
class SafetyAdapter:
    """Steering vectors per harm category and layer, with per-layer default coefficients."""

    metadata: AdapterMetadata
    vectors: Vectors
    coefficients: Coefficients
    conditions: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_structure(self.metadata, self.vectors, self.coefficients, self.conditions)

    # ----- views -----------------------------------------------------------------------
    @property
    def categories(self) -> list[str]:
        return list(self.metadata.categories)

    @property
    def layers(self) -> list[int]:
        return sorted({layer for per_layer in self.vectors.values() for layer in per_layer})

    @cached_property
    def payload_sha256(self) -> str:
        return _payload_sha256(self._tensors())

    @cached_property
    def steering_sha256(self) -> str:
        """sha256 of everything that decides how the adapter steers: the tensor payload, the
        categories with their default weights, the coefficients and the gate."""
        header = self.to_header()
        steering = {key: header.get(key) for key in _STEERING_KEYS}
        return hashlib.sha256(json.dumps(steering, sort_keys=True).encode()).hexdigest()

    @property
    def id(self) -> str:
        """`name@` the first 12 hex digits of `steering_sha256`: two adapters that steer
        differently (new coefficients on the same vectors, say) never share an id."""
        return f"{self.metadata.name}@{self.steering_sha256[:12]}"

    def effective(self, category: str, layer: int) -> torch.Tensor:
        """What this category adds at this layer at weight 1: coefficient * vector."""
        if category not in self.metadata.categories:
            raise UnknownCategory(category, self.categories)
        vector = self.vectors.get(category, {}).get(layer)
        if vector is None:
            return torch.zeros(self.metadata.hidden_size)
        return self.coefficients[category][layer] * vector

    def norms(self) -> dict[str, dict[int, float]]:
        """Norm of coefficient * vector per category and layer."""
        return {
            category: {layer: float(self.effective(category, layer).norm()) for layer in layers}
            for category, layers in self.vectors.items()
        }

    # ----- algebra -----------------------------------------------------------------------
    def __mul__(self, factor: float) -> SafetyAdapter:
        vectors = {c: {la: v * factor for la, v in per.items()} for c, per in self.vectors.items()}
        return replace(self, vectors=vectors)

    __rmul__ = __mul__

    def __truediv__(self, divisor: float) -> SafetyAdapter:
        return self * (1.0 / divisor)

    def __neg__(self) -> SafetyAdapter:
        return self * -1.0

    def __add__(self, other: SafetyAdapter) -> SafetyAdapter:
        if not isinstance(other, SafetyAdapter):
            return NotImplemented
        for attr in ("family", "hidden_size", "num_layers", "layer_convention"):
            mine, theirs = getattr(self.metadata, attr), getattr(other.metadata, attr)
            if mine != theirs:
                raise AdapterMismatch(attr, mine, theirs)
        categories = {**self.metadata.categories}
        categories.update(
            (c, s) for c, s in other.metadata.categories.items() if c not in categories
        )
        vectors: dict[str, dict[int, torch.Tensor]] = {}
        for category in categories:
            layers = set(self.vectors.get(category, {})) | set(other.vectors.get(category, {}))
            vectors[category] = {
                layer: _effective_or_zero(self, category, layer)
                + _effective_or_zero(other, category, layer)
                for layer in sorted(layers)
            }
        coefficients = {c: dict.fromkeys(per, 1.0) for c, per in vectors.items()}
        gate, conditions = _merged_conditions(self, other)
        metadata = replace(self.metadata, categories=categories, gate=gate)
        return SafetyAdapter(metadata, vectors, coefficients, conditions)

    def __sub__(self, other: SafetyAdapter) -> SafetyAdapter:
        return self + (-other)

    # ----- model fit -----------------------------------------------------------------------
    def check_fits(self, family: ModelFamily) -> None:
        """Refuse (AdapterMismatch) an adapter made for another model family."""
        meta = self.metadata
        for name, expected, found in (
            ("architecture", family.model_type, meta.architecture),
            ("hidden_size", family.hidden_size, meta.hidden_size),
            ("num_layers", family.num_layers, meta.num_layers),
            ("family", family.id, meta.family),
            ("layer_convention", LAYER_CONVENTION, meta.layer_convention),
        ):
            if expected != found:
                raise AdapterMismatch(name, expected, found)

    # ----- I/O -----------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {
            f"vector.{category}.{layer}": _owned(vector)
            for category, per_layer in self.vectors.items()
            for layer, vector in per_layer.items()
        }
        for category, probe in self.conditions.items():
            tensors[f"condition.{category}"] = _owned(probe)
        return tensors

    def to_header(self) -> dict[str, Any]:
        meta = self.metadata
        return {
            "format_version": FORMAT_VERSION,
            "name": meta.name,
            "family": meta.family,
            "architecture": meta.architecture,
            "hidden_size": meta.hidden_size,
            "num_layers": meta.num_layers,
            "layer_convention": meta.layer_convention,
            "categories": {
                c: {"description": s.description, "default_weight": s.default_weight}
                for c, s in meta.categories.items()
            },
            "coefficients": {
                c: {str(layer): coef for layer, coef in per.items()}
                for c, per in self.coefficients.items()
            },
            "base_fingerprint": meta.base_fingerprint,
            "recipe": dict(meta.recipe),
            **({"gate": meta.gate.to_json()} if meta.gate is not None else {}),
            "payload_sha256": self.payload_sha256,
        }

    def save(self, path: str | Path) -> Path:
        """Write the adapter as one safetensors file (atomically) and return its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(self._tensors(), str(tmp), metadata={_HEADER_KEY: json.dumps(self.to_header())})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> SafetyAdapter:
        """Read and validate an adapter file.

        Raises:
            AdapterFormatError: not a safetensors file, or not a well-formed adapter.
            AdapterIntegrityError: the tensors do not match the recorded payload sha256.
        """
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise AdapterFormatError(f"adapter file {path.name} does not exist") from exc
        except OSError as exc:
            raise AdapterFormatError(f"adapter file {path.name} cannot be read") from exc
        return cls.from_bytes(data, path.name)

    @classmethod
    def from_bytes(cls, data: bytes, display: str) -> SafetyAdapter:
        """Validate an adapter from the bytes of its file (`display` names it in errors)."""
        try:
            tensors = load_safetensors(data)
            header_length = int.from_bytes(data[:8], "little")
            header_meta = json.loads(data[8 : 8 + header_length]).get("__metadata__") or {}
        except (SafetensorError, OSError, ValueError, RuntimeError, AttributeError) as exc:
            raise AdapterFormatError(f"{display} is not a readable safetensors file") from exc
        raw = header_meta.get(_HEADER_KEY)
        if raw is None:
            raise AdapterFormatError(f"{display} has no '{_HEADER_KEY}' metadata: not an adapter")
        try:
            header = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise AdapterFormatError(f"{display}: adapter metadata is not valid JSON") from exc
        return cls.from_header(header, tensors, display)

    @classmethod
    def from_header(
        cls, header: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], display: str
    ) -> SafetyAdapter:
        if not isinstance(header, Mapping):
            raise AdapterFormatError(f"{display}: adapter metadata must be a JSON object")
        version = header.get("format_version")
        if version != FORMAT_VERSION:
            raise AdapterFormatError(
                f"{display}: format_version is {version!r}, this safesteer reads {FORMAT_VERSION}"
            )
        try:
            categories = {
                str(c): CategorySpec(str(s["description"]), float(s.get("default_weight", 1.0)))
                for c, s in header["categories"].items()
            }
            metadata = AdapterMetadata(
                name=str(header["name"]),
                family=str(header["family"]),
                architecture=str(header["architecture"]),
                hidden_size=int(header["hidden_size"]),
                num_layers=int(header["num_layers"]),
                categories=categories,
                layer_convention=str(header["layer_convention"]),
                base_fingerprint=str(header.get("base_fingerprint", "")),
                recipe=dict(header.get("recipe", {})),
                gate=GateSpec.from_json(header["gate"]) if header.get("gate") else None,
            )
            coefficients = {
                str(c): {int(layer): float(coef) for layer, coef in per.items()}
                for c, per in header["coefficients"].items()
            }
            recorded_sha = str(header["payload_sha256"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise AdapterFormatError(
                f"{display}: adapter metadata is incomplete ({exc!r})"
            ) from exc
        actual_sha = _payload_sha256(tensors)
        if actual_sha != recorded_sha:
            raise AdapterIntegrityError(
                f"{display}: tensor payload sha256 is {actual_sha}, metadata records "
                f"{recorded_sha}: the file was modified or truncated"
            )
        vectors: dict[str, dict[int, torch.Tensor]] = {}
        conditions: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            if match := _VECTOR_NAME.match(name):
                vectors.setdefault(match[1], {})[int(match[2])] = tensor
            elif match := _CONDITION_NAME.match(name):
                conditions[match[1]] = tensor
            else:
                raise AdapterFormatError(f"{display}: unexpected tensor {name!r}")
        try:
            return cls(metadata, vectors, coefficients, conditions)
        except AdapterFormatError as exc:
            raise AdapterFormatError(f"{display}: {exc}") from exc


def _merged_conditions(
    mine: SafetyAdapter, theirs: SafetyAdapter
) -> tuple[GateSpec | None, dict[str, torch.Tensor]]:
    """The gate and probes of `mine + theirs`: per category, mine if I gate it, else theirs."""
    gates = [(a, a.metadata.gate) for a in (mine, theirs) if a.metadata.gate is not None]
    if not gates:
        return None, {**theirs.conditions, **mine.conditions}
    first = gates[0][1]
    for attr in ("detection_layer", "pooling"):
        for _, other in gates[1:]:
            if getattr(first, attr) != getattr(other, attr):
                raise AdapterMismatch(f"gate.{attr}", getattr(first, attr), getattr(other, attr))
    entries: dict[str, CategoryGate] = {}
    conditions: dict[str, torch.Tensor] = {}
    for adapter, gate in gates:
        for category, entry in gate.categories.items():
            if category not in entries:
                entries[category] = entry
                conditions[category] = adapter.conditions[category]
    return replace(first, categories=entries), conditions


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """An fp32 copy that shares memory with nothing (safetensors refuses shared storage)."""
    return tensor.detach().to(torch.float32).clone(memory_format=torch.contiguous_format)


def _effective_or_zero(adapter: SafetyAdapter, category: str, layer: int) -> torch.Tensor:
    if category not in adapter.metadata.categories:
        return torch.zeros(adapter.metadata.hidden_size)
    return adapter.effective(category, layer)


_STEERING_KEYS: tuple[str, ...] = (
    "payload_sha256",
    "layer_convention",
    "categories",
    "coefficients",
    "gate",
)


def _payload_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_structure(
    meta: AdapterMetadata,
    vectors: Vectors,
    coefficients: Coefficients,
    conditions: Mapping[str, torch.Tensor],
) -> None:
    if meta.hidden_size <= 0 or meta.num_layers <= 0:
        raise AdapterFormatError("hidden_size and num_layers must be positive")
    for category, spec in meta.categories.items():
        if not _CATEGORY_NAME.match(category):
            raise AdapterFormatError(f"category name {category!r} must match [a-z0-9_]+")
        if not math.isfinite(spec.default_weight):
            raise AdapterFormatError(f"default weight of {category!r} is not finite")
    for category, per_layer in vectors.items():
        if category not in meta.categories:
            raise AdapterFormatError(f"vectors for category {category!r} not in metadata")
        coefs = coefficients.get(category, {})
        for layer, vector in per_layer.items():
            if not 0 <= layer < meta.num_layers:
                raise AdapterFormatError(
                    f"vector.{category}.{layer}: layer outside 0..{meta.num_layers - 1}"
                )
            if tuple(vector.shape) != (meta.hidden_size,):
                raise AdapterFormatError(
                    f"vector.{category}.{layer} has shape {tuple(vector.shape)}, "
                    f"expected ({meta.hidden_size},)"
                )
            if not torch.isfinite(vector).all():
                raise AdapterFormatError(f"vector.{category}.{layer} has non-finite values")
            coef = coefs.get(layer)
            if coef is None or not math.isfinite(coef):
                raise AdapterFormatError(f"no finite coefficient for {category} at layer {layer}")
    for category, probe in conditions.items():
        if category not in meta.categories:
            raise AdapterFormatError(f"condition for category {category!r} not in metadata")
        if probe.ndim != 1 or not torch.isfinite(probe).all():
            raise AdapterFormatError(f"condition.{category} must be a finite 1-d tensor")
    if meta.gate is not None:
        _check_gate(meta, meta.gate, vectors, conditions)
    if not any(vectors.values()):
        raise AdapterFormatError("the adapter has no vectors")


def _check_gate(
    meta: AdapterMetadata,
    gate: GateSpec,
    vectors: Vectors,
    conditions: Mapping[str, torch.Tensor],
) -> None:
    if gate.pooling not in POOLINGS:
        raise AdapterFormatError(f"gate pooling {gate.pooling!r} is not one of {POOLINGS}")
    steering_layers = sorted({layer for per in vectors.values() for layer in per})
    if not 0 <= gate.detection_layer < meta.num_layers:
        raise AdapterFormatError(
            f"gate detection layer {gate.detection_layer} outside 0..{meta.num_layers - 1}"
        )
    if steering_layers and gate.detection_layer >= steering_layers[0]:
        raise AdapterFormatError(
            f"gate detection layer {gate.detection_layer} must come before every steering "
            f"layer (the first is {steering_layers[0]})"
        )
    if not gate.categories:
        raise AdapterFormatError("the gate has no categories")
    for category in conditions:
        if category not in gate.categories:
            raise AdapterFormatError(f"condition.{category} has no gate entry")
    for category, entry in gate.categories.items():
        probe = conditions.get(category)
        if probe is None:
            raise AdapterFormatError(f"gate entry {category!r} has no condition.{category}")
        if tuple(probe.shape) != (meta.hidden_size,):
            raise AdapterFormatError(
                f"condition.{category} has shape {tuple(probe.shape)}, "
                f"expected ({meta.hidden_size},)"
            )
        if not (math.isfinite(entry.bias) and math.isfinite(entry.threshold)):
            raise AdapterFormatError(f"gate of {category!r}: bias and threshold must be finite")
        if not 0.0 < entry.target_fpr < 1.0:
            raise AdapterFormatError(f"gate of {category!r}: target_fpr must be in (0, 1)")
        for name, rate in (("tpr", entry.tpr), ("fpr", entry.fpr)):
            if rate is not None and not 0.0 <= rate <= 1.0:
                raise AdapterFormatError(f"gate of {category!r}: {name} must be in [0, 1]")
