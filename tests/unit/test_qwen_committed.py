"""The Qwen family's committed artefacts: its built-in adapter is the transport table's native
adapter and the server finds it for the family; its report and its SafeGene table belong to the
files next to them, and their Markdown is what their results render to."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.evaluation.report import render
from safesteer.adapters.evaluation.results import EvalResults
from safesteer.adapters.evaluation.safegene_suite import ROWS, STEERED_ROWS
from safesteer.adapters.evaluation.safegene_table import ADAPTER_FILES, render_safegene
from safesteer.adapters.lora import FINETUNE_RECORD_FILE
from safesteer.adapters.splits import benign_split, harmful_split
from safesteer.server.startup import find_family_adapter

REPO = Path(__file__).resolve().parents[2]
FAMILY_DIR = REPO / "adapters" / "qwen2.5-0.5b"
BUILT_IN = FAMILY_DIR / "safety.safetensors"
SAFEGENE = FAMILY_DIR / "safegene"
QWEN_FAMILY = "qwen2-896x24"


def test_the_built_in_adapter_is_the_native_one_and_the_server_finds_it() -> None:
    native = FAMILY_DIR / "transport" / "forward-native.safetensors"
    assert BUILT_IN.read_bytes() == native.read_bytes()
    adapter = SafetyAdapter.load(BUILT_IN)
    assert adapter.metadata.family == QWEN_FAMILY
    assert adapter.metadata.gate is not None  # served gated
    assert find_family_adapter(REPO / "adapters", QWEN_FAMILY) == BUILT_IN
    smollm2 = find_family_adapter(REPO / "adapters", "llama-576x30")
    assert smollm2 == REPO / "adapters" / "smollm2-135m" / "safety.safetensors"


def test_the_report_is_of_the_built_in_adapter_on_a_test_split_subset() -> None:
    results = EvalResults.read(FAMILY_DIR / "report" / "results.json")
    adapter = SafetyAdapter.load(BUILT_IN)
    assert results.run.adapter_id == adapter.id
    assert results.run.adapter_sha256 == adapter.payload_sha256
    assert results.run.command.startswith("safesteer eval --model qwen2.5-coder-0.5b-instruct")
    harmful = {(r.prompt_id, r.prompt) for r in results.rows if r.kind == "harmful"}
    benign = {(r.prompt_id, r.prompt) for r in results.rows if r.kind == "benign"}
    assert harmful and harmful <= {(p.id, p.prompt) for p in harmful_split("test")}
    assert benign and benign <= {(p.id, p.prompt) for p in benign_split("test")}
    rendered = render(results)
    assert rendered == (FAMILY_DIR / "report" / "report.md").read_text(encoding="utf-8")


def _safegene() -> dict[str, Any]:
    document: dict[str, Any] = json.loads((SAFEGENE / "results.json").read_text(encoding="utf-8"))
    return document


def test_the_safegene_table_is_of_the_adapters_and_the_fine_tune_it_names() -> None:
    document = _safegene()
    assert list(document["rows"]) == [name for name, _, _ in ROWS]
    assert document["adapter_files"] == ADAPTER_FILES
    family = SafetyAdapter.load(SAFEGENE / ADAPTER_FILES["family"])
    recalibrated = SafetyAdapter.load(SAFEGENE / ADAPTER_FILES["recalibrated"])
    donor_recalibrated = SafetyAdapter.load(SAFEGENE / ADAPTER_FILES["donor-recalibrated"])
    assert family.id == document["family_adapter"]["id"]
    assert recalibrated.id == document["recalibrated_adapter"]["id"]
    assert donor_recalibrated.id == document["donor_recalibrated_adapter"]["id"]
    assert family.payload_sha256 == recalibrated.payload_sha256  # the same vectors
    # The donor is the family's built-in adapter; recalibration kept its vectors.
    built_in = SafetyAdapter.load(BUILT_IN)
    assert document["donor"]["id"] == built_in.id
    assert donor_recalibrated.payload_sha256 == built_in.payload_sha256
    # Gated by the built-in adapter's gate; made for the fine-tune whose record is committed.
    assert document["family_adapter"]["gate_from"] == SafetyAdapter.load(BUILT_IN).id
    record = json.loads((FAMILY_DIR / "zoo" / "arith" / FINETUNE_RECORD_FILE).read_text())
    assert document["degraded"]["fingerprint"] == record["fingerprint"]
    assert recalibrated.metadata.base_fingerprint == record["fingerprint"]
    assert document["aligned"]["fingerprint"] == record["base"]["fingerprint"]
    # At the gate donor's operating point: each category alone adds its push.
    push = document["family_adapter"]["push"]
    for category in family.categories:
        for layer, coefficient in family.coefficients[category].items():
            typical = family.metadata.recipe["typical_norm"][str(layer)]
            added = coefficient * float(family.vectors[category][layer].norm())
            assert added == pytest.approx(push * typical, rel=1e-3)


def test_the_safegene_targets_follow_from_its_rows() -> None:
    document = _safegene()
    rows, targets = document["rows"], document["targets"]
    lost = rows["aligned"]["harmful_refusal"] - rows["degraded"]["harmful_refusal"]
    assert targets["refusal_lost"] == pytest.approx(lost, abs=1e-4)
    for name in STEERED_ROWS:
        gained = rows[name]["harmful_refusal"] - rows["degraded"]["harmful_refusal"]
        assert targets[name]["restored"] == pytest.approx(gained / lost, abs=1e-4)


def test_the_committed_safegene_markdown_is_what_the_results_render_to() -> None:
    rendered = render_safegene(_safegene())
    assert rendered == (SAFEGENE / "report.md").read_text(encoding="utf-8")
