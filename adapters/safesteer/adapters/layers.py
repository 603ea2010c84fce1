"""Find the decoder layers of a causal LM, whatever the architecture."""

from __future__ import annotations

from torch import nn

from safesteer.adapters.errors import ModelLoadError

# Attribute paths used by the architectures we test (Llama, Qwen2, Gemma, Gemma3, Mistral)
# and by GPT-2/NeoX-style models; the generic search below covers the rest.
_KNOWN_PATHS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers")


def _get_path(module: nn.Module, path: str) -> nn.Module | None:
    current: object = module
    for part in path.split("."):
        current = getattr(current, part, None)
        if current is None:
            return None
    return current if isinstance(current, nn.Module) else None


def decoder_layers(model: nn.Module, num_layers: int) -> nn.ModuleList:
    """Return the `ModuleList` of the model's `num_layers` decoder layers, in order.

    Raises:
        ModelLoadError: no module list of that length exists.
    """
    for path in _KNOWN_PATHS:
        found = _get_path(model, path)
        if isinstance(found, nn.ModuleList) and len(found) == num_layers:
            return found
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ModelLoadError(f"cannot find {num_layers} decoder layers in {type(model).__name__}")
