"""The SafeGene table (`evaluation.safegene_suite`, `evaluation.safegene_table`) on the tiny chat
Llama: the zoo's `aligned` fine-tune is the aligned model, its `arith` fine-tune the degraded one,
and a gated adapter built on the base donates the gate, layers and push."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.aligned_gap import GapConfig, extract_gap_adapter
from safesteer.adapters.build import build
from safesteer.adapters.evaluation import safegene_table
from safesteer.adapters.evaluation.safegene_suite import (
    ROWS,
    STEERED_ROWS,
    SafeGeneSettings,
    family_adapter,
    run_safegene_suite,
)
from safesteer.adapters.evaluation.safegene_table import render_safegene
from safesteer.adapters.evaluation.transfer_report import compliance_reduction
from safesteer.adapters.loading import load_model
from safesteer.adapters.native_adapter import FamilyRecipe
from safesteer.adapters.zoo_build import build_zoo
from safesteer.adapters.zoo_skill import SkillSettings, task_sets
from safesteer.adapters.zoo_spec import load_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from test_build import DiffersFromPlain, tiny_config, tiny_data
from test_zoo_build import tiny_document, to_toml, write_tiny_data
from tiny_lora import save_tiny_chat_folder

SETTINGS = SafeGeneSettings(
    limit=2,
    max_new_tokens=2,
    batch_size=8,
    shots=4,
    max_prompts_per_category=3,
    max_benign_prompts=4,
    show_progress=False,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("safegene")
    base_folder = save_tiny_chat_folder(root / "base")
    base = load_model(str(base_folder))
    # One steering layer (3 of 4), the gate at layer 0.
    config = tiny_config(candidate_layers=(3,), detection_layers=(0,))
    donor = build(base, config, tiny_data(), judge=DiffersFromPlain(base)).adapter
    zoo = root / "zoo"
    zoo.mkdir()
    (zoo / "zoo.toml").write_text(to_toml(tiny_document(str(base_folder))))
    spec = load_spec(zoo / "zoo.toml")
    data = write_tiny_data(zoo / "data")
    build_zoo(spec, data, zoo, only=["arith"], show_progress=False, log=lambda _: None)
    skill = SkillSettings(limit=2, arith_tokens=3, batch_size=8, show_progress=False)
    yield {
        "root": root,
        "donor": donor,
        "donor_file": donor.save(root / "donor.safetensors"),
        "zoo": zoo,
        "data": data,
        "spec": spec,
        "aligned": load_model(spec.source("aligned", zoo)),
        "degraded": load_model(spec.source("arith", zoo)),
        "task_set": task_sets(spec, data, skill)["arith"],
    }
    torch.set_num_threads(previous)


def test_the_family_adapter_is_the_aligned_gap_behind_the_donors_gate(
    world: dict[str, Any], single_torch_thread: None
) -> None:
    donor: SafetyAdapter = world["donor"]
    aligned, degraded = world["aligned"], world["degraded"]
    adapter, record = family_adapter(aligned, degraded, donor, SETTINGS)
    recipe = FamilyRecipe.of(donor)
    (layer,) = recipe.scales
    push = recipe.scales[layer] * recipe.strength
    # The vectors are exactly `extract --method aligned-gap` at the donor's layer and push.
    gap = extract_gap_adapter(
        aligned,
        degraded,
        GapConfig(
            layers=(layer,),
            scale=round(push, 6),
            categories=tuple(donor.categories),
            max_prompts_per_category=3,
            benign_baseline=True,
            max_benign_prompts=4,
            show_progress=False,
        ),
    ).adapter
    assert adapter.layers == [layer] == gap.layers
    assert adapter.categories == donor.categories
    for category in adapter.categories:
        assert torch.equal(adapter.vectors[category][layer], gap.vectors[category][layer])
    # Scaled by the donor's rule: each category alone adds the donor's push, not a share of
    # it (extract's rule scales the all-categories mix, which the gate never asks for).
    typical = adapter.metadata.recipe["typical_norm"][str(layer)]
    for category in adapter.categories:
        added = adapter.coefficients[category][layer] * adapter.vectors[category][layer].norm()
        assert float(added) == pytest.approx(push * typical, rel=1e-3)
    assert sum(gap.coefficients[c][layer] for c in gap.categories) < sum(
        adapter.coefficients[c][layer] for c in adapter.categories
    )
    assert adapter.metadata.recipe["coefficient_rule"] == donor.metadata.recipe["coefficient_rule"]
    assert "mix_norm_ratio" not in adapter.metadata.recipe
    # Not the donor's directions: what the fine-tune lost.
    category = adapter.categories[0]
    assert not torch.allclose(
        adapter.vectors[category][layer], donor.vectors[category][layer], atol=1e-3
    )
    # The donor's gate, as it is.
    assert adapter.metadata.gate == donor.metadata.gate
    for name, probe in donor.conditions.items():
        assert torch.equal(adapter.conditions[name], probe)
    assert adapter.metadata.base_fingerprint == degraded.fingerprint
    assert adapter.metadata.recipe["gate"]["from"] == donor.id
    assert record["push"] == pytest.approx(push) and record["gate_from"] == donor.id


def test_the_suite_measures_six_rows_and_restores_against_the_aligned_model(
    world: dict[str, Any], single_torch_thread: None
) -> None:
    aligned, degraded, donor = world["aligned"], world["degraded"], world["donor"]
    lines: list[str] = []
    result = run_safegene_suite(
        aligned, degraded, donor, "arith", world["task_set"], SETTINGS, log=lines.append
    )
    document = result.document
    rows = document["rows"]
    assert list(rows) == [name for name, _, _ in ROWS]
    # Unsteered rows steer nothing; the aligned row is another model, the rest the fine-tune.
    for name in ("aligned", "degraded"):
        assert rows[name]["steered"] == {"harmful": 0, "benign": 0, "arith": 0}
    assert document["aligned"]["fingerprint"] == aligned.fingerprint != degraded.fingerprint
    # Recalibration keeps the vectors, of the family adapter and of the donor alike, and
    # records the fine-tune.
    made = result.adapters
    assert set(made) == {"family", "recalibrated", "donor-recalibrated"}
    for source, name in ((made["family"], "recalibrated"), (donor, "donor-recalibrated")):
        recalibrated = made[name]
        assert recalibrated.metadata.base_fingerprint == degraded.fingerprint
        for category in source.categories:
            for layer in source.layers:
                assert torch.equal(
                    recalibrated.vectors[category][layer], source.vectors[category][layer]
                )
        assert recalibrated.metadata.recipe["calibration"]["reference"]["mode"] == "plain"
        record = document[name.replace("-", "_") + "_adapter"]
        assert record["id"] == recalibrated.id
        assert set(record["multipliers"]) == {str(la) for la in source.layers}
    assert document["donor"]["id"] == donor.id
    # The targets follow from the rows.
    targets = document["targets"]
    lost = rows["aligned"]["harmful_refusal"] - rows["degraded"]["harmful_refusal"]
    assert targets["refusal_lost"] == pytest.approx(lost, abs=1e-4)
    for name in STEERED_ROWS:
        row = rows[name]
        gained = compliance_reduction(rows["degraded"]["harmful_refusal"], row["harmful_refusal"])
        restored = targets[name]["restored"]
        assert restored is None if lost <= 0 else restored == pytest.approx(gained / lost, abs=1e-4)
        skill = 100 * (row["task"]["score"] - rows["degraded"]["task"]["score"])
        assert targets[name]["skill_points"] == pytest.approx(skill, abs=0.01)
    report = render_safegene({**document, "command": "cmd"})
    for name, _, _ in ROWS:
        assert f"| {name} |" in report
    assert any(line.startswith("donor-recalibrated in") for line in lines)


def test_a_donor_without_a_gate_is_refused(world: dict[str, Any]) -> None:
    donor: SafetyAdapter = world["donor"]
    ungated = replace(donor, metadata=replace(donor.metadata, gate=None), conditions={})
    with pytest.raises(ValueError, match="no gate"):
        family_adapter(world["aligned"], world["degraded"], ungated, SETTINGS)


def _args(world: dict[str, Any], out: Path, *extra: str) -> list[str]:
    return [
        "--spec",
        str(world["zoo"] / "zoo.toml"),
        "--zoo",
        str(world["zoo"]),
        "--data",
        str(world["data"]),
        "--gate-from",
        str(world["donor_file"]),
        "--out",
        str(out),
        *extra,
    ]


def test_the_command_refuses_bad_input_with_exit_2(
    world: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert safegene_table.main(_args(world, out, "--finetune", "nope")) == 2
    assert "no fine-tune named 'nope'" in capsys.readouterr().err
    assert safegene_table.main(_args(world, out, "--finetune", "aligned")) == 2
    assert "has no task" in capsys.readouterr().err
    assert safegene_table.main(_args(world, out, "--render")) == 2
    assert not out.exists()


def test_the_command_writes_results_report_and_loadable_adapters(
    world: dict[str, Any], tmp_path: Path, single_torch_thread: None
) -> None:
    out = tmp_path / "out"
    extra = ("--limit", "2", "--shots", "4", "--max-new-tokens", "2", "--quiet")
    assert safegene_table.main(_args(world, out, *extra)) == 0
    document = json.loads((out / "results.json").read_text())
    assert document["command"].startswith("python -m safesteer.adapters.evaluation.safegene_table")
    assert "--limit 2" in document["command"]
    family = SafetyAdapter.load(out / "family.safetensors")
    recalibrated = SafetyAdapter.load(out / "recalibrated.safetensors")
    assert family.id == document["family_adapter"]["id"]
    assert recalibrated.id == document["recalibrated_adapter"]["id"]
    donor_recalibrated = SafetyAdapter.load(out / "donor-recalibrated.safetensors")
    assert donor_recalibrated.id == document["donor_recalibrated_adapter"]["id"]
    family.check_fits(world["degraded"].family)
    report = (out / "report.md").read_text()
    (out / "report.md").unlink()
    assert safegene_table.main(_args(world, out, "--render")) == 0
    assert (out / "report.md").read_text() == report
