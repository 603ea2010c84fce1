"""`export-gguf`: llama.cpp control vectors of one category mix, read back with GGUFReader."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader

from safesteer.adapters import cli as adapters_cli
from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.errors import UnknownCategory
from safesteer.adapters.family import ModelFamily
from safesteer.adapters.gguf_export import (
    ControlVectorExportError,
    direction_name,
    export_control_vector,
    mix_control_vector,
)
from safesteer.server import cli as server_cli

if TYPE_CHECKING:
    from conftest import AdapterFactory

FAMILY = ModelFamily("llama", 64, 5)
LAYERS = (1, 3)


@pytest.fixture
def adapter(random_adapter: AdapterFactory) -> SafetyAdapter:
    # categories violence, fraud, drugs; default weights 1, 1, 0
    return random_adapter(FAMILY, layers=LAYERS, norm=3.0)


def _read(path: Path) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    reader = GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        assert tensor.tensor_type == GGMLQuantizationType.F32
        tensors[tensor.name] = np.array(tensor.data, dtype=np.float32)
    return fields, tensors


def _expected(adapter: SafetyAdapter, weights: Mapping[str, float], layer: int) -> torch.Tensor:
    total = torch.zeros(adapter.metadata.hidden_size)
    for category, weight in weights.items():
        total += weight * adapter.effective(category, layer)
    return total


def test_export_round_trip_holds_the_mixed_effective_vectors(
    adapter: SafetyAdapter, tmp_path: Path
) -> None:
    path = tmp_path / "cv.gguf"
    export_control_vector(adapter, path, {"violence": 1.0, "fraud": 0.5}, strength=2.0)
    fields, tensors = _read(path)
    assert fields["general.architecture"] == "controlvector"
    assert fields["controlvector.model_hint"] == "llama"
    assert fields["controlvector.layer_count"] == FAMILY.num_layers - 1
    assert fields["safesteer.adapter_id"] == adapter.id
    # one slot per decoder layer except layer 0; direction.N = output of decoder layer N
    assert sorted(tensors) == [f"direction.{n}" for n in range(1, FAMILY.num_layers)]
    mix = {"violence": 2.0, "fraud": 1.0, "drugs": 0.0}  # drugs keeps its default weight 0
    for layer in range(1, FAMILY.num_layers):
        got = torch.from_numpy(tensors[f"direction.{layer}"])
        assert got.shape == (FAMILY.hidden_size,)
        expected = _expected(adapter, mix, layer) if layer in LAYERS else torch.zeros(64)
        assert torch.allclose(got, expected, atol=1e-6), layer
        assert (got.any().item()) == (layer in LAYERS)


def test_default_mix_and_only(adapter: SafetyAdapter) -> None:
    default = mix_control_vector(adapter)
    assert default.weights == {"violence": 1.0, "fraud": 1.0, "drugs": 0.0}
    assert torch.allclose(default.directions[3], _expected(adapter, default.weights, 3), atol=1e-6)
    only = mix_control_vector(adapter, {"drugs": 0.5}, only=True)
    assert only.weights == {"violence": 0.0, "fraud": 0.0, "drugs": 0.5}
    assert torch.allclose(only.directions[1], 0.5 * adapter.effective("drugs", 1), atol=1e-6)
    assert set(only.directions) == set(LAYERS)


@pytest.mark.parametrize(
    ("weights", "strength", "only"),
    [({}, 0.0, False), ({"violence": 0.0, "fraud": 0.0}, 1.0, False), ({}, 1.0, True)],
)
def test_a_mix_of_zero_is_refused(
    adapter: SafetyAdapter,
    tmp_path: Path,
    weights: dict[str, float],
    strength: float,
    only: bool,
) -> None:
    path = tmp_path / "cv.gguf"
    with pytest.raises(ControlVectorExportError, match="adds nothing"):
        export_control_vector(adapter, path, weights, strength=strength, only=only)
    assert not path.exists()


def test_bad_mixes_and_layer_zero_are_refused(
    adapter: SafetyAdapter, random_adapter: AdapterFactory
) -> None:
    with pytest.raises(ControlVectorExportError, match="between 0 and"):
        mix_control_vector(adapter, {"violence": -1.0})
    with pytest.raises(ControlVectorExportError, match="between 0 and"):
        mix_control_vector(adapter, strength=float("nan"))
    with pytest.raises(UnknownCategory):
        mix_control_vector(adapter, {"gambling": 1.0})
    with pytest.raises(ControlVectorExportError, match="layer 0"):
        mix_control_vector(random_adapter(FAMILY, layers=(0, 2)))
    with pytest.raises(ControlVectorExportError, match=r"direction\.0 is invalid"):
        direction_name(0)
    assert direction_name(7) == "direction.7"


def test_cli_export_gguf_end_to_end(
    adapter: SafetyAdapter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter_file = adapter.save(tmp_path / "tiny.safetensors")
    out = tmp_path / "out" / "cv.gguf"
    argv = ["export-gguf", str(adapter_file), "--out", str(out)]
    assert server_cli.main([*argv, "--categories", "violence=1,fraud=0.5", "--strength", "2"]) == 0
    printed = capsys.readouterr().out
    assert "direction.1 (output of decoder layer 1)" in printed
    assert "violence=2, fraud=1, drugs=0" in printed
    _, tensors = _read(out)
    mix = {"violence": 2.0, "fraud": 1.0}
    assert np.allclose(tensors["direction.3"], _expected(adapter, mix, 3).numpy(), atol=1e-6)

    assert adapters_cli.main([*argv, "--categories", "drugs=1", "--only"]) == 0
    _, tensors = _read(out)
    expected = adapter.effective("drugs", 1).numpy()
    assert np.allclose(tensors["direction.1"], expected, atol=1e-6)

    assert adapters_cli.main([*argv, "--strength", "0"]) == 2
    assert "adds nothing" in capsys.readouterr().err
    missing = str(tmp_path / "nope.safetensors")
    assert adapters_cli.main(["export-gguf", missing, "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        adapters_cli.main([*argv, "--categories", "violence"])
    assert "NAME=WEIGHT" in capsys.readouterr().err
