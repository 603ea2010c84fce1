"""A calibrated adapter served for its fine-tune, next to the family adapter it came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from tiny_lora import make_tiny_lora, save_tiny_chat_folder

from safesteer.adapters.calibrate import CalibrationConfig, calibrate
from safesteer.adapters.loading import load_model
from safesteer.server.app import create_app
from safesteer.server.settings import Settings
from safesteer.server.startup import build_server

LLAMA = "llama-64x4"


def test_a_calibrated_adapter_is_pinned_to_its_fine_tune(
    tmp_path: Path, random_adapter: Any, single_torch_thread: None
) -> None:
    base_folder = save_tiny_chat_folder(tmp_path / "base")
    make_tiny_lora(tmp_path / "ft" / "arith", seed=1)
    base = load_model(str(base_folder))
    tuned = load_model(f"{base_folder}+{tmp_path / 'ft' / 'arith'}")
    family = random_adapter(base.model, layers=(1, 2), norm=6.0, name="fam")
    family.save(tmp_path / "adapters" / "fam" / "adapter.safetensors")
    config = CalibrationConfig(shots=4, grid=(0.5, 1.0, 2.0), show_progress=False)
    calibrated = calibrate(family, tuned, base, config).adapter
    calibrated.save(tmp_path / "adapters" / "fam" / "calibrated.safetensors")
    # Same vectors, so the same payload sha: only its own name keeps its id apart.
    assert calibrated.payload_sha256 == family.payload_sha256
    assert calibrated.id != family.id

    registry = tmp_path / "registry.toml"
    registry.write_text(
        'adapter_dir = "adapters"\n\n'
        f'[[models]]\nname = "base"\nsource = "{base_folder}"\n\n'
        f'[[models]]\nname = "arith"\nsource = "{tuned.source}"\n'
        'adapter = "fam/calibrated.safetensors"\n\n'
        f'[[families]]\nfamily = "{LLAMA}"\nadapters = ["fam/adapter.safetensors"]\n'
    )
    settings = Settings(config=registry, state_dir=tmp_path / "state", cache_dir=tmp_path / "c")
    with TestClient(create_app(settings, build_server(settings))) as client:
        cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
        assert cards["base"]["adapter"] == family.id
        assert cards["arith"]["adapter"] == calibrated.id
        body = {
            "model": "arith",
            "messages": [{"role": "user", "content": "What is 12 + 30?"}],
            "max_tokens": 4,
            "temperature": 0,
            "safety": {"mode": "always"},
        }
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["safety"]["adapter"] == calibrated.id
