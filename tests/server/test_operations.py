"""Operations: hot swap under load, the admin API, refused adapters, audit log, restart state."""

from __future__ import annotations

import base64
import json
import pickle
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import running, serve_tiny, wait_until
from fastapi import FastAPI
from fastapi.testclient import TestClient
from tiny_chat import TINY_MODEL_NAME

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.family import ModelFamily
from safesteer.adapters.loading import LoadedModel
from safesteer.adapters.signing import generate_keypair, sign_file, signature_path
from safesteer.server.app import create_app

A_PATH, B_PATH = "a/adapter.safetensors", "b/adapter.safetensors"
FORCED: dict[str, Any] = {"temperature": 0, "max_tokens": 16, "ignore_eos": True}


@pytest.fixture
def adapter_b(random_adapter: Any, loaded: LoadedModel) -> SafetyAdapter:
    adapter: SafetyAdapter = random_adapter(loaded.model, layers=(0, 3), norm=6.0, seed=1)
    return adapter


@pytest.fixture
def ops_app(
    loaded: LoadedModel,
    strong_adapter: SafetyAdapter,
    adapter_b: SafetyAdapter,
    tmp_path: Path,
) -> Any:
    """Factory: the tiny model with adapter A active and B on disk (not loaded) in the folder."""

    def factory(**settings: Any) -> FastAPI:
        adapter_dir = tmp_path / "adapters"
        for path, adapter in ((A_PATH, strong_adapter), (B_PATH, adapter_b)):
            if not (adapter_dir / path).exists():
                adapter.save(adapter_dir / path)
        settings.setdefault("no_adapter", False)
        config, server = serve_tiny(loaded, None, tmp_path, adapter_dir=adapter_dir, **settings)
        return create_app(config, server)

    return factory


@pytest.fixture
def admin(ops_app: Any) -> Iterator[TestClient]:
    with TestClient(ops_app()) as client:
        yield client


def chat(client: TestClient | httpx.Client, text: str = "hi", **kw: Any) -> dict[str, Any]:
    body = {"model": TINY_MODEL_NAME, "messages": [{"role": "user", "content": text}], **FORCED}
    response = client.post("/v1/chat/completions", json={**body, **kw})
    assert response.status_code == 200, response.text
    payload: dict[str, Any] = response.json()
    return payload


def active_id(client: TestClient | httpx.Client) -> str:
    listing = client.get("/admin/adapters").json()["families"]["llama-64x4"]
    return next(item["id"] for item in listing if item["active"])


def load_b(client: TestClient | httpx.Client) -> str:
    response = client.post("/admin/adapters/load", json={"path": B_PATH})
    assert response.status_code == 200, response.text
    adapter_id: str = response.json()["id"]
    return adapter_id


def activate(client: TestClient | httpx.Client, adapter_id: str) -> httpx.Response:
    return client.post("/admin/families/llama-64x4/activate", json={"adapter": adapter_id})


def upload(client: TestClient, data: bytes, **extra: Any) -> httpx.Response:
    body = {"name": "up.safetensors", "content_base64": base64.b64encode(data).decode(), **extra}
    return client.post("/admin/adapters/upload", json=body)


# ----- hot swap ---------------------------------------------------------------------------------
def test_swap_under_load_keeps_each_request_on_its_adapter(
    ops_app: Any, loaded: LoadedModel, strong_adapter: SafetyAdapter, adapter_b: SafetyAdapter
) -> None:
    loaded.model.register_forward_pre_hook(lambda *_: time.sleep(0.01))
    app = ops_app()
    prompts = ("hello", "tell me more")
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        b_id = load_b(client)
        # Solo references: each prompt alone under A, then under B.
        reference = {(p, strong_adapter.id): chat(client, p) for p in prompts}
        assert activate(client, b_id).status_code == 200
        reference |= {(p, b_id): chat(client, p) for p in prompts}
        assert activate(client, strong_adapter.id).status_code == 200
        assert reference[(prompts[0], b_id)] != reference[(prompts[0], strong_adapter.id)]

        results: list[tuple[str, int, dict[str, Any]]] = []
        lock = threading.Lock()

        def ask(prompt: str) -> None:
            with httpx.Client(base_url=url, timeout=60) as own:
                body = {
                    "model": TINY_MODEL_NAME,
                    "messages": [{"role": "user", "content": prompt}],
                    **FORCED,
                }
                response = own.post("/v1/chat/completions", json=body)
            with lock:
                results.append((prompt, response.status_code, response.json()))

        engine = app.state.serving.registry.models[0].engine
        before = [threading.Thread(target=ask, args=(prompts[i % 2],)) for i in range(6)]
        for thread in before:
            thread.start()
        assert wait_until(lambda: engine.active_rows + engine.queue_depth == 6, 20)
        assert activate(client, b_id).status_code == 200  # swap while 6 requests are in flight
        after = [threading.Thread(target=ask, args=(prompts[i % 2],)) for i in range(6)]
        for thread in after:
            thread.start()
        for thread in before + after:
            thread.join(60)

    assert len(results) == 12 and all(status == 200 for _, status, _ in results)
    used = [body["safety"]["adapter"] for _, _, body in results]
    assert used.count(strong_adapter.id) == 6 and used.count(b_id) == 6
    for prompt, _, body in results:
        expected = reference[(prompt, body["safety"]["adapter"])]
        assert body["choices"][0]["message"] == expected["choices"][0]["message"]


# ----- admin API --------------------------------------------------------------------------------
def test_admin_lists_loads_activates_and_unloads(
    admin: TestClient, strong_adapter: SafetyAdapter, adapter_b: SafetyAdapter
) -> None:
    listing = admin.get("/admin/adapters").json()["families"]
    assert [item["id"] for item in listing["llama-64x4"]] == [strong_adapter.id]
    item = listing["llama-64x4"][0]
    assert item["active"] and item["signer"] is None and item["origin"] == A_PATH
    assert item["categories"] == strong_adapter.categories
    assert len(item["sha256"]) == 64

    b_id = load_b(admin)
    assert b_id == adapter_b.id
    assert chat(admin)["safety"]["adapter"] == strong_adapter.id
    assert activate(admin, b_id).json()["active"] is True
    assert chat(admin)["safety"]["adapter"] == b_id
    assert admin.get("/v1/models").json()["data"][0]["adapter"] == b_id

    refused = admin.delete(f"/admin/families/llama-64x4/adapters/{b_id}")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "adapter_in_use"
    assert admin.delete(f"/admin/families/smollm2-135m/adapters/{b_id}").status_code == 404
    unloaded = admin.delete(f"/admin/families/llama-64x4/adapters/{strong_adapter.id}")
    assert unloaded.status_code == 200
    missing = activate(admin, strong_adapter.id)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "adapter_not_found"
    assert active_id(admin) == b_id


@pytest.mark.parametrize(
    "path",
    [
        "../outside.safetensors",
        "a/../../outside.safetensors",
        "/etc/passwd",
        "a/adapter.safetensors/../../../outside.safetensors",
        "a/adapter.txt",
        "",
        "link/outside.safetensors",
    ],
)
def test_paths_never_escape_the_adapter_folder(
    admin: TestClient, tmp_path: Path, strong_adapter: SafetyAdapter, path: str
) -> None:
    outside = strong_adapter.save(tmp_path / "outside.safetensors")
    (tmp_path / "adapters" / "link").mkdir()
    (tmp_path / "adapters" / "link" / "outside.safetensors").symlink_to(outside)
    response = admin.post("/admin/adapters/load", json={"path": path})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "path"
    assert str(tmp_path) not in response.text


def test_a_missing_file_is_404(admin: TestClient) -> None:
    response = admin.post("/admin/adapters/load", json={"path": "nope/x.safetensors"})
    assert response.status_code == 404


def _bad_adapters(
    random_adapter: Any, good: SafetyAdapter, tmp_path: Path
) -> dict[str, tuple[bytes, str]]:
    """Each bad kind: its bytes and a word the refusal must contain."""
    data = good.save(tmp_path / "good.safetensors").read_bytes()
    tampered = bytearray(data)
    tampered[-5] ^= 0xFF  # inside the last tensor's data

    def of(family: ModelFamily) -> bytes:
        return random_adapter(family, layers=(1,)).save(tmp_path / "f.safetensors").read_bytes()

    return {
        "truncated": (data[: len(data) // 2], "safetensors"),
        "pickle": (pickle.dumps({"vector.violence.1": [0.0] * 64}), "safetensors"),
        "other family": (of(ModelFamily("qwen2", 64, 4)), "architecture"),
        "hidden size": (of(ModelFamily("llama", 32, 4)), "hidden_size"),
        "layer count": (of(ModelFamily("llama", 64, 6)), "num_layers"),
        "tampered tensor": (bytes(tampered), "sha256"),
        "empty": (b"", "safetensors"),
    }


def test_every_bad_adapter_is_refused_and_the_active_one_stays(
    admin: TestClient, random_adapter: Any, strong_adapter: SafetyAdapter, tmp_path: Path
) -> None:
    for kind, (data, word) in _bad_adapters(random_adapter, strong_adapter, tmp_path).items():
        response = upload(admin, data)
        assert response.status_code == 400, kind
        error = response.json()["error"]
        assert error["code"] == "adapter_refused" and word in error["message"], (kind, error)
        # The same file put into the adapter folder and loaded by path: refused too.
        (tmp_path / "adapters" / "bad").mkdir(exist_ok=True)
        (tmp_path / "adapters" / "bad" / "x.safetensors").write_bytes(data)
        by_path = admin.post("/admin/adapters/load", json={"path": "bad/x.safetensors"})
        assert by_path.status_code == 400, kind
        assert active_id(admin) == strong_adapter.id
        assert chat(admin)["safety"]["adapter"] == strong_adapter.id
    listing = admin.get("/admin/adapters").json()["families"]["llama-64x4"]
    assert len(listing) == 1
    assert not list((tmp_path / "state" / "uploads").glob("*.safetensors"))


def test_upload_stores_a_good_adapter_under_its_hash(
    admin: TestClient, adapter_b: SafetyAdapter, tmp_path: Path
) -> None:
    data = adapter_b.save(tmp_path / "b.safetensors").read_bytes()
    response = upload(admin, data)
    assert response.status_code == 200, response.text
    assert response.json()["origin"].startswith("upload:up-")
    stored = list((tmp_path / "state" / "uploads").glob("up-*.safetensors"))
    assert len(stored) == 1 and stored[0].read_bytes() == data
    bad_name = upload(admin, data, name="../../x.safetensors")
    assert bad_name.status_code == 400 and bad_name.json()["error"]["param"] == "name"
    not_b64 = admin.post(
        "/admin/adapters/upload", json={"name": "x.safetensors", "content_base64": "%%%"}
    )
    assert not_b64.status_code == 400


def test_upload_size_limit(ops_app: Any, adapter_b: SafetyAdapter, tmp_path: Path) -> None:
    data = adapter_b.save(tmp_path / "b.safetensors").read_bytes()
    with TestClient(ops_app(max_upload_bytes=len(data) - 1)) as client:
        response = upload(client, data)
    assert response.status_code == 413


# ----- signatures -------------------------------------------------------------------------------
def test_signed_adapters_required(
    ops_app: Any, strong_adapter: SafetyAdapter, adapter_b: SafetyAdapter, tmp_path: Path
) -> None:
    trusted, untrusted = tmp_path / "trusted", tmp_path / "untrusted"
    key, _ = generate_keypair(trusted, "release")
    rogue, _ = generate_keypair(untrusted, "rogue")
    adapter_dir = tmp_path / "adapters"
    strong_adapter.save(adapter_dir / A_PATH)
    sign_file(adapter_dir / A_PATH, key)
    settings = {"trusted_keys_dir": trusted, "require_signed_adapters": True}
    with TestClient(ops_app(**settings)) as client:
        listing = client.get("/admin/adapters").json()["families"]["llama-64x4"]
        assert listing[0]["signer"] == "release"
        b_file = adapter_dir / B_PATH
        refused = client.post("/admin/adapters/load", json={"path": B_PATH})
        assert refused.status_code == 400 and "not signed" in refused.json()["error"]["message"]

        sign_file(b_file, rogue)
        refused = client.post("/admin/adapters/load", json={"path": B_PATH})
        assert "not trusted" in refused.json()["error"]["message"]

        sign_file(adapter_dir / A_PATH, key)  # a valid signature ... of another file
        signature_path(b_file).write_text(signature_path(adapter_dir / A_PATH).read_text())
        refused = client.post("/admin/adapters/load", json={"path": B_PATH})
        assert "another file" in refused.json()["error"]["message"]

        sign_file(b_file, key)
        good_sig = json.loads(signature_path(b_file).read_text())
        forged = {**good_sig, "signature": base64.b64encode(bytes(64)).decode()}
        refused = upload(client, b_file.read_bytes(), signature=forged)
        assert "does not verify" in refused.json()["error"]["message"]
        unsigned = upload(client, b_file.read_bytes())
        assert unsigned.status_code == 400

        accepted = upload(client, b_file.read_bytes(), signature=good_sig)
        assert accepted.status_code == 200 and accepted.json()["signer"] == "release"
        assert active_id(client) == strong_adapter.id


# ----- audit log and restart --------------------------------------------------------------------
def test_audit_log_records_every_admin_action(
    admin: TestClient, strong_adapter: SafetyAdapter, tmp_path: Path
) -> None:
    b_id = load_b(admin)
    activate(admin, b_id)
    admin.post("/admin/adapters/load", json={"path": "../x.safetensors"})
    entries = admin.get("/admin/audit", params={"limit": 10}).json()["entries"]
    assert [(e["action"], e["outcome"]) for e in entries] == [
        ("load", "ok"),
        ("activate", "ok"),
        ("load", "refused"),
    ]
    assert entries[0]["adapter"] == b_id and len(entries[0]["sha256"]) == 64
    assert entries[1]["detail"] == f"previous {strong_adapter.id}"
    assert all(e["actor"] == "local" and e["time"] for e in entries)
    on_disk = (tmp_path / "state" / "audit.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in on_disk] == entries


def test_restart_restores_the_active_adapter(
    ops_app: Any, strong_adapter: SafetyAdapter, adapter_b: SafetyAdapter, tmp_path: Path
) -> None:
    with TestClient(ops_app()) as client:
        activate(client, load_b(client))
    with TestClient(ops_app()) as client:
        assert active_id(client) == adapter_b.id
        assert chat(client)["safety"]["adapter"] == adapter_b.id
    # If the file changed since, the restart falls back to the configured adapter.
    (2.0 * adapter_b).save(tmp_path / "adapters" / B_PATH)
    with TestClient(ops_app()) as client:
        assert active_id(client) == strong_adapter.id


def test_a_changed_configuration_wins_over_the_saved_state(
    ops_app: Any, strong_adapter: SafetyAdapter, adapter_b: SafetyAdapter, tmp_path: Path
) -> None:
    with TestClient(ops_app()) as client:
        activate(client, load_b(client))
    third = 3.0 * strong_adapter
    third.save(tmp_path / "adapters" / "0" / "adapter.safetensors")  # sorts first: new default
    with TestClient(ops_app()) as client:
        assert active_id(client) == third.id


def test_replicas_sharing_a_state_folder_pick_up_an_activation_on_reload(
    ops_app: Any, strong_adapter: SafetyAdapter, adapter_b: SafetyAdapter
) -> None:
    with TestClient(ops_app()) as one, TestClient(ops_app()) as two:
        activate(one, load_b(one))
        assert active_id(two) == strong_adapter.id
        reloaded = two.post("/admin/reload-state")
        assert [item["id"] for item in reloaded.json()["restored"]] == [adapter_b.id]
        assert active_id(two) == adapter_b.id
        assert chat(two)["safety"]["adapter"] == adapter_b.id
        assert two.post("/admin/reload-state").json()["restored"] == []  # nothing new
        entries = two.get("/admin/audit").json()["entries"]
        assert (entries[-1]["action"], entries[-1]["outcome"]) == ("reload", "ok")
