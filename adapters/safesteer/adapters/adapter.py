"""`SafetyAdapter`: per-category, per-layer steering vectors with calibrated coefficients.

An adapter is a value. Arithmetic returns new adapters and acts on what is applied to the
model, `coefficient * vector`: `effective(a + b) == effective(a) + effective(b)` and
`effective(k * a) == k * effective(a)`.

On disk it is one safetensors file: tensors `vector.<category>.<layer>` (fp32, hidden size),
optional `condition.<category>` probes, and the metadata as JSON under the header key
`safesteer`. No pickle anywhere.
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
from safetensors import SafetensorError, safe_open
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

Vectors = Mapping[str, Mapping[int, torch.Tensor]]
Coefficients = Mapping[str, Mapping[int, float]]


@dataclass(frozen=True)
class CategorySpec:
    """A harm category as the adapter describes it."""

    description: str
    default_weight: float = 1.0


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

    @property
    def id(self) -> str:
        return f"{self.metadata.name}@{self.payload_sha256[:12]}"

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
        metadata = replace(self.metadata, categories=categories)
        conditions = {**other.conditions, **self.conditions}
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
            f"vector.{category}.{layer}": vector.detach().to(torch.float32).contiguous()
            for category, per_layer in self.vectors.items()
            for layer, vector in per_layer.items()
        }
        for category, probe in self.conditions.items():
            tensors[f"condition.{category}"] = probe.detach().to(torch.float32).contiguous()
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
        display = path.name
        try:
            with safe_open(str(path), framework="pt") as handle:
                header_meta = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except FileNotFoundError as exc:
            raise AdapterFormatError(f"adapter file {display} does not exist") from exc
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
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


def _effective_or_zero(adapter: SafetyAdapter, category: str, layer: int) -> torch.Tensor:
    if category not in adapter.metadata.categories:
        return torch.zeros(adapter.metadata.hidden_size)
    return adapter.effective(category, layer)


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
    if not any(vectors.values()):
        raise AdapterFormatError("the adapter has no vectors")
