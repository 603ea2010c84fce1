"""`loading.dequantized_folder`: the Hugging Face folder a model loads from, for peers such as
`transformers serve` (bench/serving_bench.py) that read folders only."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from safesteer.adapters.errors import ModelLoadError
from safesteer.adapters.loading import DEFAULT_MODEL, dequantized_folder, load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from tiny_lora import save_tiny_chat_folder


def test_a_folder_is_its_own(tmp_path: Path, single_torch_thread: None) -> None:
    folder = save_tiny_chat_folder(tmp_path / "tiny")
    assert dequantized_folder(str(folder)) == folder
    with pytest.raises(ModelLoadError, match="neither a packaged model"):
        dequantized_folder(str(tmp_path / "missing"))


def test_the_packaged_model_has_a_folder_with_the_same_weights(single_torch_thread: None) -> None:
    folder = dequantized_folder(DEFAULT_MODEL)

    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert load_model(str(folder)).fingerprint == load_model(DEFAULT_MODEL).fingerprint
