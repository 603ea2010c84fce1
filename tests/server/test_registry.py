"""The registry config: two families served at once from real folders, routing, metrics, state."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from tiny_chat import tiny_loaded_model

from safesteer.adapters.adapter import AdapterMetadata, CategorySpec, SafetyAdapter
from safesteer.adapters.errors import AdapterError
from safesteer.adapters.loading import LoadedModel
from safesteer.adapters.signing import generate_keypair, sign_file
from safesteer.server.adapter_store import FamilyAdapters
from safesteer.server.app import create_app
from safesteer.server.cli import main
from safesteer.server.config import ConfigError, RegistryConfig
from safesteer.server.logs import JsonFormatter, RequestIdFilter
from safesteer.server.settings import Settings
from safesteer.server.startup import build_server

LLAMA, QWEN = "llama-64x4", "qwen2-48x3"


def _save(loaded: LoadedModel, folder: Path) -> Path:
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def two_families(tmp_path: Path, random_adapter: Any) -> dict[str, Any]:
    """Model folders of two tiny families, two adapters for llama and one for qwen2."""
    llama, qwen = tiny_loaded_model(), tiny_loaded_model("qwen2", name="tiny-qwen")
    adapters = {
        "llama-a": random_adapter(llama.model, layers=(1, 2), norm=6.0, name="llama-a"),
        "llama-b": random_adapter(llama.model, layers=(0,), norm=6.0, seed=3, name="llama-b"),
        "qwen-a": random_adapter(qwen.model, layers=(1,), norm=6.0, name="qwen-a"),
    }
    for name, adapter in adapters.items():
        adapter.save(tmp_path / "adapters" / name / "adapter.safetensors")
    config = tmp_path / "registry.toml"
    config.write_text(
        f"""
adapter_dir = "adapters"

[[models]]
name = "chat-llama"
source = "{_save(llama, tmp_path / "llama")}"

[[models]]
name = "chat-llama-pinned"
source = "{tmp_path / "llama"}"
adapter = "llama-b/adapter.safetensors"

[[models]]
name = "chat-qwen"
source = "{_save(qwen, tmp_path / "qwen")}"

[[families]]
family = "{LLAMA}"
adapters = ["llama-a/adapter.safetensors", "llama-b/adapter.safetensors"]
"""
    )
    return {"config": config, "adapters": adapters, "tmp": tmp_path}


@pytest.fixture
def multi(two_families: dict[str, Any]) -> Iterator[TestClient]:
    tmp = two_families["tmp"]
    settings = Settings(
        config=two_families["config"], state_dir=tmp / "state", cache_dir=tmp / "cache"
    )
    with TestClient(create_app(settings, build_server(settings))) as client:
        yield client


def chat(client: TestClient, model: str) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    payload: dict[str, Any] = response.json()
    return payload


def test_two_families_route_by_model_with_their_own_adapters(
    multi: TestClient, two_families: dict[str, Any]
) -> None:
    ids = {name: a.id for name, a in two_families["adapters"].items()}
    cards = {m["id"]: m for m in multi.get("/v1/models").json()["data"]}
    assert cards["chat-llama"]["family"] == LLAMA and cards["chat-qwen"]["family"] == QWEN
    assert chat(multi, "chat-llama")["safety"]["adapter"] == ids["llama-a"]
    assert chat(multi, "chat-llama-pinned")["safety"]["adapter"] == ids["llama-b"]
    # qwen2 is not in the config's families: its built-in adapter is found in the folder.
    assert chat(multi, "chat-qwen")["safety"]["adapter"] == ids["qwen-a"]
    missing = multi.post("/v1/chat/completions", json={"messages": [], "max_tokens": 1})
    assert missing.status_code in (400, 404)

    # Swapping llama's active adapter changes llama's unpinned model only.
    swap = multi.post(f"/admin/families/{LLAMA}/activate", json={"adapter": ids["llama-b"]})
    assert swap.status_code == 200
    assert chat(multi, "chat-llama")["safety"]["adapter"] == ids["llama-b"]
    assert chat(multi, "chat-qwen")["safety"]["adapter"] == ids["qwen-a"]
    # A llama adapter cannot become qwen's: a 400 naming both families; nothing changes.
    wrong = multi.post(f"/admin/families/{QWEN}/activate", json={"adapter": ids["llama-a"]})
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "adapter_refused"
    assert LLAMA in wrong.json()["error"]["message"] and QWEN in wrong.json()["error"]["message"]
    assert chat(multi, "chat-qwen")["safety"]["adapter"] == ids["qwen-a"]
    # The pinned adapter cannot be unloaded; it is not active either.
    pinned = multi.delete(f"/admin/families/{LLAMA}/adapters/{ids['llama-b']}")
    assert pinned.status_code == 409


def _serve_config(tmp: Path, config: Path) -> TestClient:
    settings = Settings(config=config, state_dir=tmp / "state", cache_dir=tmp / "cache")
    return TestClient(create_app(settings, build_server(settings)))


def test_a_family_with_active_none_serves_unsteered_until_an_admin_activates_one(
    two_families: dict[str, Any],
) -> None:
    tmp, qwen_a = two_families["tmp"], two_families["adapters"]["qwen-a"]
    config = tmp / "none.toml"
    config.write_text(
        f'adapter_dir = "adapters"\n[[models]]\nname = "chat-qwen"\nsource = "{tmp / "qwen"}"\n'
        f'[[families]]\nfamily = "{QWEN}"\nactive = "none"\n'
    )
    with _serve_config(tmp, config) as client:
        # Its built-in adapter is in the folder, yet `active = "none"` serves it unsteered.
        safety = chat(client, "chat-qwen")["safety"]
        assert safety["family"] == QWEN and safety["adapter"] is None and safety["mode"] == "off"
        assert client.get("/admin/adapters").json()["families"] == {QWEN: []}
        loaded = client.post("/admin/adapters/load", json={"path": "qwen-a/adapter.safetensors"})
        assert loaded.status_code == 200 and loaded.json()["active"] is False
        activated = client.post(f"/admin/families/{QWEN}/activate", json={"adapter": qwen_a.id})
        assert activated.status_code == 200
        assert chat(client, "chat-qwen")["safety"]["adapter"] == qwen_a.id


def test_a_model_cannot_pin_an_adapter_of_another_family(two_families: dict[str, Any]) -> None:
    tmp = two_families["tmp"]
    config = tmp / "pin.toml"
    config.write_text(
        f'adapter_dir = "adapters"\n[[models]]\nname = "chat-llama"\nsource = "{tmp / "llama"}"\n'
        f'[[models]]\nname = "chat-qwen"\nsource = "{tmp / "qwen"}"\n'
        'adapter = "llama-a/adapter.safetensors"\n'
    )
    settings = Settings(config=config, state_dir=tmp / "state", cache_dir=tmp / "cache")
    with pytest.raises(AdapterError, match=f"chat-qwen \\(family {QWEN}\\).*family {LLAMA}"):
        build_server(settings)


def test_ready_and_metrics_reflect_requests_and_swaps(
    multi: TestClient, two_families: dict[str, Any]
) -> None:
    ready = multi.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    chat(multi, "chat-llama")
    chat(multi, "chat-llama")
    b_id = two_families["adapters"]["llama-b"].id
    multi.post(f"/admin/families/{LLAMA}/activate", json={"adapter": b_id})
    text = multi.get("/metrics").text
    lines = text.splitlines()

    def value(prefix: str) -> float:
        return float(next(line for line in lines if line.startswith(prefix)).split()[-1])

    route = 'route="/v1/chat/completions"'
    assert value(f'safesteer_http_requests_total{{method="POST",{route},status="200"}}') == 2
    assert value('safesteer_completion_tokens_total{model="chat-llama"}') >= 2
    assert value(f'safesteer_adapter_swaps_total{{family="{LLAMA}"}}') == 1
    assert value('safesteer_queue_depth{model="chat-qwen"}') == 0
    info = next(line for line in lines if line.startswith("safesteer_active_adapter_info"))
    assert f'family="{LLAMA}"' in text and b_id in text and info.endswith("1.0")
    assert 'safesteer_category_applied_total{category="violence",family="llama-64x4"}' in text


def test_request_ids_are_echoed_and_logged(multi: TestClient) -> None:
    records: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Capture()
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("safesteer")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        response = multi.post(
            "/admin/adapters/load",
            json={"path": "llama-b/adapter.safetensors"},
            headers={"X-Request-Id": "req-42"},
        )
        activated = multi.post(
            f"/admin/families/{LLAMA}/activate",
            json={"adapter": response.json()["id"]},
            headers={"X-Request-Id": "req-43"},
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert response.headers["x-request-id"] == "req-42"
    assert activated.headers["x-request-id"] == "req-43"
    tagged = [r for r in records if getattr(r, "request_id", None) == "req-43"]
    assert tagged, "the activation's log line carries its request id"
    line = json.loads(JsonFormatter().format(tagged[0]))
    assert line["request_id"] == "req-43" and line["level"] == "info"
    generated = multi.get("/health").headers["x-request-id"]
    assert len(generated) == 32


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("models = [", "not valid TOML"),
        ("[[models]]\nname = 'x'\n", "models.0.source"),
        ("[[models]]\nname = 'x'\nsource = 'y'\nlora = 'z'\n", "lora"),
        (
            "[[models]]\nname = 'x'\nsource = 'y'\n[[families]]\nfamily = 'f'\n"
            "adapters = ['a.safetensors']\nactive = 'b.safetensors'\n",
            "not listed",
        ),
        ("[[models]]\nname = 'x'\nsource = 'y'\n[[models]]\nname = 'x'\nsource = 'z'\n", "unique"),
        (
            "[[models]]\nname = 'x'\nsource = 'y'\n[[families]]\nfamily = 'f'\n"
            "active = 'none'\nmandatory = { violence = 1.0 }\n",
            "mandatory floors need an active adapter",
        ),
    ],
)
def test_bad_configs_are_refused_clearly(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        RegistryConfig.load(path)


def test_serve_reports_a_bad_config_and_exits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_sign_and_verify_commands(
    tmp_path: Path, strong_adapter: SafetyAdapter, capsys: pytest.CaptureFixture[str]
) -> None:
    path = strong_adapter.save(tmp_path / "a.safetensors")
    assert main(["keygen", "--signer", "release", "--out", str(tmp_path / "keys")]) == 0
    assert (tmp_path / "keys" / "release.key").stat().st_mode & 0o077 == 0
    assert main(["sign", str(path), "--key", str(tmp_path / "keys" / "release.key")]) == 0
    trusted = ["--trusted-keys-dir", str(tmp_path / "keys")]
    capsys.readouterr()
    assert main(["verify", str(path), *trusted]) == 0
    assert "signed by 'release'" in capsys.readouterr().out
    generate_keypair(tmp_path / "other", "other")
    sign_file(path, tmp_path / "other" / "other.key")
    assert main(["verify", str(path), *trusted]) == 1
    assert "not trusted" in capsys.readouterr().err
    sign_file(path, tmp_path / "keys" / "release.key")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    assert main(["verify", str(path), *trusted]) == 1
    assert "another file" in capsys.readouterr().err
    assert main(["keygen", "--signer", "release", "--out", str(tmp_path / "keys")]) == 2


def test_the_example_config_is_valid() -> None:
    path = Path(__file__).resolve().parents[2] / "deploy" / "registry.example.toml"
    config = RegistryConfig.load(path)
    assert config.adapter_dir is not None
    for family in config.families:
        for adapter in family.adapters:
            SafetyAdapter.load(config.adapter_dir / adapter)


def test_a_family_can_merge_its_categories_orthogonally(loaded: LoadedModel) -> None:
    """Two categories with one shared vector: `orthogonal` counts it once, `naive` twice."""
    vector = torch.randn(loaded.family.hidden_size)
    specs = {c: CategorySpec(c) for c in ("violence", "fraud")}
    adapter = SafetyAdapter(
        AdapterMetadata.for_family("shared", loaded.family, specs),
        {c: {1: vector} for c in specs},
        {c: {1: 1.0} for c in specs},
    )
    tables = {}
    for scheme in ("naive", "orthogonal"):
        store = FamilyAdapters(loaded.family, merge=scheme)
        basis = store.add(adapter, origin="x", file_sha256="0", signer=None).basis
        tables[scheme] = basis.table(torch.tensor([[1.0, 1.0]]))[0, 1]
    assert torch.allclose(tables["naive"], 2 * vector)
    assert torch.allclose(tables["orthogonal"], vector, atol=1e-5)

    # No scheme configured: each adapter steers under the scheme its recipe was calibrated for.
    recipe = {"merge": "orthogonal"}
    calibrated = replace(adapter, metadata=replace(adapter.metadata, recipe=recipe))
    for held, expected in ((adapter, "naive"), (calibrated, "orthogonal")):
        record = FamilyAdapters(loaded.family).add(held, origin="x", file_sha256="0", signer=None)
        assert torch.equal(record.basis.table(torch.tensor([[1.0, 1.0]]))[0, 1], tables[expected])


def test_an_unknown_merge_scheme_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "merge.toml"
    path.write_text(
        "[[models]]\nname = 'x'\nsource = 'y'\n[[families]]\nfamily = 'f'\nmerge = 'average'\n"
    )
    with pytest.raises(ConfigError, match="merge"):
        RegistryConfig.load(path)
