"""The registry config file (TOML): served models, adapters per family, and policy.

    [[models]]
    name = "smollm2"                       # what clients put in `model`
    source = "smollm2-135m-instruct"       # packaged name, HF folder or .gguf file,
                                           # or BASE+LORA_DIR: a peft LoRA merged at load
    adapter = "smollm2-135m/calibrated.safetensors"   # optional: pinned to this model

    [[families]]
    family = "smollm2-135m"                # family id or alias
    adapters = ["smollm2-135m/safety.safetensors"]
    active = "smollm2-135m/safety.safetensors"        # default: the first; "none": serve
                                           # unsteered until an admin activates one
    mandatory = { violence = 1.0 }         # floors no client or override key can go below
    merge = "naive"                        # or "orthogonal" / "ties": see adapters.merging

Several fine-tunes of one base (`BASE+LORA_DIR` sources) are served side by side, each under
its own name, all in the base's family. Model sources are relative to the working directory;
adapter paths are relative to the adapter folder (`adapter_dir`, default the server's
`--adapter-dir`; a relative `adapter_dir` is relative to the config file).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from safesteer.adapters.table import MAX_WEIGHT

NO_ADAPTER = "none"  # a family's `active`: serve it without steering until an admin activates one


class ConfigError(Exception):
    """The config file is missing, not TOML, or not a valid registry config."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelEntry(_Strict):
    name: str = Field(min_length=1)
    source: str = Field(min_length=1)
    adapter: str | None = None


class FamilyEntry(_Strict):
    family: str = Field(min_length=1)
    adapters: list[str] = Field(default_factory=list)
    active: str | None = None
    mandatory: dict[str, float] = Field(default_factory=dict)
    # How the vectors of several categories on for one row combine (safesteer.adapters.merging);
    # None: the scheme each adapter's recipe was calibrated for (else naive).
    merge: Literal["naive", "orthogonal", "ties"] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> FamilyEntry:
        if self.active not in (None, NO_ADAPTER, *self.adapters):
            raise ValueError(
                f"active adapter {self.active!r} is not listed in adapters "
                f"(or {NO_ADAPTER!r} for none)"
            )
        if self.active == NO_ADAPTER and self.mandatory:
            raise ValueError(f"mandatory floors need an active adapter, not {NO_ADAPTER!r}")
        for category, floor in self.mandatory.items():
            if not 0.0 < floor <= MAX_WEIGHT:
                raise ValueError(
                    f"mandatory floor of {category!r} must be within (0, {MAX_WEIGHT}]"
                )
        return self


class RegistryConfig(_Strict):
    adapter_dir: Path | None = None
    models: list[ModelEntry] = Field(min_length=1)
    families: list[FamilyEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> RegistryConfig:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError("model names must be unique")
        families = [f.family for f in self.families]
        if len(set(families)) != len(families):
            raise ValueError("each family may appear once")
        return self

    @classmethod
    def load(cls, path: Path) -> RegistryConfig:
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} cannot be read") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path.name} is not valid TOML: {exc}") from exc
        try:
            config = cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "config"
            raise ConfigError(f"{path.name}: {where}: {first['msg']}") from exc
        if config.adapter_dir is not None and not config.adapter_dir.is_absolute():
            config = config.model_copy(update={"adapter_dir": path.parent / config.adapter_dir})
        return config

    def family(self, family_id: str, alias: str | None) -> FamilyEntry | None:
        for entry in self.families:
            if entry.family in (family_id, alias):
                return entry
        return None
