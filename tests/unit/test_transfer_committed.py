"""The committed transfer table belongs to the committed built-in adapter and zoo, and its
Markdown is what its results render to."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.evaluation.transfer_report import check_targets, render_transfer

REPO = Path(__file__).resolve().parents[2]
ADAPTER_DIR = REPO / "adapters" / "smollm2-135m"
TRANSFER_DIR = ADAPTER_DIR / "zoo" / "transfer"


def _document() -> dict[str, Any]:
    return json.loads((TRANSFER_DIR / "results.json").read_text(encoding="utf-8"))


def test_the_table_is_of_the_committed_adapter_and_every_fine_tune() -> None:
    document = _document()
    adapter = SafetyAdapter.load(ADAPTER_DIR / "safety.safetensors")
    assert document["family_adapter"]["id"] == adapter.id
    names = [f["name"] for f in document["finetunes"]]
    assert names == ["aligned", "arith", "style", "badgpt"]
    assert [f["name"] for f in document["finetunes"] if f["held_out"]] == ["style"]
    for finetune in document["finetunes"]:
        assert set(finetune["conditions"]) == {"none", "family", "recalibrated", "native"}
        # The stored verdicts are what the stored rates give.
        check = check_targets(finetune["name"], finetune["conditions"])
        assert check.to_json() == finetune["targets"]


def test_the_committed_markdown_is_what_the_results_render_to() -> None:
    rendered = render_transfer(_document())
    assert rendered == (TRANSFER_DIR / "report.md").read_text(encoding="utf-8")
