"""Served models and the adapters of their families.

Each served model has its own engine and hooks (on every decoder layer); each family has one
`FamilyAdapters` shared by its served models (fine-tunes of one base). A served model may pin
an adapter of its own (e.g. one calibrated for that fine-tune); otherwise it uses the family's
active adapter. A request captures the record current at admission.
"""

from __future__ import annotations

import logging

from safesteer.adapters.hooks import SteeringHooks
from safesteer.adapters.loading import LoadedModel
from safesteer.server.adapter_store import AdapterRecord, FamilyAdapters
from safesteer.server.engine import Engine
from safesteer.server.errors import ModelNotFound, NotFound
from safesteer.server.settings import Settings

log = logging.getLogger(__name__)


class ServedModel:
    """One model under one name: engine, hooks, its family's adapters, an optional pin."""

    def __init__(
        self,
        name: str,
        loaded: LoadedModel,
        adapters: FamilyAdapters,
        settings: Settings,
        pinned: AdapterRecord | None = None,
    ) -> None:
        if adapters.family.id != loaded.family.id:
            raise ValueError(f"{name}: family {loaded.family.id} given {adapters.family.id}")
        self.name = name
        self.loaded = loaded
        self.adapters = adapters
        self.pinned = pinned
        self.hooks = SteeringHooks(loaded.model, loaded.family.num_layers, adapters.layers)
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

    @property
    def adapter(self) -> AdapterRecord | None:
        """The adapter a request admitted now uses: the pin, else the family's active one."""
        return self.pinned or self.adapters.active


class ModelRegistry:
    """Served models by name, and adapters by family."""

    def __init__(self, models: list[ServedModel]) -> None:
        self._models = {m.name: m for m in models}
        self._families: dict[str, FamilyAdapters] = {}
        for model in models:
            held = self._families.setdefault(model.adapters.family.id, model.adapters)
            if held is not model.adapters:
                raise ValueError(f"family {held.family.id} has two adapter stores")

    @property
    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    @property
    def families(self) -> list[FamilyAdapters]:
        return list(self._families.values())

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

    def family(self, name: str) -> FamilyAdapters:
        """A served family by id or alias."""
        for adapters in self._families.values():
            if name in (adapters.family.id, adapters.family.alias):
                return adapters
        raise NotFound(
            f"no served model belongs to family {name!r}; served families: "
            f"{', '.join(self._families)}",
            param="family",
            code="family_not_found",
        )

    def start(self) -> None:
        for model in self._models.values():
            model.engine.start()

    def stop(self) -> None:
        for model in self._models.values():
            model.engine.stop()
