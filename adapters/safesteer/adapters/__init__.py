"""The safesteer adapter toolkit: safety adapters, hooks, extraction. No web framework here."""

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.categories import CATEGORIES
from safesteer.adapters.errors import (
    AdapterError,
    AdapterFormatError,
    AdapterIntegrityError,
    AdapterMismatch,
    ModelLoadError,
    UnknownCategory,
)
from safesteer.adapters.family import ModelFamily
from safesteer.adapters.hooks import SteeringHooks
from safesteer.adapters.table import SteeringBasis

__all__ = [
    "CATEGORIES",
    "AdapterError",
    "AdapterFormatError",
    "AdapterIntegrityError",
    "AdapterMismatch",
    "ModelFamily",
    "ModelLoadError",
    "SafetyAdapter",
    "SteeringBasis",
    "SteeringHooks",
    "UnknownCategory",
]
