"""API keys and the toggle policy: who may lower which safety setting."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import serve_tiny
from fastapi.testclient import TestClient
from tiny_chat import TINY_MODEL_NAME

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.loading import LoadedModel
from safesteer.server.app import create_app
from safesteer.server.auth import KeysFileError, KeyStore, add_key, key_sha256
from safesteer.server.cli import main

Keys = dict[str, str]


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Keys]:
    path = tmp_path / "keys.toml"
    made = {
        scope: add_key(path, f"{scope}-user", [scope]) for scope in ("client", "override", "admin")
    }
    return path, made


@pytest.fixture
def secured(
    loaded: LoadedModel, strong_adapter: SafetyAdapter, tmp_path: Path, keys: tuple[Path, Keys]
) -> Iterator[tuple[TestClient, Keys]]:
    """Keys required; 'violence' is mandatory for the family with a floor of 1."""
    config_path = tmp_path / "registry.toml"
    config_path.write_text(
        f"""
[[models]]
name = "{TINY_MODEL_NAME}"
source = "unused-in-this-test"

[[families]]
family = "llama-64x4"
adapters = ["tiny/adapter.safetensors"]
mandatory = {{ violence = 1.0 }}
"""
    )
    config, server = serve_tiny(
        loaded, strong_adapter, tmp_path, keys_file=keys[0], config=config_path
    )
    with TestClient(create_app(config, server)) as client:
        yield client, keys[1]


def ask(client: TestClient, key: str | None, safety: dict[str, Any] | None = None) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    body: dict[str, Any] = {
        "model": TINY_MODEL_NAME,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
    }
    if safety is not None:
        body["safety"] = safety
    return client.post("/v1/chat/completions", json=body, headers=headers)


def test_missing_or_wrong_key_is_401(secured: tuple[TestClient, Keys]) -> None:
    client, _ = secured
    for key in (None, "sk-ss-wrong", ""):
        response = ask(client, key)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    assert client.get("/v1/models").status_code == 401
    assert client.get("/health").status_code == 200  # probes need no key


def test_client_scope_may_add_and_strengthen_only(secured: tuple[TestClient, Keys]) -> None:
    client, keys = secured
    key = keys["client"]
    assert ask(client, key).status_code == 200
    assert ask(client, key, {"categories": {"drugs": 2.0, "fraud": 3.0}}).status_code == 200
    assert ask(client, key, {"strength": 2.0}).status_code == 200
    for safety, param in (
        ({"mode": "off"}, "safety.mode"),
        ({"categories": {"fraud": 0.5}}, "safety.categories.fraud"),
        ({"strength": 0.5}, "safety.strength"),
    ):
        response = ask(client, key, safety)
        assert response.status_code == 403, safety
        error = response.json()["error"]
        assert error["type"] == "permission_error" and error["param"] == param
    named = ask(client, key, {"categories": {"fraud": 0.0}}).json()["error"]["message"]
    assert "'fraud'" in named


def test_override_scope_may_lower_all_but_mandatory(secured: tuple[TestClient, Keys]) -> None:
    client, keys = secured
    key = keys["override"]
    lowered = ask(client, key, {"categories": {"fraud": 0.0, "drugs": 0.0}})
    assert lowered.status_code == 200
    assert lowered.json()["safety"]["categories"]["fraud"] == 0.0
    for safety in ({"categories": {"violence": 0.5}}, {"mode": "off"}, {"strength": 0.5}):
        response = ask(client, key, safety)
        assert response.status_code == 403, safety
        assert "'violence'" in response.json()["error"]["message"]
    assert ask(client, key, {"categories": {"violence": 2.0}, "strength": 0.5}).status_code == 200


def test_admin_scope_may_do_anything_and_only_it_reaches_admin(
    secured: tuple[TestClient, Keys],
) -> None:
    client, keys = secured
    assert ask(client, keys["admin"], {"mode": "off"}).status_code == 200
    for scope in ("client", "override"):
        headers = {"Authorization": f"Bearer {keys[scope]}"}
        response = client.get("/admin/adapters", headers=headers)
        assert response.status_code == 403, scope
    assert client.get("/admin/adapters").status_code == 401
    ok = client.get("/admin/adapters", headers={"Authorization": f"Bearer {keys['admin']}"})
    assert ok.status_code == 200


def test_audit_names_the_key_holder(secured: tuple[TestClient, Keys]) -> None:
    client, keys = secured
    headers = {"Authorization": f"Bearer {keys['admin']}"}
    client.post("/admin/adapters/load", json={"path": "../x.safetensors"}, headers=headers)
    entries = client.get("/admin/audit", headers=headers).json()["entries"]
    assert entries[-1]["actor"] == "admin-user" and entries[-1]["outcome"] == "refused"


def test_keys_file_stores_only_hashes(keys: tuple[Path, Keys]) -> None:
    path, made = keys
    text = path.read_text()
    for key in made.values():
        assert key not in text and key_sha256(key) in text
    store = KeyStore.load(path)
    principal = store.authenticate(made["override"])
    assert principal is not None and principal.name == "override-user"
    assert store.authenticate("sk-ss-nope") is None
    with pytest.raises(KeysFileError, match="already exists"):
        add_key(path, "client-user", ["client"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not toml [", "not readable TOML"),
        ("[[keys]]\nname = 'x'\nsha256 = 'short'\nscopes = ['client']\n", "64 hex"),
        (f"[[keys]]\nname = 'x'\nsha256 = '{'0' * 64}'\nscopes = ['root']\n", "scopes"),
        ("", "defines no keys"),
    ],
)
def test_bad_keys_files_are_refused(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(content)
    with pytest.raises(KeysFileError, match=message):
        KeyStore.load(path)


def test_local_mode_refuses_a_public_address(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "--insecure-no-auth" in capsys.readouterr().err


def test_keys_cli_prints_the_key_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "k.toml"
    assert main(["keys", "add", "--keys-file", str(path), "--name", "ci", "--scope", "client"]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    principal = KeyStore.load(path).authenticate(key)
    assert principal is not None and principal.scopes == frozenset({"client"})
