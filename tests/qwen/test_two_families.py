"""Both real families served at once from one config: SmolLM2-135M with its built-in adapter
and Qwen2.5-Coder-0.5B with none at start (`active = "none"`). Requests route by `model`;
swapping one family's adapter leaves the other family's greedy output byte-identical; an
adapter of one family is refused for the other with a 400 naming both, and nothing changes.

The Qwen adapters are random unit vectors at one middle layer: valid adapters of the family,
not safety directions (the family's built-in adapter is not what these checks are about).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from safesteer.adapters.adapter import AdapterMetadata, CategorySpec, SafetyAdapter
from safesteer.adapters.family import ModelFamily
from safesteer.server.app import create_app
from safesteer.server.settings import Settings
from safesteer.server.startup import build_server

pytestmark = pytest.mark.real_qwen

SMOL, QWEN = "smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"
SMOL_FAMILY = ModelFamily("llama", 576, 30)  # id llama-576x30, alias smollm2-135m
QWEN_FAMILY = ModelFamily("qwen2", 896, 24)  # id qwen2-896x24, alias qwen2.5-0.5b
BUILTIN = Path(__file__).resolve().parents[2] / "adapters" / "smollm2-135m" / "safety.safetensors"
PROMPT = "Name three primary colors."
MAX_TOKENS = 12


def random_adapter(name: str, family: ModelFamily, seed: int) -> SafetyAdapter:
    """A valid adapter of `family`: deterministic random unit vectors at its middle layer."""
    layer = family.num_layers // 2
    generator = torch.Generator().manual_seed(seed)
    specs = {c: CategorySpec(f"{c} (random test direction)") for c in ("violence", "fraud")}
    vectors, coefficients = {}, {}
    for category in specs:
        vector = torch.randn(family.hidden_size, generator=generator)
        vectors[category] = {layer: vector / vector.norm()}
        coefficients[category] = {layer: 4.0}
    return SafetyAdapter(AdapterMetadata.for_family(name, family, specs), vectors, coefficients)


@dataclass
class TwoFamilies:
    client: TestClient
    ids: dict[str, str]  # adapter ids: builtin, smol-alt, qwen-a, qwen-b
    paths: dict[str, str]  # the same adapters' paths in the adapter folder
    first: dict[str, dict[str, Any]]  # each model's first answer, before any admin action


def ask(client: TestClient, model: str, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    payload: dict[str, Any] = response.json()
    return payload


def answer(payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """What must not change: the text, byte for byte, and the safety report."""
    return payload["choices"][0]["message"]["content"], payload["safety"]


def activate(client: TestClient, family: str, adapter_id: str) -> Any:
    return client.post(f"/admin/families/{family}/activate", json={"adapter": adapter_id})


def load(client: TestClient, path: str) -> str:
    response = client.post("/admin/adapters/load", json={"path": path})
    assert response.status_code == 200, response.text
    adapter_id: str = response.json()["id"]
    return adapter_id


def active(client: TestClient) -> dict[str, str | None]:
    families = client.get("/admin/adapters").json()["families"]
    return {
        family: next((a["id"] for a in items if a["active"]), None)
        for family, items in families.items()
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoFamilies]:
    tmp = tmp_path_factory.mktemp("two-families")
    adapter_dir = tmp / "adapters"
    (adapter_dir / "smollm2-135m").mkdir(parents=True)
    shutil.copyfile(BUILTIN, adapter_dir / "smollm2-135m" / "safety.safetensors")
    extra = {
        "smol-alt": random_adapter("smollm2-random", SMOL_FAMILY, seed=1),
        "qwen-a": random_adapter("qwen-random-a", QWEN_FAMILY, seed=2),
        "qwen-b": random_adapter("qwen-random-b", QWEN_FAMILY, seed=3),
    }
    paths = {"builtin": "smollm2-135m/safety.safetensors"}
    for key, adapter in extra.items():
        paths[key] = f"test/{key}.safetensors"
        adapter.save(adapter_dir / paths[key])
    ids = {key: a.id for key, a in extra.items()}
    ids["builtin"] = SafetyAdapter.load(BUILTIN).id
    config = tmp / "registry.toml"
    config.write_text(
        f"""
adapter_dir = "{adapter_dir}"

[[models]]
name = "{SMOL}"
source = "{SMOL}"

[[models]]
name = "{QWEN}"
source = "{QWEN}"

[[families]]
family = "{SMOL_FAMILY.alias}"
adapters = ["{paths["builtin"]}"]

[[families]]
family = "{QWEN_FAMILY.alias}"
active = "none"                  # no Qwen adapter yet: served unsteered until one is activated
"""
    )
    settings = Settings(config=config, state_dir=tmp / "state")  # default cache: the copies
    with TestClient(create_app(settings, build_server(settings))) as client:
        first = {model: ask(client, model) for model in (SMOL, QWEN)}
        yield TwoFamilies(client, ids, paths, first)


def test_each_model_answers_under_its_own_name_in_its_own_family(served: TwoFamilies) -> None:
    cards = {card["id"]: card for card in served.client.get("/v1/models").json()["data"]}
    for model, family in ((SMOL, SMOL_FAMILY), (QWEN, QWEN_FAMILY)):
        assert (cards[model]["family"], cards[model]["family_alias"]) == (family.id, family.alias)
    smol, qwen = served.first[SMOL], served.first[QWEN]
    assert smol["model"] == SMOL and qwen["model"] == QWEN
    assert smol["choices"][0]["message"]["content"] and qwen["choices"][0]["message"]["content"]
    assert smol["safety"]["family"] == SMOL_FAMILY.id
    assert smol["safety"]["adapter"] == served.ids["builtin"]
    assert smol["safety"]["mode"] == "gated"  # the built-in adapter has condition probes
    # `active = "none"`: Qwen answers unsteered and says so.
    assert qwen["safety"] == {
        "family": QWEN_FAMILY.id,
        "adapter": None,
        "sha256": None,
        "mode": "off",
        "strength": 0.0,
        "categories": {},
        "fired": None,
    }


def test_activating_and_swapping_qwens_adapter_leaves_smollm2_untouched(
    served: TwoFamilies,
) -> None:
    client, ids = served.client, served.ids
    before = answer(ask(client, SMOL))
    assert before == answer(served.first[SMOL])
    assert load(client, served.paths["qwen-a"]) == ids["qwen-a"]
    assert load(client, served.paths["qwen-b"]) == ids["qwen-b"]
    for key in ("qwen-a", "qwen-b", "qwen-a"):
        swapped = activate(client, QWEN_FAMILY.alias, ids[key])
        assert swapped.status_code == 200, swapped.text
        safety = ask(client, QWEN, max_tokens=1)["safety"]
        assert (safety["family"], safety["adapter"], safety["mode"]) == (
            QWEN_FAMILY.id,
            ids[key],
            "always",
        )
        assert answer(ask(client, SMOL)) == before
    assert active(client) == {SMOL_FAMILY.id: ids["builtin"], QWEN_FAMILY.id: ids["qwen-a"]}


def test_swapping_smollm2s_adapter_leaves_qwen_untouched(served: TwoFamilies) -> None:
    client, ids = served.client, served.ids
    load(client, served.paths["qwen-a"])  # held already when the test above ran first
    assert activate(client, QWEN_FAMILY.id, ids["qwen-a"]).status_code == 200
    before = answer(ask(client, QWEN))
    assert load(client, served.paths["smol-alt"]) == ids["smol-alt"]
    try:
        assert activate(client, SMOL_FAMILY.alias, ids["smol-alt"]).status_code == 200
        assert ask(client, SMOL, max_tokens=1)["safety"]["adapter"] == ids["smol-alt"]
        assert answer(ask(client, QWEN)) == before
    finally:
        assert activate(client, SMOL_FAMILY.id, ids["builtin"]).status_code == 200
    assert answer(ask(client, SMOL)) == answer(served.first[SMOL])


def test_an_adapter_of_one_family_is_refused_for_the_other(served: TwoFamilies) -> None:
    client, ids = served.client, served.ids
    load(client, served.paths["qwen-a"])
    assert activate(client, QWEN_FAMILY.id, ids["qwen-a"]).status_code == 200
    state = client.get("/admin/adapters").json()
    before = {model: answer(ask(client, model)) for model in (SMOL, QWEN)}

    for family, adapter_id, owner in (
        (QWEN_FAMILY.alias, ids["builtin"], SMOL_FAMILY),  # SmolLM2's adapter for Qwen
        (QWEN_FAMILY.id, ids["builtin"], SMOL_FAMILY),  # by id as well as alias
        (SMOL_FAMILY.alias, ids["qwen-a"], QWEN_FAMILY),  # Qwen's adapter for SmolLM2
    ):
        for refused in (
            activate(client, family, adapter_id),
            client.delete(f"/admin/families/{family}/adapters/{adapter_id}"),
        ):
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert error["type"] == "invalid_request_error"
            assert (error["code"], error["param"]) == ("adapter_refused", "adapter")
            other = QWEN_FAMILY if owner == SMOL_FAMILY else SMOL_FAMILY
            assert adapter_id in error["message"]
            assert owner.id in error["message"] and other.id in error["message"]

    assert client.get("/admin/adapters").json() == state
    assert active(client) == {SMOL_FAMILY.id: ids["builtin"], QWEN_FAMILY.id: ids["qwen-a"]}
    assert {model: answer(ask(client, model)) for model in (SMOL, QWEN)} == before
    audit = client.get("/admin/audit", params={"limit": 6}).json()["entries"]
    assert [(e["action"], e["outcome"]) for e in audit] == [
        ("activate", "refused"),
        ("unload", "refused"),
    ] * 3
