"""The `safesteer` command: help, inspect, and serve refusing what it cannot serve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.errors import AdapterMismatch
from safesteer.adapters.family import ModelFamily
from safesteer.adapters.loading import LoadedModel, load_model
from safesteer.server.adapter_store import FamilyAdapters
from safesteer.server.cli import main
from safesteer.server.settings import Settings


@pytest.fixture
def model_folder(tmp_path: Path, loaded: LoadedModel) -> Path:
    folder = tmp_path / "tiny-chat"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def test_serve_help_lists_every_setting_with_its_env_var(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in out
    assert "SAFESTEER_MAX_BATCH_SIZE" in out


def test_inspect_prints_metadata_and_norms(
    tmp_path: Path, strong_adapter: SafetyAdapter, capsys: pytest.CaptureFixture[str]
) -> None:
    path = strong_adapter.save(tmp_path / "a.safetensors")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert strong_adapter.id in out
    assert "llama-64x4" in out
    fraud_norm = strong_adapter.norms()["fraud"][1]
    assert f"L1={fraud_norm:.2f}" in out


def test_inspect_refuses_a_non_adapter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"not a safetensors file")
    assert main(["inspect", str(path)]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err


def test_model_loads_from_a_hugging_face_folder(model_folder: Path) -> None:
    loaded = load_model(str(model_folder))
    assert loaded.family == ModelFamily("llama", 64, 4)
    assert loaded.name == "tiny-chat"


def test_serve_refuses_an_adapter_of_another_family(
    tmp_path: Path,
    model_folder: Path,
    random_adapter: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    other = random_adapter(ModelFamily("llama", 32, 4), layers=(1,))
    path = other.save(tmp_path / "other.safetensors")
    status = main(["serve", "--model", str(model_folder), "--adapter", str(path)])
    assert status == 2
    err = capsys.readouterr().err
    assert "hidden_size" in err and "32" in err and "64" in err


def test_family_store_refuses_a_mismatched_adapter(
    loaded: LoadedModel, random_adapter: Any
) -> None:
    other = random_adapter(ModelFamily("llama", 64, 6), layers=(5,))
    with pytest.raises(AdapterMismatch) as info:
        FamilyAdapters(loaded.family).add(other, origin="x", file_sha256="0", signer=None)
    assert info.value.field == "num_layers"
    assert (info.value.expected, info.value.found) == (4, 6)


def test_serve_rejects_bad_flag_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--port", "eighty"]) == 2
    assert "--port" in capsys.readouterr().err
