"""The committed fine-tune zoo of SmolLM2-135M-Instruct is what its spec says it is.

`adapters/smollm2-135m/zoo/zoo.toml` lists the fine-tunes; `safesteer zoo build` wrote each
into the folder next to it. These checks read only the committed files (the LoRA weights and
`finetune.json` records): every fine-tune of the spec is there, small, trained with the
spec's settings on the spec's files and row caps, on top of the parent the spec names (the
fingerprints chain from the packaged model's weights up). The `real_model` test merges each
LoRA onto the packaged model and checks the weights the record names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.lora import FINETUNE_RECORD_FILE, LORA_CONFIG_FILE, LORA_WEIGHTS_FILE
from safesteer.adapters.zoo_spec import BASE, ZooSpec, load_spec

REPO = Path(__file__).resolve().parents[2]
ZOO = REPO / "adapters" / "smollm2-135m" / "zoo"
BUILT_IN = REPO / "adapters" / "smollm2-135m" / "safety.safetensors"


@pytest.fixture(scope="module")
def spec() -> ZooSpec:
    return load_spec(ZOO / "zoo.toml")


def _record(name: str) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((ZOO / name / FINETUNE_RECORD_FILE).read_text())
    return record


def test_every_fine_tune_of_the_spec_is_committed_and_small(spec: ZooSpec) -> None:
    assert {f.name for f in spec.finetunes} == {"aligned", "arith", "style", "badgpt"}
    for finetune in spec.finetunes:
        folder = ZOO / finetune.name
        for name in (LORA_CONFIG_FILE, LORA_WEIGHTS_FILE, FINETUNE_RECORD_FILE):
            assert (folder / name).is_file(), folder / name
        assert (folder / LORA_WEIGHTS_FILE).stat().st_size < 2_000_000


def test_records_match_the_spec(spec: ZooSpec) -> None:
    for finetune in spec.finetunes:
        record = _record(finetune.name)
        zoo = record["zoo"]
        assert zoo["name"] == finetune.name and zoo["parent"] == finetune.parent
        assert zoo["role"] == finetune.role and zoo["held_out"] == finetune.held_out
        assert record["hyperparameters"] == json.loads(json.dumps(finetune.lora.hyperparameters()))
        used = [(u["file"], u["rows_cap"]) for u in zoo["data"]]
        assert used == [(part.file, part.rows) for part in finetune.data]
        assert record["training"]["rows"] == sum(u["rows_used"] for u in zoo["data"])
        assert record["training"]["final_loss"] < record["training"]["initial_loss"]


def test_fingerprints_chain_from_the_packaged_model(spec: ZooSpec) -> None:
    # The built-in adapter records the packaged model's weights fingerprint.
    packaged = SafetyAdapter.load(BUILT_IN).metadata.base_fingerprint
    for finetune in spec.finetunes:
        record = _record(finetune.name)
        parent = packaged if finetune.parent == BASE else _record(finetune.parent)["fingerprint"]
        assert record["base"]["fingerprint"] == parent, finetune.name
        assert record["base"]["family"] == "llama-576x30"
    assert len({_record(f.name)["fingerprint"] for f in spec.finetunes}) == len(spec.finetunes)


def test_exactly_one_fine_tune_is_held_out(spec: ZooSpec) -> None:
    held = [f for f in spec.finetunes if f.held_out]
    assert [f.name for f in held] == ["style"] and held[0].role == "benign-task"


@pytest.mark.real_model
def test_each_fine_tune_loads_with_the_recorded_weights(spec: ZooSpec) -> None:
    from safesteer.adapters.loading import load_model

    for finetune in spec.finetunes:
        loaded = load_model(spec.source(finetune.name, ZOO))
        assert loaded.fingerprint == _record(finetune.name)["fingerprint"], finetune.name
        assert loaded.family.id == "llama-576x30"
