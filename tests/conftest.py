"""Shared fixtures: tiny random-init causal LMs of four architectures and random adapters.

Every model is built fresh from `torch.manual_seed(0)` (about 20 ms), so a test that leaves
hooks behind cannot leak them into another test.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import pytest
import torch
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from safesteer.adapters.adapter import AdapterMetadata, CategorySpec, SafetyAdapter
from safesteer.adapters.family import ModelFamily

ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "gemma", "mistral")


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    """A test that runs `safesteer serve`'s CLI configures the root logger (handler on the
    test's captured stderr, level): put it back so later tests neither log to a closed stream
    nor see other levels."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


TINY_HIDDEN_SIZE = 64
TINY_NUM_LAYERS = 4
TINY_VOCAB_SIZE = 128
DEFAULT_CATEGORIES: tuple[str, ...] = ("violence", "fraud", "drugs")

# Typed loosely: transformers' stubs do not know each config class's keyword arguments.
_MODEL_CLASSES: dict[str, tuple[Callable[..., PretrainedConfig], Callable[..., Any]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "gemma": (GemmaConfig, GemmaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def tiny_config(arch: str) -> PretrainedConfig:
    """A 4-layer, 64-wide config of `arch` (one of `ARCHITECTURES`)."""
    config_class, _ = _MODEL_CLASSES[arch]
    return config_class(
        hidden_size=TINY_HIDDEN_SIZE,
        num_hidden_layers=TINY_NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=TINY_VOCAB_SIZE,
        max_position_embeddings=256,
        pad_token_id=0,
    )


def make_tiny_model(arch: str) -> PreTrainedModel:
    """A random-init fp32 causal LM of `arch` in eval mode, identical on every call."""
    _, model_class = _MODEL_CLASSES[arch]
    torch.manual_seed(0)
    model: PreTrainedModel = model_class(tiny_config(arch))
    model.eval()  # type: ignore[no-untyped-call]
    model.requires_grad_(False)
    assert model.dtype == torch.float32
    return model


class AdapterFactory(Protocol):
    def __call__(
        self,
        target: PreTrainedModel | ModelFamily,
        *,
        name: str = ...,
        categories: Sequence[str] = ...,
        layers: Sequence[int] = ...,
        norm: float = ...,
        seed: int = ...,
    ) -> SafetyAdapter: ...


def make_random_adapter(
    target: PreTrainedModel | ModelFamily,
    *,
    name: str = "tiny",
    categories: Sequence[str] = DEFAULT_CATEGORIES,
    layers: Sequence[int] = (1, 2),
    norm: float = 1.0,
    seed: int = 0,
) -> SafetyAdapter:
    """A valid adapter for `target` with random unit vectors scaled to `norm`.

    Coefficients are random in [0.5, 1.5), default weights are 1.0 except the last
    category's, which is 0.0 (so tests can tell defaults from overrides).
    """
    family = target if isinstance(target, ModelFamily) else ModelFamily.from_config(target.config)
    generator = torch.Generator().manual_seed(seed)
    specs = {
        category: CategorySpec(f"{category} (test)", 0.0 if i == len(categories) - 1 else 1.0)
        for i, category in enumerate(categories)
    }
    vectors: dict[str, dict[int, torch.Tensor]] = {}
    coefficients: dict[str, dict[int, float]] = {}
    for category in categories:
        vectors[category] = {}
        coefficients[category] = {}
        for layer in layers:
            vector = torch.randn(family.hidden_size, generator=generator)
            vectors[category][layer] = vector / vector.norm() * norm
            coefficients[category][layer] = 0.5 + float(torch.rand(1, generator=generator))
    metadata = AdapterMetadata.for_family(name, family, specs)
    return SafetyAdapter(metadata, vectors, coefficients)


@pytest.fixture
def single_torch_thread() -> Iterator[None]:
    """Run torch on one intra-op thread for the test, then restore the previous count.

    A tiny model's forward pass is all per-op overhead: extra threads buy nothing, and on a
    busy 2-core machine their oversubscription made the unit suite ten times slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_model_factory(single_torch_thread: None) -> Callable[[str], PreTrainedModel]:
    """Builds a fresh tiny model of an architecture name: `tiny_model_factory("gemma")`."""
    return make_tiny_model


@pytest.fixture(params=ARCHITECTURES)
def tiny_arch(request: pytest.FixtureRequest) -> str:
    """Each of the four tiny architectures in turn."""
    arch: str = request.param
    return arch


@pytest.fixture
def tiny_model(tiny_arch: str, single_torch_thread: None) -> PreTrainedModel:
    """A fresh tiny model, parametrized over `ARCHITECTURES`."""
    return make_tiny_model(tiny_arch)


@pytest.fixture
def random_adapter() -> AdapterFactory:
    """Makes random valid adapters: `random_adapter(model, layers=(0, 3), norm=5.0)`."""
    return make_random_adapter
