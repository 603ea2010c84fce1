"""The committed evaluation report belongs to the committed built-in adapter and says what
its rows say; the READMEs quote its headline table verbatim."""

from __future__ import annotations

from pathlib import Path

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.evaluation.report import render
from safesteer.adapters.evaluation.results import EvalResults
from safesteer.adapters.splits import benign_split, harmful_split

REPO = Path(__file__).resolve().parents[2]
ADAPTER_DIR = REPO / "adapters" / "smollm2-135m"
REPORT_DIR = ADAPTER_DIR / "report"


def headline_rows(report: str) -> list[str]:
    section = report.split("## Headline", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| `")]


def test_the_report_is_of_the_committed_adapter_on_the_test_split() -> None:
    results = EvalResults.read(REPORT_DIR / "results.json")
    adapter = SafetyAdapter.load(ADAPTER_DIR / "safety.safetensors")
    assert results.run.adapter_id == adapter.id
    assert results.run.adapter_sha256 == adapter.payload_sha256
    assert results.run.command.startswith("safesteer eval ")
    harmful = {(r.prompt_id, r.prompt) for r in results.rows if r.kind == "harmful"}
    benign = {(r.prompt_id, r.prompt) for r in results.rows if r.kind == "benign"}
    assert harmful == {(p.id, p.prompt) for p in harmful_split("test")}
    assert benign == {(p.id, p.prompt) for p in benign_split("test")}


def test_the_committed_markdown_is_what_the_results_render_to() -> None:
    results = EvalResults.read(REPORT_DIR / "results.json")
    assert render(results) == (REPORT_DIR / "report.md").read_text(encoding="utf-8")


def test_the_readmes_quote_the_report_headline() -> None:
    rows = headline_rows((REPORT_DIR / "report.md").read_text(encoding="utf-8"))
    assert [row.split(" |")[0] for row in rows] == ["| `none`", "| `gated`"]
    for readme in (REPO / "README.md", ADAPTER_DIR / "README.md"):
        text = readme.read_text(encoding="utf-8")
        assert all(row in text for row in rows), readme
