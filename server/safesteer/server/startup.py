"""Startup: models and adapters as the config (or the flags) say, then the saved state.

Without `--config`, the flags describe one served model: `--model`, and `--adapter` or the
family's built-in adapter from `--adapter-dir` (or none with `--no-adapter`). With a config,
its `[[models]]` and `[[families]]` say the same for several models (a family with
`active = "none"` starts without an adapter). Finally the state file restores the adapter an
admin activated for each family before a restart, if it still verifies and the configured
default it replaced is still the configured default (an operator who changes the config gets
what the config says).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from safesteer.adapters.errors import AdapterError, ModelLoadError
from safesteer.adapters.loading import LoadedModel, load_model
from safesteer.adapters.signing import TrustedKeys
from safesteer.server.adapter_admin import AdapterAdmin
from safesteer.server.adapter_store import AdapterRecord, AdapterVerifier, FamilyAdapters
from safesteer.server.config import NO_ADAPTER, ModelEntry, RegistryConfig
from safesteer.server.registry import ModelRegistry, ServedModel
from safesteer.server.settings import Settings

log = logging.getLogger(__name__)
FLAG_MODEL = "<--model>"  # the config entry standing for --model when there is no config file


@dataclass(frozen=True)
class Server:
    """What the app serves: the registry and the admin service that changes its adapters."""

    registry: ModelRegistry
    admin: AdapterAdmin


def verifier_from_settings(settings: Settings) -> AdapterVerifier:
    trusted = (
        TrustedKeys.from_dir(settings.trusted_keys_dir)
        if settings.trusted_keys_dir is not None
        else TrustedKeys.empty()
    )
    if settings.require_signed_adapters and not trusted.keys:
        raise AdapterError("--require-signed-adapters needs --trusted-keys-dir with keys")
    return AdapterVerifier(trusted, require_signed=settings.require_signed_adapters)


def find_family_adapter(adapter_dir: Path, family_id: str) -> Path | None:
    """The built-in adapter file of a family: the first `<dir>/*/*.safetensors` made for it."""
    from safesteer.adapters.adapter import SafetyAdapter

    for path in sorted(adapter_dir.glob("*/*.safetensors")):
        try:
            adapter = SafetyAdapter.load(path)
        except AdapterError as exc:
            log.warning("skipping %s: %s", path.name, exc)
            continue
        if adapter.metadata.family == family_id:
            return path
    return None


def _config(settings: Settings) -> RegistryConfig:
    """The config file, or the one model the flags describe (named when its model loads)."""
    if settings.config is not None:
        return RegistryConfig.load(settings.config)
    return RegistryConfig(models=[ModelEntry(name=FLAG_MODEL, source=settings.model)])


def _load_models(settings: Settings, config: RegistryConfig) -> list[tuple[str, LoadedModel]]:
    models = []
    for entry in config.models:
        loaded = load_model(entry.source, settings.cache_dir)
        if entry.name == FLAG_MODEL:
            models.append((settings.served_model_name or loaded.name, loaded))
        else:
            models.append((entry.name, loaded))
    return models


def _origin(admin: AdapterAdmin, path: Path) -> str:
    try:
        return str(path.resolve().relative_to(admin.adapter_dir.resolve()))
    except ValueError:
        return str(path.resolve())


def _hold(admin: AdapterAdmin, entry: str) -> AdapterRecord:
    path = Path(entry) if Path(entry).is_absolute() else admin.adapter_dir / entry
    return admin.hold(path, _origin(admin, path))


def _family_adapters(
    settings: Settings, config: RegistryConfig, admin: AdapterAdmin, family: FamilyAdapters
) -> None:
    entry = config.family(family.family.id, family.family.alias)
    if entry is not None and (entry.adapters or entry.active == NO_ADAPTER):
        records = [_hold(admin, item) for item in entry.adapters]
        if entry.active == NO_ADAPTER:
            return  # held, none active: requests to the family's models run unsteered
        active = records[entry.adapters.index(entry.active)] if entry.active else records[0]
        family.activate(active.id)
        return
    if settings.config is None and settings.adapter is not None:
        family.activate(_hold(admin, str(settings.adapter.resolve())).id)
        return
    if settings.no_adapter:
        return
    path = find_family_adapter(admin.adapter_dir, family.family.id)
    if path is None:
        raise ModelLoadError(
            f"no adapter for family {family.family.id} in {admin.adapter_dir}; "
            "pass --adapter FILE, list one in the config, or --no-adapter"
        )
    family.activate(_hold(admin, str(path)).id)


def build_server(settings: Settings, models: list[tuple[str, LoadedModel]] | None = None) -> Server:
    """Load models (unless given, as `(name, loaded)`) and adapters; restore saved state.

    Raises:
        ModelLoadError, AdapterError, ConfigError: anything that keeps the server from serving.
    """
    config = _config(settings)
    if models is None:
        models = _load_models(settings, config)
    families: dict[str, FamilyAdapters] = {}
    for _, loaded in models:
        family_entry = config.family(loaded.family.id, loaded.family.alias)
        families.setdefault(
            loaded.family.id,
            FamilyAdapters(
                loaded.family,
                mandatory=family_entry.mandatory if family_entry else None,
                merge=family_entry.merge if family_entry else None,
            ),
        )
    served = [
        ServedModel(name, loaded, families[loaded.family.id], settings) for name, loaded in models
    ]
    registry = ModelRegistry(served)
    admin = AdapterAdmin(
        registry,
        verifier_from_settings(settings),
        config.adapter_dir or settings.adapter_dir,
        settings.state_dir,
        max_upload_bytes=settings.max_upload_bytes,
    )
    for family in families.values():
        _family_adapters(settings, config, admin, family)
        family.configured_id = family.active.id if family.active else None
    pins = {entry.name: entry.adapter for entry in config.models if entry.adapter}
    for model in served:
        if model.name in pins:
            record = _hold(admin, pins[model.name])
            if record.adapter.metadata.family != model.loaded.family.id:
                raise AdapterError(
                    f"model {model.name} (family {model.loaded.family.id}) cannot pin "
                    f"{pins[model.name]}: it is an adapter of family "
                    f"{record.adapter.metadata.family}"
                )
            model.pinned = model.adapters.pin(record.id)
    admin.restore_active()
    for model in served:
        log.info(
            "serving %s (family %s, alias %s) with adapter %s",
            model.name,
            model.loaded.family.id,
            model.loaded.family.alias,
            model.adapter.id if model.adapter else "none",
        )
    return Server(registry, admin)
