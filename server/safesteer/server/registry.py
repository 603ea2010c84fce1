"""Served models: the loaded model, its hooks and engine, and the adapter snapshot in force.

A request captures the `AdapterSnapshot` current at admission and builds its steering row from
it, so whatever later replaces the snapshot never changes a request already admitted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.errors import AdapterError, ModelLoadError
from safesteer.adapters.hooks import SteeringHooks
from safesteer.adapters.loading import LoadedModel, load_model
from safesteer.adapters.table import SteeringBasis
from safesteer.server.engine import Engine
from safesteer.server.errors import ModelNotFound
from safesteer.server.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterSnapshot:
    """An adapter and its packed basis, immutable once published."""

    adapter: SafetyAdapter
    basis: SteeringBasis


class ServedModel:
    """One model under one name: engine, hooks on its adapter's layers, active adapter."""

    def __init__(
        self,
        name: str,
        loaded: LoadedModel,
        adapter: SafetyAdapter | None,
        settings: Settings,
    ) -> None:
        self.name = name
        self.loaded = loaded
        self.snapshot: AdapterSnapshot | None = None
        self.hooks: SteeringHooks | None = None
        if adapter is not None:
            adapter.check_fits(loaded.family)
            device = next(loaded.model.parameters()).device
            self.snapshot = AdapterSnapshot(
                adapter, SteeringBasis.from_adapter(adapter, device=device)
            )
            self.hooks = SteeringHooks(loaded.model, loaded.family.num_layers, adapter.layers)
        self.engine = Engine(
            loaded.model,
            loaded.tokenizer,
            self.hooks,
            hidden_size=loaded.family.hidden_size,
            max_batch_size=settings.max_batch_size,
            max_tokens_in_flight=settings.max_tokens_in_flight,
            max_queue=settings.max_queue,
            threads=settings.threads,
        )


class ModelRegistry:
    """Served models by name."""

    def __init__(self, models: list[ServedModel]) -> None:
        self._models = {m.name: m for m in models}

    @property
    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def get(self, name: str | None) -> ServedModel:
        if name is None and len(self._models) == 1:
            return next(iter(self._models.values()))
        if name is None:
            raise ModelNotFound(
                "'model' is required: this server serves several models", param="model"
            )
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFound(
                f"the model {name!r} does not exist; served: {', '.join(self._models)}",
                param="model",
            ) from None

    def start(self) -> None:
        for model in self._models.values():
            model.engine.start()

    def stop(self) -> None:
        for model in self._models.values():
            model.engine.stop()


def find_family_adapter(adapter_dir: Path, family_id: str) -> SafetyAdapter | None:
    """The built-in adapter for a family: the first `<dir>/*/*.safetensors` made for it."""
    for path in sorted(adapter_dir.glob("*/*.safetensors")):
        try:
            adapter = SafetyAdapter.load(path)
        except AdapterError as exc:
            log.warning("skipping %s: %s", path.name, exc)
            continue
        if adapter.metadata.family == family_id:
            return adapter
    return None


def registry_from_settings(settings: Settings) -> ModelRegistry:
    """Load the model and its adapter as `settings` say; raises on any mismatch."""
    loaded = load_model(settings.model, settings.cache_dir)
    adapter: SafetyAdapter | None = None
    if settings.adapter is not None:
        adapter = SafetyAdapter.load(settings.adapter)
    elif not settings.no_adapter:
        adapter = find_family_adapter(settings.adapter_dir, loaded.family.id)
        if adapter is None:
            raise ModelLoadError(
                f"no adapter for family {loaded.family.id} in {settings.adapter_dir}; "
                "pass --adapter FILE or --no-adapter"
            )
    name = settings.served_model_name or loaded.name
    log.info(
        "serving %s (family %s, alias %s) with adapter %s",
        name,
        loaded.family.id,
        loaded.family.alias,
        adapter.id if adapter else "none",
    )
    return ModelRegistry([ServedModel(name, loaded, adapter, settings)])
