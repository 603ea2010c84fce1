"""Cross-family transport (`safesteer.adapters.transport`) on the tiny chat models of
`tests/server/tiny_chat.py`: a 4-layer, 64-wide Llama and a 3-layer, 48-wide Qwen2."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from safesteer.adapters import cli
from safesteer.adapters.adapter import (
    AdapterMetadata,
    CategoryGate,
    CategorySpec,
    GateSpec,
    SafetyAdapter,
)
from safesteer.adapters.errors import AdapterMismatch
from safesteer.adapters.gating import PromptGate, prompt_activations
from safesteer.adapters.loading import LoadedModel
from safesteer.adapters.transport import (
    LinearMap,
    TransportConfig,
    corresponding_layer,
    cosine_table,
    fit_linear_map,
    r_squared,
    transport_adapter,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from tiny_chat import tiny_loaded_model
from tiny_lora import save_tiny_chat_folder

WORDS = ("bread", "rivers", "python", "guitar", "planets", "tax forms", "soup", "chess")
PROMPTS = [f"Tell me {i} things about {WORDS[i % len(WORDS)]}, please." for i in range(48)]
CATEGORIES = ("violence", "fraud", "drugs")


@pytest.fixture
def llama(single_torch_thread: None) -> LoadedModel:
    return tiny_loaded_model("llama")


@pytest.fixture
def qwen(single_torch_thread: None) -> LoadedModel:
    return tiny_loaded_model("qwen2", name="tiny-qwen")


def gated_adapter(
    loaded: LoadedModel, layers: tuple[int, ...] = (1, 3), detection: int = 0
) -> SafetyAdapter:
    """A random adapter of `loaded`'s family with a random gate at `detection` (mean pooling)."""
    generator = torch.Generator().manual_seed(4)
    hidden = loaded.family.hidden_size
    vectors = {
        c: {la: torch.randn(hidden, generator=generator) for la in layers} for c in CATEGORIES
    }
    coefficients = {c: dict.fromkeys(layers, 3.0) for c in CATEGORIES}
    specs = {c: CategorySpec(f"{c} (test)") for c in CATEGORIES}
    adapter = SafetyAdapter(
        AdapterMetadata.for_family("tiny", loaded.family, specs), vectors, coefficients
    )
    conditions = {c: torch.randn(hidden, generator=generator) for c in CATEGORIES}
    gate = GateSpec(
        detection,
        "mean",
        {c: CategoryGate(bias=0.5, threshold=1.0, target_fpr=0.1) for c in CATEGORIES},
    )
    metadata = replace(adapter.metadata, gate=gate, recipe={"merge": "orthogonal"})
    return replace(adapter, metadata=metadata, conditions=conditions)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


# ----- pieces ------------------------------------------------------------------------------------
def test_layers_correspond_by_relative_depth() -> None:
    assert corresponding_layer(14, 30, 24) == 11
    assert corresponding_layer(6, 30, 24) == 5
    assert corresponding_layer(29, 30, 24) == 23
    assert corresponding_layer(0, 30, 24) == 0
    assert corresponding_layer(11, 24, 30) == 14
    mapped = [corresponding_layer(la, 30, 24) for la in range(30)]
    assert mapped == sorted(mapped)  # order is kept
    with pytest.raises(ValueError, match="outside"):
        corresponding_layer(30, 30, 24)


def test_a_ridge_map_recovers_a_linear_relation_and_reports_held_out_r2() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=generator)
    true = torch.randn(12, 7, generator=generator)
    y = x @ true + 3.0

    fitted = fit_linear_map(x, y, ridge=1e-8)

    assert torch.allclose(fitted.weight, true.double(), atol=1e-4)
    assert torch.allclose(fitted.apply(x), y.double(), atol=1e-4)
    assert fitted.held_out_r2 == pytest.approx(1.0, abs=1e-6)
    noisy = fit_linear_map(x, y + 5.0 * torch.randn(200, 7, generator=generator), ridge=1e-8)
    assert noisy.held_out_r2 < 0.9  # noise the map cannot predict shows on held-out rows
    shrunk = fit_linear_map(x, y, ridge=10.0)
    assert float(shrunk.weight.norm()) < float(fitted.weight.norm())
    with pytest.raises(ValueError, match="rows"):
        fit_linear_map(x, y[:10])


def test_held_out_r2_gives_no_credit_for_telling_the_poolings_apart() -> None:
    """Two blocks of rows (two poolings) far apart in both spaces, no relation within a
    block: pooled R^2 would be near 1 from the offset alone, the within-block R^2 is not."""
    generator = torch.Generator().manual_seed(1)
    offset_x, offset_y = torch.zeros(6), torch.zeros(4)
    offset_x[0], offset_y[0] = 50.0, 50.0
    x = torch.cat([torch.randn(60, 6, generator=generator) + s * offset_x for s in (0, 1)])
    y = torch.cat([torch.randn(60, 4, generator=generator) + s * offset_y for s in (0, 1)])

    within = fit_linear_map(x, y, ridge=1e-6, groups=2).held_out_r2
    predicted = fit_linear_map(x, y, ridge=1e-6).apply(x)

    assert r_squared(predicted, y.double()) > 0.9
    assert within < 0.2


def test_transport_within_one_model_gives_back_the_adapter(llama: LoadedModel) -> None:
    """Source = target with a negligible ridge: the maps are the identity on the data's span,
    so vectors, norms, probes and biases come back (48 prompts x 2 poolings > 64 dims)."""
    source = gated_adapter(llama)

    result = transport_adapter(
        source, llama, llama, PROMPTS, config=TransportConfig(ridge=1e-9, show_progress=False)
    )
    moved = result.adapter

    assert result.layer_map == {1: 1, 3: 3}
    for category in CATEGORIES:
        for layer in source.layers:
            original, back = source.effective(category, layer), moved.effective(category, layer)
            assert _cosine(back, original) > 0.9999
            assert float(back.norm()) == pytest.approx(float(original.norm()), rel=1e-3)
        assert _cosine(moved.conditions[category], source.conditions[category]) > 0.9999
        gate = moved.metadata.gate
        assert gate is not None
        assert gate.categories[category].bias == pytest.approx(0.5, abs=1e-3)


def test_transport_into_another_family(llama: LoadedModel, qwen: LoadedModel) -> None:
    source = gated_adapter(llama)
    calibration = PROMPTS[:20]

    result = transport_adapter(
        source, llama, qwen, PROMPTS, calibration, TransportConfig(show_progress=False)
    )
    moved = result.adapter

    moved.check_fits(qwen.family)  # an adapter of the target family, for the target's weights
    assert moved.metadata.base_fingerprint == qwen.fingerprint
    assert result.layer_map == {1: 1, 3: 2} and moved.layers == [1, 2]
    assert moved.categories == source.categories
    recipe = moved.metadata.recipe
    assert recipe["method"] == "transport" and recipe["source"]["adapter"] == source.id
    assert recipe["layer_map"] == {"1": 1, "3": 2}
    assert set(recipe["map"]["held_out_r2"]) == {"1", "3"}
    norms = recipe["typical_norm"]
    for category in CATEGORIES:
        for s_layer, t_layer in result.layer_map.items():
            relative_source = (
                float(source.effective(category, s_layer).norm()) / norms["source"][str(s_layer)]
            )
            relative_target = (
                float(moved.effective(category, t_layer).norm()) / norms["target"][str(t_layer)]
            )
            assert relative_target == pytest.approx(relative_source, rel=1e-2)
    # The gate reads target layer 0 and fires on at most its target share of the
    # calibration prompts, by construction of the recalibrated thresholds.
    gate = PromptGate.from_adapter(moved)
    assert gate.detection_layer == 0
    acts = prompt_activations(qwen.model, qwen.tokenizer, calibration, [0], show_progress=False)
    scores = acts["mean"][:, 0] @ gate.directions.T + gate.bias
    assert float((scores > gate.threshold).any(dim=1).double().mean()) <= 0.1
    assert recipe["gate"]["calibration_prompts"] == 20


def test_a_source_adapter_of_another_family_is_refused(
    llama: LoadedModel, qwen: LoadedModel
) -> None:
    with pytest.raises(AdapterMismatch):
        transport_adapter(gated_adapter(qwen, layers=(1, 2)), llama, qwen, PROMPTS)


def test_a_gate_that_would_land_on_a_steering_layer_is_refused(
    llama: LoadedModel, qwen: LoadedModel
) -> None:
    # Detection layer 1 of 4 and steering layer 2 of 4 both land on layer 1 of 3.
    source = gated_adapter(llama, layers=(2, 3), detection=1)
    with pytest.raises(ValueError, match="not before steering layers"):
        transport_adapter(source, llama, qwen, PROMPTS)
    vectors_only = transport_adapter(
        source, llama, qwen, PROMPTS, config=TransportConfig(gate=False, show_progress=False)
    )
    assert vectors_only.adapter.metadata.gate is None


def test_cosine_table_compares_within_one_family(llama: LoadedModel, qwen: LoadedModel) -> None:
    adapter = gated_adapter(llama)
    table = cosine_table(adapter, adapter)
    assert all(value == pytest.approx(1.0) for row in table.values() for value in row.values())
    flipped = -adapter
    assert all(
        v == pytest.approx(-1.0)
        for row in cosine_table(adapter, flipped).values()
        for v in row.values()
    )
    with pytest.raises(ValueError, match="families"):
        cosine_table(adapter, gated_adapter(qwen, layers=(1, 2)))


def test_the_command_line_writes_a_target_family_adapter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], single_torch_thread: None
) -> None:
    source_dir = save_tiny_chat_folder(tmp_path / "llama")
    target_dir = save_tiny_chat_folder(tmp_path / "qwen", "qwen2")
    source = gated_adapter(tiny_loaded_model("llama"))
    recipe = {"merge": "orthogonal", "model": {"source": str(source_dir)}}
    source = replace(source, metadata=replace(source.metadata, recipe=recipe))
    source_path = source.save(tmp_path / "source.safetensors")
    prompts = tmp_path / "benign.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{p}"}}\n' for p in PROMPTS), encoding="utf-8")
    out = tmp_path / "moved.safetensors"

    code = cli.main(
        [
            "transport",
            "--source",
            str(source_path),
            "--target-model",
            str(target_dir),
            "--fit-prompts",
            str(prompts),
            "--out",
            str(out),
            "--quiet",
        ]
    )

    assert code == 0, capsys.readouterr().err
    moved = SafetyAdapter.load(out)
    assert moved.metadata.family == tiny_loaded_model("qwen2").family.id
    assert "--source-model" in moved.metadata.recipe["command"]
    assert "layer 1 -> 1" in capsys.readouterr().out
    missing = cli.main(
        [
            "transport",
            *("--source", str(tmp_path / "nope.safetensors")),
            *("--target-model", "x", "--out", str(out)),
        ]
    )
    assert missing == 2
    assert "error:" in capsys.readouterr().err


def test_linear_map_digest_follows_its_weights() -> None:
    weight = torch.eye(3, dtype=torch.float64)
    zeros = torch.zeros(3, dtype=torch.float64)
    same = LinearMap(weight, zeros, zeros, 0.1, 1.0)
    other = LinearMap(weight * 2, zeros, zeros, 0.1, 1.0)
    assert same.sha256() == LinearMap(weight.clone(), zeros, zeros, 0.1, 1.0).sha256()
    assert same.sha256() != other.sha256()
