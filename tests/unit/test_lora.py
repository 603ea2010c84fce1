"""`BASE+LORA_DIR` sources: a peft LoRA merged into the tiny chat model at load.

The LoRA folders are real peft outputs (`save_pretrained`) with seeded, non-zero A and B.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from safesteer.adapters.errors import ModelLoadError
from safesteer.adapters.family import ModelFamily
from safesteer.adapters.loading import load_model
from safesteer.adapters.lora import split_source

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from tiny_chat import chat_ids
from tiny_lora import make_tiny_lora, save_tiny_chat_folder


@pytest.fixture
def base_folder(tmp_path: Path, single_torch_thread: None) -> Path:
    return save_tiny_chat_folder(tmp_path / "tiny-chat")


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = model(torch.tensor([ids])).logits
    return logits


def test_a_merged_lora_keeps_the_family_and_computes_the_peft_models_output(
    base_folder: Path, tmp_path: Path
) -> None:
    unmerged = make_tiny_lora(tmp_path / "arith", seed=1)
    base = load_model(str(base_folder))
    tuned = load_model(f"{base_folder}+{tmp_path / 'arith'}")

    assert tuned.family == base.family == ModelFamily("llama", 64, 4)
    assert tuned.name == "tiny-chat+arith"
    assert tuned.fingerprint != base.fingerprint
    # Merged into plain Linear layers: nothing of peft is left for the hooks to trip on.
    assert not any("lora" in name for name, _ in tuned.model.named_parameters())
    assert not hasattr(tuned.model, "peft_config")

    ids = chat_ids(tuned.tokenizer, "What is 2 + 3?")
    merged_logits = _logits(tuned.model, ids)
    assert not torch.allclose(merged_logits, _logits(base.model, ids), atol=1e-3)
    assert torch.allclose(merged_logits, _logits(unmerged, ids), atol=1e-5)


def test_two_loras_chain_left_to_right(base_folder: Path, tmp_path: Path) -> None:
    make_tiny_lora(tmp_path / "a", seed=1)
    make_tiny_lora(tmp_path / "b", seed=2, targets=("k_proj", "up_proj"))
    one = load_model(f"{base_folder}+{tmp_path / 'a'}")
    two = load_model(f"{base_folder}+{tmp_path / 'a'}+{tmp_path / 'b'}")
    assert two.name == "tiny-chat+a+b"
    assert two.family == one.family
    assert two.fingerprint != one.fingerprint
    # LoRA b touches k and up projections only; a's merged q projection is unchanged by it.
    layer_one, layer_two = one.model.model.layers[0], two.model.model.layers[0]
    assert torch.equal(layer_one.self_attn.q_proj.weight, layer_two.self_attn.q_proj.weight)
    assert not torch.equal(layer_one.self_attn.k_proj.weight, layer_two.self_attn.k_proj.weight)


def test_loading_a_lora_leaves_the_global_seed_alone(base_folder: Path, tmp_path: Path) -> None:
    make_tiny_lora(tmp_path / "a", seed=1)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    load_model(f"{base_folder}+{tmp_path / 'a'}")
    assert torch.equal(torch.rand(3), expected)


def test_split_source() -> None:
    assert split_source("smollm2-135m-instruct") == ("smollm2-135m-instruct", ())
    assert split_source("smollm2-135m-instruct+finetunes/arith") == (
        "smollm2-135m-instruct",
        (Path("finetunes/arith"),),
    )
    with pytest.raises(ModelLoadError, match="empty part"):
        split_source("smollm2-135m-instruct+")


def test_a_folder_whose_name_holds_a_plus_is_a_plain_source(tmp_path: Path) -> None:
    folder = save_tiny_chat_folder(tmp_path / "chat+v2")
    assert split_source(str(folder)) == (str(folder), ())
    assert load_model(str(folder)).name == "chat+v2"


def _rename_layer(folder: Path, old: str, new: str) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = {key.replace(old, new): value for key, value in load_file(path).items()}
    save_file(tensors, path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing", "does not exist"),
        ("no-config", "has no adapter_config.json"),
        ("not-lora", "'IA3' peft adapter, not a LoRA"),
        ("pickle-only", "adapter_model.bin is a pickle and is not loaded"),
        ("other-shape", "does not fit the base model .*size mismatch"),
        ("other-targets", "does not fit the base model .*Target modules .*c_attn.* not found"),
        ("extra-layer", "does not fit the base model .*modules the base lacks: .*layers\\.9\\."),
        ("missing-tensor", "does not fit the base model .*no weights in adapter_model"),
    ],
)
def test_a_bad_lora_is_refused_naming_the_lora_and_the_base(
    base_folder: Path, tmp_path: Path, damage: str, message: str
) -> None:
    lora = tmp_path / "bad-lora"
    make_tiny_lora(lora, seed=1, architecture="qwen2" if damage == "other-shape" else "llama")
    config_file = lora / "adapter_config.json"
    weights_file = lora / "adapter_model.safetensors"
    config = json.loads(config_file.read_text())
    if damage == "missing":
        lora = tmp_path / "nowhere"
    elif damage == "no-config":
        config_file.unlink()
    elif damage == "not-lora":
        config_file.write_text(json.dumps({**config, "peft_type": "IA3"}))
    elif damage == "pickle-only":
        weights_file.rename(lora / "adapter_model.bin")
    elif damage == "other-targets":
        config_file.write_text(json.dumps({**config, "target_modules": ["c_attn"]}))
    elif damage == "extra-layer":
        _rename_layer(lora, "layers.3.", "layers.9.")
    elif damage == "missing-tensor":
        tensors = load_file(weights_file)
        dropped = next(key for key in tensors if "layers.2.self_attn.q_proj.lora_B" in key)
        save_file({k: v for k, v in tensors.items() if k != dropped}, weights_file)
    with pytest.raises(ModelLoadError, match=message) as info:
        load_model(f"{base_folder}+{lora}")
    assert str(lora) in str(info.value)
    if damage in ("other-shape", "other-targets", "extra-layer", "missing-tensor"):
        assert "'tiny-chat'" in str(info.value)
