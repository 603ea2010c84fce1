"""The committed transport table belongs to the committed built-in adapter, its adapters are
the ones it measured, and its Markdown is what its results render to."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.evaluation.transport_suite import ADAPTER_NAMES, CONDITIONS
from safesteer.adapters.evaluation.transport_table import render_transport

REPO = Path(__file__).resolve().parents[2]
TABLE = REPO / "adapters" / "qwen2.5-0.5b" / "transport"
BUILT_IN = REPO / "adapters" / "smollm2-135m" / "safety.safetensors"


def _document() -> dict[str, Any]:
    return json.loads((TABLE / "results.json").read_text(encoding="utf-8"))


def test_the_table_is_of_the_built_in_adapter_and_of_the_adapters_next_to_it() -> None:
    document = _document()
    built_in = SafetyAdapter.load(BUILT_IN)
    assert document["source"]["adapter"] == built_in.id
    forward, reverse = document["directions"]["forward"], document["directions"]["reverse"]
    assert reverse["native"]["id"] == built_in.id
    files = document["adapter_files"]
    assert list(files) == list(ADAPTER_NAMES)
    made = {name: SafetyAdapter.load(TABLE / files[name]) for name in ADAPTER_NAMES}
    assert made["forward-native"].id == forward["native"]["id"]
    assert made["forward-transported"].id == forward["transported"]["id"]
    assert made["reverse-transported"].id == reverse["transported"]["id"]
    assert made["forward-native"].metadata.family == document["target"]["family"]
    assert made["reverse-transported"].metadata.family == built_in.metadata.family
    for direction in (forward, reverse):
        assert list(direction["conditions"]) == [name for name, _, _ in CONDITIONS]


def test_the_committed_markdown_is_what_the_results_render_to() -> None:
    assert render_transport(_document()) == (TABLE / "report.md").read_text(encoding="utf-8")
