"""The transport table (`evaluation.transport_suite`, `evaluation.transport_table`) on the tiny
chat models: a 4-layer Llama family adapter carried into a 3-layer Qwen2 and back."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.build import build
from safesteer.adapters.evaluation import transport_table
from safesteer.adapters.evaluation.transport_suite import (
    ADAPTER_NAMES,
    CONDITIONS,
    TransportSuiteSettings,
    run_transport_suite,
)
from safesteer.adapters.evaluation.transport_table import render_transport
from safesteer.adapters.loading import LoadedModel
from safesteer.adapters.native_adapter import FamilyRecipe, native_adapter
from safesteer.adapters.transport import corresponding_layer

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from test_build import DiffersFromPlain, tiny_config, tiny_data
from tiny_chat import tiny_loaded_model

SETTINGS = TransportSuiteSettings(
    limit=2, max_new_tokens=2, batch_size=8, native_prompts_per_category=2, show_progress=False
)


@pytest.fixture(scope="module")
def models() -> tuple[LoadedModel, LoadedModel, SafetyAdapter]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llama = tiny_loaded_model("llama")
        qwen = tiny_loaded_model("qwen2", name="tiny-qwen")
        # Steering at layer 3 of 4 and a gate at layer 0 land on layers 2 and 0 of 3.
        config = tiny_config(candidate_layers=(3,), detection_layers=(0,))
        family = build(llama, config, tiny_data(), judge=DiffersFromPlain(llama)).adapter
    finally:
        torch.set_num_threads(previous)
    return llama, qwen, family


def test_the_suite_measures_both_directions_against_native_adapters(
    models: tuple[LoadedModel, LoadedModel, SafetyAdapter], single_torch_thread: None
) -> None:
    llama, qwen, family = models
    lines: list[str] = []
    result = run_transport_suite(family, llama, qwen, SETTINGS, log=lines.append)
    document = result.document
    assert list(result.adapters) == list(ADAPTER_NAMES)
    native, carried, back = result.adapters.values()
    assert native.metadata.family == carried.metadata.family == qwen.family.id
    assert back.metadata.family == family.metadata.family == llama.family.id
    assert document["directions"]["forward"]["native"]["id"] == native.id

    forward, reverse = document["directions"]["forward"], document["directions"]["reverse"]
    # Forward: the native Qwen adapter keeps the family recipe at the same relative depth.
    recipe = FamilyRecipe.of(family)
    moved = {str(corresponding_layer(la, 4, 3)): s for la, s in recipe.scales.items()}
    assert forward["native"]["recipe"]["layers"] == moved == {"2": recipe.scales[3]}
    assert forward["native"]["recipe"]["detection_layer"] == 0
    assert forward["native"]["recipe"]["max_prompts_per_category"] == 2
    assert forward["transported"]["layer_map"] == {"3": 2}
    assert forward["measured_on"] == "tiny-qwen"
    # Reverse: the source adapter is the native one on Llama; Qwen's comes back to layer 3.
    assert reverse["native"]["id"] == family.id
    assert reverse["transported"]["layer_map"] == {"2": 3}
    for direction in (forward, reverse):
        assert set(direction["cosine"]) == set(family.categories)
        assert all(-1.0 <= v <= 1.0 for row in direction["cosine"].values() for v in row.values())
        conditions = direction["conditions"]
        assert list(conditions) == [name for name, _, _ in CONDITIONS]
        assert conditions["none"]["steered"] == {"harmful": 0, "benign": 0}
        for name in ("native always", "transported always"):
            assert conditions[name]["steered"] == {"harmful": 2, "benign": 2}
        for row in conditions.values():
            assert len(row["rows"]["harmful_refused"]) == len(row["rows"]["benign_refused"]) == 2
    assert document["prompt_sets"]["harmful"]["ids"] and "questions" not in document["prompt_sets"]
    assert any(line.startswith("tiny-qwen transported always:") for line in lines)

    report = render_transport(document)
    assert "## Forward: measured on `tiny-qwen`" in report
    assert "## Reverse: measured on" in report
    assert report.count("| transported always |") == 2


def test_a_target_of_the_same_family_is_refused(
    models: tuple[LoadedModel, LoadedModel, SafetyAdapter],
) -> None:
    llama, _, family = models
    with pytest.raises(ValueError, match="nothing to carry"):
        run_transport_suite(family, llama, tiny_loaded_model("llama"), SETTINGS)


def test_the_command_refuses_bad_input_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--target-model", "x", "--out", str(tmp_path), "--source", str(tmp_path / "no.st")]
    assert transport_table.main(argv) == 2
    assert "error:" in capsys.readouterr().err
    assert transport_table.main(["--target-model", "x", "--out", str(tmp_path), "--render"]) == 2


def test_the_command_writes_results_report_and_loadable_adapters(
    models: tuple[LoadedModel, LoadedModel, SafetyAdapter],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    single_torch_thread: None,
) -> None:
    llama, qwen, family = models
    source = family.save(tmp_path / "family.safetensors")
    monkeypatch.setattr(transport_table, "load_model", {"a": llama, "b": qwen}.__getitem__)
    out = tmp_path / "table"
    argv = ["--source", str(source), "--source-model", "a", "--target-model", "b"]
    argv += ["--limit", "2", "--native-prompts", "2", "--max-new-tokens", "2", "--quiet"]
    assert transport_table.main([*argv, "--out", str(out)]) == 0

    document = json.loads((out / "results.json").read_text())
    assert document["command"].startswith("python -m safesteer.adapters.evaluation.transport_table")
    assert "--target-model b" in document["command"]
    for name in ADAPTER_NAMES:
        loaded = SafetyAdapter.load(out / document["adapter_files"][name])
        target = llama if name.startswith("reverse") else qwen
        loaded.check_fits(target.family)
    report = (out / "report.md").read_text()
    assert "`forward-native.safetensors`" in report
    assert f"wrote {out / 'results.json'}" in capsys.readouterr().out
    (out / "report.md").unlink()
    assert transport_table.main(["--target-model", "b", "--out", str(out), "--render"]) == 0
    assert (out / "report.md").read_text() == report == render_transport(document)


def test_a_recipe_that_is_not_moved_to_the_other_family_is_refused(
    models: tuple[LoadedModel, LoadedModel, SafetyAdapter],
) -> None:
    llama, qwen, family = models
    unmoved = FamilyRecipe.of(family)  # steering layer 3: Qwen has layers 0..2
    with pytest.raises(ValueError, match="do not fit 3 layers"):
        native_adapter(qwen, family, tiny_data(), recipe=unmoved, show_progress=False)
    moved = unmoved.moved(llama.family.num_layers, qwen.family.num_layers)
    assert (sorted(moved.scales), moved.detection_layer) == ([2], 0)
