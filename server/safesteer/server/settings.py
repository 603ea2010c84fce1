"""Server settings: environment variables with the SAFESTEER_ prefix, or `safesteer serve` flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from safesteer.adapters.loading import DEFAULT_MODEL, default_cache_dir


def default_state_dir() -> Path:
    """`$XDG_STATE_HOME/safesteer` (or `~/.local/state/safesteer`)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "safesteer"


def builtin_adapter_dir() -> Path:
    """The repository's `adapters/` folder, where the built-in adapters of each family live."""
    import safesteer.adapters

    return Path(safesteer.adapters.__file__).resolve().parents[2]


class Settings(BaseSettings):
    """Everything `safesteer serve` can be told. Each field is also a CLI flag."""

    model_config = SettingsConfigDict(env_prefix="SAFESTEER_", extra="forbid")

    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0 picks a free one).")
    model: str = Field(
        DEFAULT_MODEL,
        description="Model to serve: a packaged name, a Hugging Face folder or a .gguf file, "
        "optionally followed by +LORA_DIR (a peft LoRA folder merged into it at load).",
    )
    served_model_name: str | None = Field(
        None, description="Name clients use in the `model` field (default: derived from --model)."
    )
    adapter: Path | None = Field(
        None,
        description="Safety adapter file (default: the built-in adapter of the model's family "
        "from --adapter-dir).",
    )
    adapter_dir: Path = Field(
        default_factory=builtin_adapter_dir,
        description="Folder searched for the family's built-in adapter (<dir>/*/*.safetensors).",
    )
    no_adapter: bool = Field(False, description="Serve without any safety adapter.")
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="Cache folder for dequantized GGUF models (safetensors, keyed by sha256).",
    )
    max_batch_size: int = Field(16, ge=1, le=512, description="Most rows decoded together.")
    max_tokens_in_flight: int = Field(
        65536,
        ge=1,
        description="Most prompt + completion tokens of the rows decoding together (bounds "
        "KV-cache memory); a request that does not fit waits.",
    )
    max_queue: int = Field(
        256, ge=1, description="Most requests waiting for a batch slot; beyond it answer 429."
    )
    default_max_tokens: int = Field(
        512, ge=1, description="Completion length when a request sets no max_tokens."
    )
    max_n: int = Field(8, ge=1, le=64, description="Largest `n` (choices per request).")
    threads: int | None = Field(
        None, ge=1, description="Torch intra-op threads for model compute (default: torch's)."
    )
    log_level: str = Field("info", description="Log level: debug, info, warning, error.")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as plain text or as JSON objects with request ids."
    )
    config: Path | None = Field(
        None,
        description="Registry config (TOML): served models, adapters per family, policy. "
        "Overrides --model/--adapter.",
    )
    state_dir: Path = Field(
        default_factory=default_state_dir,
        description="Folder for the active-adapter state, the audit log and uploaded adapters.",
    )
    keys_file: Path | None = Field(
        None,
        description="API keys file (TOML, hashed keys with scopes; see `safesteer keys`). "
        "Without it the server runs in local mode: no auth, loopback only.",
    )
    insecure_no_auth: bool = Field(
        False, description="Allow local mode (no API keys) on a non-loopback address."
    )
    trusted_keys_dir: Path | None = Field(
        None, description="Folder of trusted Ed25519 public keys (<signer>.pub) for adapters."
    )
    require_signed_adapters: bool = Field(
        False, description="Refuse adapters without a valid signature by a trusted key."
    )
    max_upload_bytes: int = Field(
        64 * 1024 * 1024, ge=1, description="Largest adapter accepted by the upload endpoint."
    )
