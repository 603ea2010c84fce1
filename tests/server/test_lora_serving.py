"""Fine-tunes served side by side: `BASE+LORA_DIR` sources in one registry config."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tiny_chat import chat_ids, plain_greedy
from tiny_lora import make_tiny_lora, save_tiny_chat_folder

from safesteer.adapters.loading import load_model
from safesteer.server.app import create_app
from safesteer.server.cli import main
from safesteer.server.settings import Settings
from safesteer.server.startup import build_server

LLAMA = "llama-64x4"
PROMPT = "What is 12 + 30?"
TOKENS = 12


@pytest.fixture
def zoo(tmp_path: Path, random_adapter: Any, single_torch_thread: None) -> dict[str, Any]:
    """The tiny base, two LoRA fine-tunes of it, and the family's adapter, in one config."""
    base = save_tiny_chat_folder(tmp_path / "base")
    sources = {
        "base": str(base),
        "arith": f"{base}+{tmp_path / 'ft' / 'arith'}",
        "style": f"{base}+{tmp_path / 'ft' / 'style'}",
    }
    make_tiny_lora(tmp_path / "ft" / "arith", seed=1)
    make_tiny_lora(tmp_path / "ft" / "style", seed=2)
    adapter = random_adapter(load_model(str(base)).model, layers=(1, 2), norm=6.0, name="fam")
    adapter.save(tmp_path / "adapters" / "fam" / "adapter.safetensors")
    models = "".join(
        f'[[models]]\nname = "{name}"\nsource = "{source}"\n\n' for name, source in sources.items()
    )
    config = tmp_path / "registry.toml"
    config.write_text(
        f'adapter_dir = "adapters"\n\n{models}[[families]]\nfamily = "{LLAMA}"\n'
        'adapters = ["fam/adapter.safetensors"]\n'
    )
    return {"config": config, "sources": sources, "adapter": adapter, "tmp": tmp_path}


@pytest.fixture
def served(zoo: dict[str, Any]) -> Iterator[TestClient]:
    tmp = zoo["tmp"]
    settings = Settings(config=zoo["config"], state_dir=tmp / "state", cache_dir=tmp / "cache")
    with TestClient(create_app(settings, build_server(settings))) as client:
        yield client


def _answer(client: TestClient, model: str, mode: str) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": TOKENS,
        "temperature": 0,
        "safety": {"mode": mode},
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    payload: dict[str, Any] = response.json()
    return payload


def test_fine_tunes_are_served_side_by_side_in_the_base_family(
    served: TestClient, zoo: dict[str, Any]
) -> None:
    cards = {card["id"]: card for card in served.get("/v1/models").json()["data"]}
    assert set(cards) == {"base", "arith", "style"}
    for card in cards.values():
        assert card["family"] == LLAMA
        assert card["adapter"] == zoo["adapter"].id  # the family's adapter applies to each

    # Each name routes to its own weights: unsteered, each answers exactly what its merged
    # model answers alone, and the three answers differ.
    unsteered = {}
    for name, source in zoo["sources"].items():
        loaded = load_model(source)
        expected = plain_greedy(loaded, chat_ids(loaded.tokenizer, PROMPT), TOKENS)
        answer = _answer(served, name, "off")
        assert answer["choices"][0]["message"]["content"] == expected, name
        unsteered[name] = expected
    assert len(set(unsteered.values())) == 3

    # Steering applies to the fine-tunes: the family adapter changes their answers.
    for name in ("arith", "style"):
        steered = _answer(served, name, "always")
        assert steered["safety"]["adapter"] == zoo["adapter"].id
        assert steered["choices"][0]["message"]["content"] != unsteered[name]


def test_serve_refuses_a_bad_lora_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = save_tiny_chat_folder(tmp_path / "base")
    make_tiny_lora(tmp_path / "qwen-lora", seed=1, architecture="qwen2")
    capsys.readouterr()
    flags = ["--state-dir", str(tmp_path / "state"), "--no-adapter"]
    assert main(["serve", "--model", f"{base}+{tmp_path / 'missing'}", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: LoRA folder") and "missing does not exist" in err
    assert "Traceback" not in err

    config = tmp_path / "registry.toml"
    config.write_text(
        f'[[models]]\nname = "ok"\nsource = "{base}"\n\n'
        f'[[models]]\nname = "bad"\nsource = "{base}+{tmp_path / "qwen-lora"}"\n'
    )
    assert main(["serve", "--config", str(config), *flags]) == 2
    err = capsys.readouterr().err
    assert "qwen-lora does not fit the base model 'base'" in err and "size mismatch" in err
    assert "Traceback" not in err
