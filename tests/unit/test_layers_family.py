"""`decoder_layers` finds each architecture's decoder stack; `ModelFamily` names the family."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from torch import nn
from transformers import PreTrainedModel

from safesteer.adapters.errors import ModelLoadError
from safesteer.adapters.family import ModelFamily
from safesteer.adapters.layers import decoder_layers


def test_decoder_layers_is_the_models_layer_list(tiny_model: PreTrainedModel) -> None:
    layers = decoder_layers(tiny_model, 4)

    assert layers is tiny_model.model.layers
    assert len(layers) == 4
    assert all(type(layer).__name__.endswith("DecoderLayer") for layer in layers)


def test_decoder_layers_found_by_generic_search() -> None:
    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.other = nn.ModuleList([nn.Linear(2, 2)])
            self.blocks = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])

    model = Wrapped()

    assert decoder_layers(model, 3) is model.blocks


def test_decoder_layers_wrong_count_raises(tiny_model: PreTrainedModel) -> None:
    with pytest.raises(ModelLoadError, match="cannot find 5 decoder layers"):
        decoder_layers(tiny_model, 5)


@pytest.mark.parametrize(
    ("arch", "family_id"),
    [
        ("llama", "llama-64x4"),
        ("qwen2", "qwen2-64x4"),
        ("gemma", "gemma-64x4"),
        ("mistral", "mistral-64x4"),
    ],
)
def test_family_from_config(
    tiny_model_factory: Callable[[str], PreTrainedModel], arch: str, family_id: str
) -> None:
    family = ModelFamily.from_config(tiny_model_factory(arch).config)

    assert family == ModelFamily(arch, 64, 4)
    assert family.id == family_id
    assert family.alias == family_id  # no alias: the id itself


def test_family_known_aliases() -> None:
    assert ModelFamily("llama", 576, 30).alias == "smollm2-135m"
    assert ModelFamily("qwen2", 896, 24).alias == "qwen2.5-0.5b"
    assert ModelFamily("llama", 576, 31).alias == "llama-576x31"
