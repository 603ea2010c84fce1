"""Fine-tunes as model sources: `BASE+LORA_DIR`, a peft LoRA folder merged into its base at load.

The LoRA's low-rank update is added into the base's weight matrices (`merge_and_unload`), so
what the steering hooks see is a plain transformers model of the base's architecture and shape:
the family id stays the base's, only the weights (and so the fingerprint) change. Several
folders chain, merged left to right (`BASE+ALIGNED+TASK`: a task fine-tune trained on top of
the aligned one). Only safetensors weights are read, never a pickled `adapter_model.bin`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from safesteer.adapters.errors import ModelLoadError

log = logging.getLogger(__name__)

LORA_SEPARATOR = "+"
LORA_CONFIG_FILE = "adapter_config.json"
LORA_WEIGHTS_FILE = "adapter_model.safetensors"
# Written next to the LoRA by `safesteer finetune`: the base it was trained on, data, settings.
FINETUNE_RECORD_FILE = "finetune.json"


def split_source(spec: str) -> tuple[str, tuple[Path, ...]]:
    """Split `BASE+LORA_DIR[+LORA_DIR...]` into the base source and the LoRA folders.

    A spec naming an existing file or folder is a plain source even if it contains `+`.

    Raises:
        ModelLoadError: a `+` with nothing on one side of it.
    """
    if LORA_SEPARATOR not in spec or Path(spec).expanduser().exists():
        return spec, ()
    base, *loras = spec.split(LORA_SEPARATOR)
    if not base or not all(loras):
        raise ModelLoadError(
            f"model {spec!r}: expected BASE+LORA_DIR (a base model, then LoRA folders joined "
            "by '+'), found an empty part"
        )
    return base, tuple(Path(lora).expanduser() for lora in loras)


def check_lora_folder(folder: Path) -> None:
    """Refuse, before the (slow) base load, a folder that cannot hold a peft LoRA.

    Raises:
        ModelLoadError: the folder, its `adapter_config.json` or its safetensors weights are
            missing, or the config is not a LoRA's.
    """
    if not folder.is_dir():
        raise ModelLoadError(f"LoRA folder {folder} does not exist")
    config_file = folder / LORA_CONFIG_FILE
    if not config_file.is_file():
        raise ModelLoadError(
            f"LoRA folder {folder} has no {LORA_CONFIG_FILE} (not a peft adapter folder)"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"LoRA folder {folder}: {LORA_CONFIG_FILE} is not JSON") from exc
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    if peft_type != "LORA":
        raise ModelLoadError(
            f"LoRA folder {folder}: {LORA_CONFIG_FILE} describes a {peft_type!r} peft adapter, "
            "not a LoRA"
        )
    if not (folder / LORA_WEIGHTS_FILE).is_file():
        pickled = " (adapter_model.bin is a pickle and is not loaded)"
        found = pickled if (folder / "adapter_model.bin").exists() else ""
        raise ModelLoadError(f"LoRA folder {folder} has no {LORA_WEIGHTS_FILE}{found}")


def recorded_base_fingerprint(folder: Path) -> str | None:
    """The base weights fingerprint `safesteer finetune` recorded for this LoRA, if any."""
    try:
        record = json.loads((folder / FINETUNE_RECORD_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    base = record.get("base") if isinstance(record, dict) else None
    fingerprint = base.get("fingerprint") if isinstance(base, dict) else None
    return fingerprint if isinstance(fingerprint, str) else None


def _short(error: Exception, lines: int = 2) -> str:
    """The first lines of a peft / torch error, which can list every mismatched tensor."""
    text = [line.strip() for line in str(error).splitlines() if line.strip()]
    more = f" (+{len(text) - lines} more lines)" if len(text) > lines else ""
    return " ".join(text[:lines]) + more


def _listed(keys: list[str], limit: int = 3) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def merge_lora(model: Any, folder: Path, base: str) -> Any:
    """Merge the peft LoRA in `folder` into `model` (named `base` in errors).

    Returns the plain transformers model (the same object, weights changed in place).

    Raises:
        ModelLoadError: the folder is not a LoRA, or the LoRA's target modules or tensor shapes
            do not fit the base.
    """
    from peft import LoraConfig, PeftModel, set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_lora_folder(folder)

    def unfit(reason: str) -> ModelLoadError:
        return ModelLoadError(f"LoRA {folder} does not fit the base model {base!r}: {reason}")

    try:
        config = LoraConfig.from_pretrained(str(folder))
        weights = load_file(str(folder / LORA_WEIGHTS_FILE))
    except (OSError, ValueError, TypeError, SafetensorError) as exc:
        raise ModelLoadError(f"LoRA folder {folder} cannot be read: {_short(exc)}") from exc
    config.inference_mode = True
    try:
        # Injecting LoRA layers initialises them from torch's global generator; the loaded
        # weights replace them, and a load should not shift the seeds of whatever runs next.
        with torch.random.fork_rng(devices=[]):
            wrapped = PeftModel(model, config)
        # peft annotates the returned torch `_IncompatibleKeys` as a bare namedtuple.
        result: Any = set_peft_model_state_dict(wrapped, weights)
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise unfit(_short(exc)) from exc
    if result.unexpected_keys:
        raise unfit(f"weights for modules the base lacks: {_listed(result.unexpected_keys)}")
    missing = [key for key in result.missing_keys if ".lora_" in key]
    if missing:
        raise unfit(f"no weights in {LORA_WEIGHTS_FILE} for {_listed(missing)}")
    merged = wrapped.merge_and_unload()
    log.info("merged LoRA %s (rank %s) into %s", folder, config.r, base)
    return merged
