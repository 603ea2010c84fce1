"""`SteeringHooks` on tiny random models of four architectures: exact arithmetic, no leaks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import pytest
import torch
from torch import nn
from transformers import PreTrainedModel

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.errors import ModelLoadError
from safesteer.adapters.hooks import SteeringHooks
from safesteer.adapters.layers import decoder_layers
from safesteer.adapters.table import SteeringBasis

if TYPE_CHECKING:
    from conftest import AdapterFactory

NUM_LAYERS = 4
HIDDEN = 64
ADAPTER_LAYERS = (1, 2)
# Big enough that steering, not the near-flat logits of a random model, picks the tokens.
STEERING_NORM = 4.0


@pytest.fixture
def adapter(tiny_model: PreTrainedModel, random_adapter: AdapterFactory) -> SafetyAdapter:
    return random_adapter(tiny_model, layers=ADAPTER_LAYERS, norm=2.0)


@pytest.fixture
def hooks(tiny_model: PreTrainedModel) -> Iterator[SteeringHooks]:
    installed = SteeringHooks(tiny_model, NUM_LAYERS, ADAPTER_LAYERS)
    yield installed
    installed.remove()


@pytest.fixture
def llama_hooks(tiny_model_factory: Callable[[str], PreTrainedModel]) -> Iterator[SteeringHooks]:
    """For checks that do not depend on the architecture."""
    installed = SteeringHooks(tiny_model_factory("llama"), NUM_LAYERS, ADAPTER_LAYERS)
    yield installed
    installed.remove()


def _prompt(batch: int = 2, length: int = 6, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, 128, (batch, length), generator=generator)


@torch.no_grad()
def _logits(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    logits: torch.Tensor = model(input_ids).logits
    return logits


def _logits_unhooked(
    model: PreTrainedModel, hooks: SteeringHooks, input_ids: torch.Tensor
) -> torch.Tensor:
    with hooks.steering(None):
        return _logits(model, input_ids)


def _random_table(rows: int, layers: int = len(ADAPTER_LAYERS), scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    return torch.randn(rows, layers, HIDDEN, generator=generator) * scale


class OutputCapture:
    """A forward hook that records what a module outputs (as later hooks and layers see it)."""

    def __init__(self, module: nn.Module) -> None:
        self.outputs: list[torch.Tensor] = []
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, _module: nn.Module, _args: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        self.outputs.append(hidden.detach().clone())


class InputCapture:
    """A forward pre-hook that records the hidden states a module receives."""

    def __init__(self, module: nn.Module) -> None:
        self.inputs: list[torch.Tensor] = []
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, _module: nn.Module, args: Any) -> None:
        self.inputs.append(args[0].detach().clone())


# ----- steering off is the unhooked model -------------------------------------------------------


def test_zero_table_none_and_removed_are_bit_identical(tiny_model: PreTrainedModel) -> None:
    input_ids = _prompt()
    reference = _logits(tiny_model, input_ids)
    hooks = SteeringHooks(tiny_model, NUM_LAYERS, ADAPTER_LAYERS)

    with hooks.steering(torch.zeros(2, len(ADAPTER_LAYERS), HIDDEN)):
        zero_table = _logits(tiny_model, input_ids)
    with hooks.steering(None):
        no_table = _logits(tiny_model, input_ids)
    outside = _logits(tiny_model, input_ids)
    with hooks.steering(_random_table(2, scale=3.0)):
        steered = _logits(tiny_model, input_ids)
    hooks.remove()
    removed = _logits(tiny_model, input_ids)

    assert torch.equal(zero_table, reference)
    assert torch.equal(no_table, reference)
    assert torch.equal(outside, reference)
    assert not torch.allclose(steered, reference)  # the hooks were live
    assert torch.equal(removed, reference)
    assert all(not layer._forward_hooks for layer in decoder_layers(tiny_model, NUM_LAYERS))


def test_remove_twice_is_harmless(tiny_model: PreTrainedModel) -> None:
    hooks = SteeringHooks(tiny_model, NUM_LAYERS, ADAPTER_LAYERS)
    hooks.remove()
    hooks.remove()

    with hooks.steering(_random_table(1, scale=3.0)):
        logits = _logits(tiny_model, _prompt(batch=1))

    assert torch.equal(logits, _logits(tiny_model, _prompt(batch=1)))


# ----- exact arithmetic -------------------------------------------------------------------------


def test_hook_adds_table_row_to_each_layer_output(tiny_model: PreTrainedModel) -> None:
    layers = decoder_layers(tiny_model, NUM_LAYERS)
    # Registered before SteeringHooks: sees what the layer computed; after: what it passes on.
    raw = {layer: OutputCapture(layers[layer]) for layer in ADAPTER_LAYERS}
    hooks = SteeringHooks(tiny_model, NUM_LAYERS, ADAPTER_LAYERS)
    steered = {layer: OutputCapture(layers[layer]) for layer in ADAPTER_LAYERS}
    next_input = {layer: InputCapture(layers[layer + 1]) for layer in ADAPTER_LAYERS}
    table = _random_table(2, scale=2.0)

    with hooks.steering(table):
        _logits(tiny_model, _prompt(batch=2, length=5))

    for j, layer in enumerate(ADAPTER_LAYERS):
        before, after = raw[layer].outputs[0], steered[layer].outputs[0]
        assert before.shape == (2, 5, HIDDEN)
        for r in range(2):
            # Every position of row r gets exactly table[r, j].
            assert torch.equal(before[r] + table[r, j], after[r])
        assert torch.equal(next_input[layer].inputs[0], after)  # later layers see the change
    # Layer 2's raw output already reflects layer 1's steering, so steering compounds.
    with torch.no_grad():
        tiny_model(_prompt(batch=2, length=5))
    assert not torch.equal(raw[2].outputs[1], raw[2].outputs[0])
    assert torch.equal(raw[2].outputs[1], steered[2].outputs[1])  # no table: untouched
    hooks.remove()


def test_layers_without_adapter_vectors_are_untouched(tiny_model: PreTrainedModel) -> None:
    layers = decoder_layers(tiny_model, NUM_LAYERS)
    hooks = SteeringHooks(tiny_model, NUM_LAYERS, (2,))
    first = OutputCapture(layers[0]), OutputCapture(layers[1])
    reference = [capture.outputs for capture in first]

    with torch.no_grad():
        tiny_model(_prompt())
        with hooks.steering(_random_table(2, layers=1, scale=3.0)):
            tiny_model(_prompt())

    for outputs in reference:
        assert torch.equal(outputs[0], outputs[1])
    hooks.remove()


def test_basis_table_adds_coefficient_times_vector(
    tiny_model: PreTrainedModel, adapter: SafetyAdapter
) -> None:
    layers = decoder_layers(tiny_model, NUM_LAYERS)
    basis = SteeringBasis.from_adapter(adapter)
    raw = {layer: OutputCapture(layers[layer]) for layer in ADAPTER_LAYERS}
    hooks = SteeringHooks(tiny_model, NUM_LAYERS, basis.layers)
    steered = {layer: OutputCapture(layers[layer]) for layer in ADAPTER_LAYERS}
    rows = [
        basis.weights({"violence": 1.0, "fraud": 0.0, "drugs": 0.0}),
        basis.weights({"violence": 0.0, "fraud": 0.0, "drugs": 1.0}),
        basis.weights({"violence": 0.5, "fraud": 1.0, "drugs": 2.0}, strength=1.5),
    ]
    one_hot = ["violence", "drugs"]

    with hooks.steering(basis.table(rows)):
        _logits(tiny_model, _prompt(batch=3, length=4))

    for layer in ADAPTER_LAYERS:
        before, after = raw[layer].outputs[0], steered[layer].outputs[0]
        for r, category in enumerate(one_hot):
            coef = adapter.coefficients[category][layer]
            expected = coef * adapter.vectors[category][layer]
            assert torch.equal(before[r] + expected, after[r]), (layer, category)
        mixed = 1.5 * sum(
            (
                w * adapter.effective(c, layer)
                for c, w in (("violence", 0.5), ("fraud", 1.0), ("drugs", 2.0))
            ),
            torch.zeros(HIDDEN),
        )
        torch.testing.assert_close(after[2] - before[2], mixed.expand(4, HIDDEN))
    hooks.remove()


def test_nested_steering_restores_previous_table(
    tiny_model: PreTrainedModel, hooks: SteeringHooks
) -> None:
    input_ids = _prompt(batch=1)
    outer, inner = _random_table(1, scale=2.0), _random_table(1, scale=-2.0)
    with hooks.steering(outer):
        expected_outer = _logits(tiny_model, input_ids)

    with hooks.steering(outer):
        with pytest.raises(KeyError), hooks.steering(inner):
            raise KeyError("boom")
        again_outer = _logits(tiny_model, input_ids)
    after = _logits(tiny_model, input_ids)

    assert torch.equal(again_outer, expected_outer)
    assert torch.equal(after, _logits_unhooked(tiny_model, hooks, input_ids))


# ----- no leaks across rows ---------------------------------------------------------------------


def _left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for r, prompt in enumerate(prompts):
        input_ids[r, width - len(prompt) :] = torch.tensor(prompt)
        mask[r, width - len(prompt) :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, mask, position_ids


def _greedy(model: PreTrainedModel, prompts: list[list[int]]) -> list[list[int]]:
    input_ids, mask, position_ids = _left_pad(prompts)
    generate = cast(Callable[..., torch.Tensor], model.generate)
    with torch.no_grad():
        out = generate(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            do_sample=False,
            max_new_tokens=8,
            pad_token_id=0,
        )
    new: list[list[int]] = out[:, input_ids.shape[1] :].tolist()
    return new


def _three_prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(2)
    return [torch.randint(1, 128, (n,), generator=generator).tolist() for n in (5, 3, 7)]


def test_batched_generation_equals_solo(
    tiny_model: PreTrainedModel, random_adapter: AdapterFactory
) -> None:
    strong = random_adapter(tiny_model, layers=ADAPTER_LAYERS, norm=STEERING_NORM, seed=11)
    basis = SteeringBasis.from_adapter(strong)
    hooks = SteeringHooks(tiny_model, NUM_LAYERS, basis.layers)
    prompts = _three_prompts()
    table = basis.table(
        [
            basis.weights({"violence": 1.0, "fraud": 0.0}),
            basis.weights({"violence": 0.0, "fraud": 0.0, "drugs": 1.0}),
            basis.weights({"fraud": 1.0, "drugs": 0.5}, strength=0.8),
        ]
    )

    with hooks.steering(table):
        batched = _greedy(tiny_model, prompts)
        swapped = _greedy(tiny_model, prompts[::-1])
    solo = []
    for r, prompt in enumerate(prompts):
        with hooks.steering(table[r : r + 1]):
            solo.extend(_greedy(tiny_model, [prompt]))
    hooks.remove()
    unsteered = [_greedy(tiny_model, [prompt])[0] for prompt in prompts]

    assert batched == solo
    # Steering, not the near-flat logits, decides the tokens, so a leak would show.
    assert all(b != u for b, u in zip(batched, unsteered, strict=True))
    assert len({tuple(row) for row in batched}) == 3
    assert swapped[::-1] != batched  # the same prompts under other rows' steering


def test_unsteered_row_in_steered_batch_equals_unhooked_model(
    tiny_model: PreTrainedModel, random_adapter: AdapterFactory
) -> None:
    strong = random_adapter(tiny_model, layers=ADAPTER_LAYERS, norm=STEERING_NORM, seed=11)
    basis = SteeringBasis.from_adapter(strong)
    prompts = _three_prompts()
    unhooked_batch = _greedy(tiny_model, prompts)
    unhooked_solo = [_greedy(tiny_model, [prompt])[0] for prompt in prompts]
    hooks = SteeringHooks(tiny_model, NUM_LAYERS, basis.layers)
    table = basis.table(
        [
            basis.weights({"violence": 1.0}),
            basis.weights({}, strength=0.0),  # this row asks for no steering
            basis.weights({"drugs": 1.0}, strength=2.0),
        ]
    )

    with hooks.steering(table):
        batched = _greedy(tiny_model, prompts)
    hooks.remove()

    assert unhooked_batch == unhooked_solo  # left padding and position ids are right
    assert batched[1] == unhooked_solo[1]
    assert batched[0] != unhooked_solo[0]
    assert batched[2] != unhooked_solo[2]


# ----- refused tables ---------------------------------------------------------------------------


def test_table_with_wrong_row_count_raises(
    tiny_model: PreTrainedModel, hooks: SteeringHooks
) -> None:
    with hooks.steering(_random_table(3)), pytest.raises(RuntimeError, match="3 rows"):
        _logits(tiny_model, _prompt(batch=2))
    # The failed pass left nothing behind.
    assert torch.equal(
        _logits(tiny_model, _prompt()), _logits_unhooked(tiny_model, hooks, _prompt())
    )


@pytest.mark.parametrize(
    "shape",
    [(2, HIDDEN), (2, 3, HIDDEN), (2, 1, HIDDEN), (1, 2, 1, HIDDEN), (HIDDEN,)],
)
def test_table_of_wrong_shape_raises_value_error(
    llama_hooks: SteeringHooks, shape: tuple[int, ...]
) -> None:
    table = torch.zeros(shape)
    with (
        pytest.raises(ValueError, match=r"steering table must be \[rows, 2, 64\]"),
        llama_hooks.steering(table),
    ):
        pass  # pragma: no cover


def test_table_with_wrong_hidden_size_raises_value_error(llama_hooks: SteeringHooks) -> None:
    with pytest.raises(ValueError), llama_hooks.steering(torch.ones(2, 2, 1)):
        pass  # pragma: no cover


def test_hooks_on_missing_layer_count_raise(tiny_model: PreTrainedModel) -> None:
    with pytest.raises(ModelLoadError):
        SteeringHooks(tiny_model, NUM_LAYERS + 1, ADAPTER_LAYERS)
