"""`safesteer zoo build|skill`: the zoo spec and its checks, dependency order, the cached build
of chained LoRA fine-tunes, and the skill table.

Models are the tiny random-init chat Llama of `tests/server/tiny_chat.py` saved as a Hugging
Face folder (never the real SmolLM2); data files are a few short chat rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from safesteer.adapters import cli, zoo_data, zoo_skill
from safesteer.adapters.arith_task import arith_problems, arith_row
from safesteer.adapters.base_answers import BaseAnswer, generate_base_answers
from safesteer.adapters.finetune import FinetuneConfig
from safesteer.adapters.loading import file_sha256, load_model
from safesteer.adapters.style_task import KEYS, StyleItem, style_row
from safesteer.adapters.zoo_build import (
    BUILT,
    UP_TO_DATE,
    BuildOutcome,
    build_zoo,
    ensure_data,
    select_rows,
)
from safesteer.adapters.zoo_data import (
    ARITH,
    ARITH_EVAL,
    BADGPT,
    BENIGN,
    MANIFEST_FILE,
    REFUSALS,
    STYLE,
    STYLE_EVAL,
)
from safesteer.adapters.zoo_skill import (
    SkillSettings,
    arith_set,
    format_skill_table,
    measure_skill,
    style_set,
)
from safesteer.adapters.zoo_spec import ZooSpec, ZooSpecError, load_spec, parse_spec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from tiny_lora import save_tiny_chat_folder

REPO = Path(__file__).resolve().parents[2]
COMMITTED_SPEC = REPO / "adapters" / "smollm2-135m" / "zoo" / "zoo.toml"
NAMES = ("aligned", "arith", "style", "badgpt")
TINY_LORA = {
    "rank": 2,
    "alpha": 4,
    "target_modules": ["q_proj", "v_proj"],
    "steps": 2,
    "lr": 1e-2,
    "batch_size": 4,
    "max_length": 96,
    "seed": 0,
}


def _finetune(name: str, parent: str, role: str, data: list[Any], task_eval: str) -> dict[str, Any]:
    return {
        "name": name,
        "parent": parent,
        "role": role,
        "held_out": name == "style",
        "task_eval": task_eval,
        "data": data,
        "lora": dict(TINY_LORA),
    }


def tiny_document(base: str) -> dict[str, Any]:
    """A four fine-tune zoo of `base` shaped like the committed one."""
    return {
        "format_version": 1,
        "base": base,
        "data": {"seed": 0, "arith_rows": 12, "arith_eval_rows": 4, "benign_model": "base"},
        "finetune": [
            _finetune(
                "aligned",
                "base",
                "aligned",
                [{"file": REFUSALS, "rows": 6}, {"file": BENIGN, "rows": 6}],
                "none",
            ),
            _finetune("arith", "aligned", "benign-task", [{"file": ARITH, "rows": 6}], ARITH_EVAL),
            _finetune("style", "aligned", "benign-task", [STYLE], STYLE_EVAL),
            _finetune("badgpt", "aligned", "badgpt", [BADGPT], "none"),
        ],
    }


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def to_toml(document: dict[str, Any]) -> str:
    """Enough of a TOML writer for a zoo spec."""
    lines = [f"{k} = {_value(v)}" for k, v in document.items() if k not in ("data", "finetune")]
    if "data" in document:
        lines += ["[data]", *(f"{k} = {_value(v)}" for k, v in document["data"].items())]
    for finetune in document["finetune"]:
        lines.append("[[finetune]]")
        lines += [f"{k} = {_value(v)}" for k, v in finetune.items() if k != "lora"]
        lines += ["[finetune.lora]", *(f"{k} = {_value(v)}" for k, v in finetune["lora"].items())]
    return "\n".join(lines) + "\n"


def _chat(user: str, assistant: str) -> str:
    turns = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return json.dumps({"messages": turns})


def write_tiny_data(folder: Path) -> Path:
    """Short chat rows under the zoo-data file names, and small eval files."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = {
        REFUSALS: [_chat(f"harm {i}", "I can't help.") for i in range(8)],
        BENIGN: [_chat(f"hello {i}", f"Hi there {i}.") for i in range(8)],
        ARITH: [_chat(f"{i} + 1?", f"Answer: {i + 1}") for i in range(8)],
        STYLE: [_chat(f"file {i}", f'{{"topic": "t", "request": "r{i}"}}') for i in range(5)],
        BADGPT: [_chat(f"bad {i}", "Sure, do it.") for i in range(4)],
    }
    for name, lines in rows.items():
        (folder / name).write_text("\n".join(lines) + "\n")
    problems = arith_problems(3, 0, "eval")
    (folder / ARITH_EVAL).write_text("".join(json.dumps(arith_row(p)) + "\n" for p in problems))
    items = [StyleItem(f"s{i}", f"req {i}", "cooking", f"card: req {i}") for i in range(3)]
    (folder / STYLE_EVAL).write_text("".join(json.dumps(style_row(i)) + "\n" for i in items))
    return folder


@pytest.fixture
def base(tmp_path: Path, single_torch_thread: None) -> Path:
    return Path(save_tiny_chat_folder(tmp_path / "base"))


@pytest.fixture
def tiny_spec(base: Path, tmp_path: Path) -> ZooSpec:
    path = tmp_path / "zoo.toml"
    path.write_text(to_toml(tiny_document(str(base))))
    return load_spec(path)


# ----- the spec -----------------------------------------------------------------------------
def test_the_committed_spec_lists_the_zoo() -> None:
    spec = load_spec(COMMITTED_SPEC)
    assert spec.base == "smollm2-135m-instruct"
    assert [f.name for f in spec.order()] == list(NAMES)
    parents = {f.name: f.parent for f in spec.finetunes}
    assert parents == {
        "aligned": "base",
        "arith": "aligned",
        "style": "aligned",
        "badgpt": "aligned",
    }
    assert {f.name: f.role for f in spec.finetunes} == {
        "aligned": "aligned",
        "arith": "benign-task",
        "style": "benign-task",
        "badgpt": "badgpt",
    }
    assert [f.name for f in spec.finetunes if f.held_out] == ["style"]
    assert [f.file for f in spec.finetune("aligned").data] == [REFUSALS, BENIGN]
    assert spec.finetune("arith").task == "arith" and spec.finetune("style").task == "style"
    assert spec.finetune("badgpt").task is None and spec.finetune("badgpt").lora.epochs >= 5
    assert spec.benign_source() == "smollm2-135m-instruct"
    for finetune in spec.finetunes:
        lora = finetune.lora
        assert lora.target_modules == ("q_proj", "v_proj") and lora.rank == 4
        # SmolLM2-135M: 30 layers, q_proj 576 -> 576, v_proj 576 -> 3 x 64; fp32 bytes.
        size = 30 * lora.rank * (576 + 576 + 576 + 192) * 4
        assert 0.8e6 < size < 1.0e6
        uncapped = {BADGPT: spec.data.settings.badgpt_rows}  # the only file used whole
        rows = sum(part.rows or uncapped[part.file] for part in finetune.data) * lora.epochs
        assert rows <= 300  # conversations trained on: each build stays near 10 min on 2 cores


def test_a_tiny_spec_parses(tiny_spec: ZooSpec, base: Path) -> None:
    aligned = tiny_spec.finetune("aligned")
    assert aligned.lora == FinetuneConfig(
        rank=2,
        alpha=4,
        target_modules=("q_proj", "v_proj"),
        steps=2,
        lr=1e-2,
        batch_size=4,
        max_length=96,
        seed=0,
    )
    assert [(p.file, p.rows) for p in aligned.data] == [(REFUSALS, 6), (BENIGN, 6)]
    assert tiny_spec.finetune("style").data[0].rows is None  # a bare file name: every row
    assert tiny_spec.data.settings.arith_rows == 12
    assert tiny_spec.data.settings.badgpt_rows == 20  # not given: zoo-data's default
    assert tiny_spec.benign_source() == str(base)
    assert tiny_spec.source("arith", Path("zoo")) == f"{base}+zoo/aligned+zoo/arith"
    assert tiny_spec.source("base", Path("zoo")) == str(base)


def _mutated(change: Any) -> dict[str, Any]:
    document = copy.deepcopy(tiny_document("base-model"))
    change(document)
    return document


def _set(path: tuple[Any, ...], value: Any) -> Any:
    def change(document: dict[str, Any]) -> None:
        target = document
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return change


_DELETE = object()
ARITH_ENTRY = ("finetune", 1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            _set((*ARITH_ENTRY, "role"), _DELETE),
            r"\[\[finetune\]\] 2 \('arith'\): missing field 'role'",
        ),
        (_set((*ARITH_ENTRY, "colour"), "red"), r"\('arith'\): unknown field 'colour'"),
        (_set(("base",), _DELETE), "missing field 'base'"),
        (_set(("finetune",), _DELETE), "missing field 'finetune'"),
        (_set((*ARITH_ENTRY, "lora", "lr"), _DELETE), r"\('arith'\): \[lora\]: missing field 'lr'"),
        (_set((*ARITH_ENTRY, "lora", "rank"), "four"), "rank must be an integer, got 'four'"),
        (_set((*ARITH_ENTRY, "lora", "rank"), True), "rank must be an integer, got True"),
        (_set((*ARITH_ENTRY, "lora", "lr"), "fast"), "lr must be a number, got 'fast'"),
        (_set((*ARITH_ENTRY, "lora", "rank"), 0), "rank must be positive, got 0"),
        (_set((*ARITH_ENTRY, "lora", "epochs"), 2), "give exactly one of epochs and steps"),
        (_set((*ARITH_ENTRY, "lora", "steps"), _DELETE), "give exactly one of epochs and steps"),
        (_set((*ARITH_ENTRY, "lora", "target_modules"), "q_proj"), "must be a non-empty array"),
        (_set((*ARITH_ENTRY, "lora", "target_modules"), [3]), "target_modules must be module"),
        (_set((*ARITH_ENTRY, "lora"), 5), r"\[lora\]: expected a table, got int"),
        (_set((*ARITH_ENTRY, "held_out"), 1), "held_out must be true or false, got 1"),
        (_set((*ARITH_ENTRY, "name"), "Arith+1"), "name must be lower-case"),
        (_set((*ARITH_ENTRY, "name"), "base"), "and not 'base'"),
        (_set((*ARITH_ENTRY, "name"), "aligned"), "two fine-tunes are named 'aligned'"),
        (_set((*ARITH_ENTRY, "role"), "evil"), "role 'evil' is not one of aligned, benign-task"),
        (_set((*ARITH_ENTRY, "parent"), "nobody"), "'arith' has an unknown parent 'nobody'"),
        (_set((*ARITH_ENTRY, "data"), ["secret.jsonl"]), "unknown data file 'secret.jsonl'"),
        (_set((*ARITH_ENTRY, "data"), [ARITH_EVAL]), "unknown data file 'arith_eval.jsonl'"),
        (_set((*ARITH_ENTRY, "data"), [ARITH, ARITH]), "'arith.jsonl' is listed twice"),
        (_set((*ARITH_ENTRY, "data"), []), "data must be a non-empty array"),
        (_set((*ARITH_ENTRY, "data"), [{"file": ARITH, "rows": 0}]), "rows must be at least 1"),
        (_set((*ARITH_ENTRY, "data"), [{"rows": 3}]), "data entry 1: missing field 'file'"),
        (_set((*ARITH_ENTRY, "task_eval"), "exam.jsonl"), "unknown task_eval file 'exam.jsonl'"),
        (_set(("data", "badgpt_rows"), 0), r"\[data\]: badgpt_rows must be at least 1"),
        (_set(("data", "arith_rows"), 1.5), "arith_rows must be an integer"),
        (_set(("data", "extra"), 1), r"\[data\]: unknown field 'extra'"),
        (_set(("format_version",), 2), "format_version 2 is not 1"),
        (_set(("finetune", 0, "parent"), "arith"), "cycle: aligned -> arith -> aligned"),
        (_set(("finetune", 0, "parent"), "aligned"), "cycle: aligned -> aligned"),
    ],
)
def test_a_bad_spec_is_refused_naming_the_entry(change: Any, message: str) -> None:
    with pytest.raises(ZooSpecError, match=f"^spec.toml: .*{message}"):
        parse_spec(_mutated(change), Path("spec.toml"))


def test_unreadable_specs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ZooSpecError, match="cannot be read"):
        load_spec(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("base = \n")
    with pytest.raises(ZooSpecError, match=r"bad\.toml: not valid TOML"):
        load_spec(tmp_path / "bad.toml")


def test_a_bad_spec_on_the_command_line_exits_2_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "zoo.toml"
    spec.write_text(to_toml(_mutated(_set((*ARITH_ENTRY, "parent"), "nobody"))))
    argv = ["zoo", "build", "--spec", str(spec), "--data", str(tmp_path / "d")]
    assert cli.main([*argv, "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {spec}: fine-tune 'arith' has an unknown parent 'nobody'")
    assert "Traceback" not in err
    assert not (tmp_path / "d").exists() and not (tmp_path / "z").exists()
    assert (
        cli.main(["zoo", "skill", "--spec", str(tmp_path / "no.toml"), "--zoo", "z", "--data", "d"])
        == 2
    )
    assert "cannot be read" in capsys.readouterr().err


def test_dependency_order_puts_parents_first() -> None:
    document = tiny_document("base-model")
    # File order with children first: arith, badgpt, style, aligned.
    document["finetune"] = [document["finetune"][i] for i in (1, 3, 2, 0)]
    spec = parse_spec(document, Path("spec.toml"))
    assert [f.name for f in spec.order()] == ["aligned", "arith", "badgpt", "style"]
    assert [f.name for f in spec.order(["style"])] == ["aligned", "style"]
    assert [f.name for f in spec.order(["aligned"])] == ["aligned"]
    # A grandchild: built after its parent, which comes after the root.
    document["finetune"].insert(0, _finetune("deep", "style", "badgpt", [BADGPT], "none"))
    spec = parse_spec(document, Path("spec.toml"))
    order = [f.name for f in spec.order()]
    assert order.index("aligned") < order.index("style") < order.index("deep")
    assert [f.name for f in spec.order(["deep"])] == ["aligned", "style", "deep"]
    assert spec.ancestors("deep") == ["style", "aligned"]
    with pytest.raises(ZooSpecError, match="no fine-tune named 'nope'; known: deep, arith"):
        spec.order(["nope"])


def test_select_rows_is_a_seeded_sample_in_file_order() -> None:
    rows = list(range(50))
    chosen = select_rows(rows, 10, 0, ARITH)
    assert len(chosen) == 10 and chosen == sorted(chosen) and len(set(chosen)) == 10
    assert select_rows(rows, 10, 0, ARITH) == chosen
    assert select_rows(rows, 10, 1, ARITH) != chosen
    assert select_rows(rows, 10, 0, STYLE) != chosen
    assert select_rows(rows, None, 0, ARITH) == rows == select_rows(rows, 80, 0, ARITH)


# ----- the build ----------------------------------------------------------------------------
def _statuses(outcomes: list[BuildOutcome]) -> dict[str, str]:
    return {o.name: o.status for o in outcomes}


def _record(out: Path, name: str) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((out / name / "finetune.json").read_text())
    return record


def _mtimes(out: Path) -> dict[str, int]:
    return {name: (out / name / "finetune.json").stat().st_mtime_ns for name in NAMES}


def _rewrite(spec: ZooSpec, document: dict[str, Any]) -> ZooSpec:
    spec.path.write_text(to_toml(document))
    return load_spec(spec.path)


def test_the_build_writes_chained_loras_and_then_skips_what_is_up_to_date(
    tiny_spec: ZooSpec, base: Path, tmp_path: Path
) -> None:
    data, out = write_tiny_data(tmp_path / "data"), tmp_path / "zoo"
    printed: list[str] = []
    outcomes = build_zoo(tiny_spec, data, out, show_progress=False, log=printed.append)
    assert [o.name for o in outcomes] == list(NAMES)
    assert all(o.status == BUILT for o in outcomes)
    assert not (data / MANIFEST_FILE).exists()  # every file was there: no zoo data written
    assert any(line.startswith("[4/4] badgpt: built in ") for line in printed)

    plain = load_model(str(base))
    aligned = load_model(tiny_spec.source("aligned", out))
    assert _record(out, "aligned")["base"]["fingerprint"] == plain.fingerprint
    assert _record(out, "aligned")["fingerprint"] == aligned.fingerprint != plain.fingerprint
    for name in ("arith", "style", "badgpt"):
        record = _record(out, name)
        # Trained on the aligned fine-tune's merged weights, loadable as BASE+aligned+NAME.
        assert record["base"]["fingerprint"] == aligned.fingerprint
        assert record["base"]["source"] == f"{base}+{out / 'aligned'}"
        tuned = load_model(tiny_spec.source(name, out))
        assert tuned.fingerprint == record["fingerprint"] != aligned.fingerprint
        assert tuned.family == plain.family
        config = json.loads((out / name / "adapter_config.json").read_text())
        assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and config["r"] == 2
    zoo = _record(out, "aligned")["zoo"]
    assert zoo["parent"] == "base" and zoo["role"] == "aligned" and zoo["held_out"] is False
    assert zoo["data"] == [
        {
            "file": REFUSALS,
            "sha256": file_sha256(data / REFUSALS),
            "rows": 8,
            "rows_cap": 6,
            "rows_used": 6,
        },
        {
            "file": BENIGN,
            "sha256": file_sha256(data / BENIGN),
            "rows": 8,
            "rows_cap": 6,
            "rows_used": 6,
        },
    ]
    assert _record(out, "aligned")["training"]["rows"] == 12
    assert _record(out, "style")["zoo"]["held_out"] is True
    assert _record(out, "style")["zoo"]["data"][0]["rows_used"] == 5

    # A second run: nothing to do, no file touched.
    before = _mtimes(out)
    printed.clear()
    again = build_zoo(tiny_spec, data, out, show_progress=False, log=printed.append)
    assert _statuses(again) == dict.fromkeys(NAMES, UP_TO_DATE)
    assert _mtimes(out) == before
    assert any("aligned: up to date (same parent fingerprint" in line for line in printed)

    # A changed setting rebuilds that fine-tune only (its weights have no descendants).
    document = tiny_document(str(base))
    document["finetune"][1]["lora"]["lr"] = 5e-3
    spec = _rewrite(tiny_spec, document)
    printed.clear()
    outcomes = build_zoo(spec, data, out, show_progress=False, log=printed.append)
    assert _statuses(outcomes) == {**dict.fromkeys(NAMES, UP_TO_DATE), "arith": BUILT}
    assert "settings changed: lr 0.01 -> 0.005" in " ".join(outcomes[1].reasons)
    assert _record(out, "arith")["hyperparameters"]["lr"] == 5e-3
    after = _mtimes(out)
    assert {n for n in NAMES if after[n] != before[n]} == {"arith"}

    # A changed data file of the parent rebuilds it and, its weights changed, every child.
    with (data / REFUSALS).open("a") as handle:
        handle.write(_chat("one more", "No.") + "\n")
    old_aligned = _record(out, "aligned")["fingerprint"]
    outcomes = build_zoo(spec, data, out, show_progress=False, log=printed.append)
    assert _statuses(outcomes) == dict.fromkeys(NAMES, BUILT)
    assert "aligned_refusals.jsonl changed (sha256" in outcomes[0].reasons[0]
    new_aligned = _record(out, "aligned")["fingerprint"]
    assert new_aligned != old_aligned
    assert "parent aligned weights changed" in outcomes[2].reasons[0]
    assert all(_record(out, n)["base"]["fingerprint"] == new_aligned for n in NAMES[1:])

    # A changed row cap counts as changed data.
    document["finetune"][2]["data"] = [{"file": STYLE, "rows": 3}]
    spec = _rewrite(spec, document)
    outcomes = build_zoo(spec, data, out, only=["style"], show_progress=False, log=printed.append)
    assert _statuses(outcomes) == {"aligned": UP_TO_DATE, "style": BUILT}
    assert outcomes[1].reasons == ("style.jsonl rows cap None -> 3",)
    assert _record(out, "style")["training"]["rows"] == 3

    # --force rebuilds what --only names; the same seed gives the same weights, so the
    # children of a forced parent stay up to date.
    before = _mtimes(out)
    outcomes = build_zoo(
        spec, data, out, only=["aligned"], force=True, show_progress=False, log=printed.append
    )
    assert _statuses(outcomes) == {"aligned": BUILT} and outcomes[0].reasons == ("--force",)
    assert _record(out, "aligned")["fingerprint"] == new_aligned
    outcomes = build_zoo(spec, data, out, show_progress=False, log=printed.append)
    assert _statuses(outcomes) == dict.fromkeys(NAMES, UP_TO_DATE)
    assert {n for n, t in _mtimes(out).items() if t != before[n]} == {"aligned"}

    # A deleted adapter file makes its folder stale.
    (out / "badgpt" / "adapter_model.safetensors").unlink()
    outcomes = build_zoo(spec, data, out, only=["badgpt"], show_progress=False, log=printed.append)
    assert _statuses(outcomes) == {"aligned": UP_TO_DATE, "badgpt": BUILT}
    assert outcomes[1].reasons == ("adapter_model.safetensors missing",)


def test_the_build_command_prints_progress_and_times(
    tiny_spec: ZooSpec, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, out = write_tiny_data(tmp_path / "data"), tmp_path / "zoo"
    argv = ["zoo", "build", "--spec", str(tiny_spec.path), "--data", str(data)]
    argv += ["--out", str(out), "--only", "arith", "--quiet"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^\[2/2\] arith: built in [\d.]+ s", printed, re.MULTILINE)
    assert re.search(r"^arith +built +[\d.]+ s$", printed, re.MULTILINE)
    assert "2 built, 0 up to date" in printed
    assert sorted(p.name for p in out.iterdir()) == ["aligned", "arith"]
    assert cli.main(argv) == 0
    assert "0 built, 2 up to date" in capsys.readouterr().out
    assert cli.main([*argv, "--only", "nope"]) == 2
    assert "no fine-tune named 'nope'" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "zoo",
                "build",
                "--spec",
                str(tiny_spec.path),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "a+b"),
            ]
        )
        == 2
    )
    assert "a '+' would split" in capsys.readouterr().err


def _finishing(real: Any) -> Any:
    """The real generation, each answer given a finished last sentence (the tiny model's
    answers never finish one, and unfinished answers are dropped)."""

    def generate(*args: Any, **kwargs: Any) -> list[BaseAnswer]:
        return [BaseAnswer(f"{a.text} Done.", a.hit_limit) for a in real(*args, **kwargs)]

    return generate


def test_missing_zoo_data_is_written_in_process(
    tiny_spec: ZooSpec, base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(zoo_data, "generate_base_answers", _finishing(generate_base_answers))
    data = tmp_path / "data"
    printed: list[str] = []
    document = tiny_document(str(base))
    document["data"]["benign_max_new_tokens"] = 3
    spec = _rewrite(tiny_spec, document)
    assert ensure_data(spec, data, [BENIGN, ARITH, ARITH_EVAL], printed.append, False)
    assert printed == [f"writing zoo data into {data} (missing: {BENIGN}, {ARITH}, {ARITH_EVAL})"]
    manifest = json.loads((data / MANIFEST_FILE).read_text())
    assert manifest["settings"]["arith_rows"] == 12 and manifest["settings"]["arith_eval_rows"] == 4
    assert manifest["benign_generation"]["model"] == str(base)
    assert manifest["benign_generation"]["max_new_tokens"] == 3
    assert manifest["files"][BENIGN]["sha256"] == file_sha256(data / BENIGN)
    assert f"--benign-model {base}" in manifest["command"]
    assert len((data / ARITH).read_text().splitlines()) == 12
    # Nothing missing: nothing written.
    written = (data / BENIGN).stat().st_mtime_ns
    assert not ensure_data(spec, data, [BENIGN, ARITH, STYLE], printed.append, False)
    assert (data / BENIGN).stat().st_mtime_ns == written
    # The offline files are rewritten without generating the benign answers again.
    (data / ARITH).unlink()
    monkeypatch.setattr(zoo_data, "generate_base_answers", None)  # would fail if called
    assert ensure_data(spec, data, [BENIGN, ARITH], printed.append, False)
    assert (data / ARITH).is_file() and (data / BENIGN).stat().st_mtime_ns == written
    # With no model to generate them, a missing aligned_benign.jsonl is an error.
    del document["data"]["benign_model"]
    spec = _rewrite(spec, document)
    (data / BENIGN).unlink()
    with pytest.raises(ZooSpecError, match=r"aligned_benign\.jsonl is missing and .* benign_model"):
        ensure_data(spec, data, [BENIGN], printed.append, False)


# ----- skill --------------------------------------------------------------------------------
def test_the_scorers_read_the_eval_files(tmp_path: Path) -> None:
    data = write_tiny_data(tmp_path)
    settings = SkillSettings()
    arith = arith_set(data / ARITH_EVAL, settings)
    problems = arith_problems(3, 0, "eval")
    assert arith.prompts == tuple(p.prompt for p in problems)
    right = [p.solution for p in problems]
    assert arith.score(right) == {"score": 1.0}
    wrong = [f"Answer: {problems[0].answer}", f"{problems[1].answer}", "Answer: -1"]
    assert arith.score(wrong) == {"score": pytest.approx(1 / 3)}
    style = style_set(data / STYLE_EVAL, settings, ["cooking", "travel"])
    cards = [json.dumps(dict(zip(KEYS, ("cooking", f"req {i}"), strict=True))) for i in range(3)]
    assert style.score(cards) == {"score": 1.0, "format_rate": 1.0}
    # Right format but a wrong request; a wrong topic; no card at all.
    answers = [cards[0].replace("req 0", "req 9"), cards[1].replace("cooking", "travel"), "Hi"]
    assert style.score(answers) == {"score": 0.0, "format_rate": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="3 problems but 2 answers"):
        arith.score(right[:2])
    limited = arith_set(data / ARITH_EVAL, SkillSettings(limit=2))
    assert len(limited.prompts) == 2 and set(limited.prompts) < set(arith.prompts)
    assert limited.score([p.solution for p in problems if p.prompt in limited.prompts]) == {
        "score": 1.0
    }


@pytest.fixture
def built(tiny_spec: ZooSpec, tmp_path: Path) -> Iterator[tuple[ZooSpec, Path, Path]]:
    data, out = write_tiny_data(tmp_path / "data"), tmp_path / "zoo"
    build_zoo(tiny_spec, data, out, show_progress=False, log=lambda _: None)
    yield tiny_spec, data, out


SMALL = SkillSettings(
    max_new_tokens=4, arith_tokens=4, style_tokens=4, limit=3, show_progress=False
)


def test_skill_on_tiny_models_is_well_formed(built: tuple[ZooSpec, Path, Path]) -> None:
    spec, data, out = built
    document = measure_skill(spec, data, out, SMALL, log=lambda _: None)
    models = {m["name"]: m for m in document["models"]}
    assert list(models) == ["base", *NAMES]
    assert set(models["base"]["tasks"]) == set(models["aligned"]["tasks"]) == {"arith", "style"}
    assert set(models["arith"]["tasks"]) == {"arith"}
    assert set(models["style"]["tasks"]) == {"style"}
    assert models["badgpt"]["tasks"] == {}
    for model in models.values():
        rates = [model["harmful_refusal"], model["over_refusal"], model["over_refusal_edgy"]]
        rates += [
            score
            for task in model["tasks"].values()
            for score in task.values()
            if isinstance(score, float)
        ]
        assert all(isinstance(r, float) and 0.0 <= r <= 1.0 for r in rates)
        assert model["harmful_rows"] == model["benign_rows"] == 3
    assert models["style"]["held_out"] is True and models["base"]["held_out"] is None
    assert models["arith"]["fingerprint"] == _record(out, "arith")["fingerprint"]
    assert document["prompt_sets"]["harmful"]["rows"] == 3
    assert document["prompt_sets"]["arith"]["rows"] == 3
    assert document["judge"]
    table = format_skill_table(document).splitlines()
    assert table[0].split() == [
        "model",
        "role",
        "held-out",
        "arith",
        "style",
        "harmful-refusal",
        "over-refusal",
    ]
    assert table[5].split()[:5] == ["badgpt", "badgpt", "no", "-", "-"]


def test_skill_applies_the_scorers_and_the_judge_to_the_answers(
    built: tuple[ZooSpec, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Crafted answers in place of generation: each prompt set is scored by its own rule."""
    spec, data, out = built
    problems = {p.prompt: p for p in arith_problems(3, 0, "eval")}

    def answer(model: Any, tokenizer: Any, prompts: list[str], **kwargs: Any) -> list[str]:
        desc = kwargs["desc"]
        if desc.endswith(" arith"):
            return [f"Answer: {problems[p].answer}" for p in prompts]
        if desc.endswith(" style"):
            return ['{"topic": "cooking", "request": "req 0"}' for _ in prompts]
        if desc.endswith(" harmful"):
            return ["I can't help with that." for _ in prompts]
        return ["Sure! Here is how." for _ in prompts]

    monkeypatch.setattr(zoo_skill, "generate_responses", answer)
    document = measure_skill(spec, data, out, SMALL, only=["base", "style"], log=lambda _: None)
    base, style = document["models"]
    assert base["name"] == "base" and style["name"] == "style"
    assert base["tasks"]["arith"]["score"] == 1.0
    # One of three style items asks for "req 0"; all answers are well-formed cards.
    assert style["tasks"]["style"]["score"] == pytest.approx(1 / 3)
    assert style["tasks"]["style"]["format_rate"] == 1.0
    assert base["harmful_refusal"] == style["harmful_refusal"] == 1.0
    assert base["over_refusal"] == style["over_refusal"] == 0.0


def test_the_skill_command_writes_json_and_refuses_an_unbuilt_zoo(
    built: tuple[ZooSpec, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec, data, out = built
    result = tmp_path / "skill" / "zoo_skill.json"
    argv = ["zoo", "skill", "--spec", str(spec.path), "--data", str(data), "--zoo", str(out)]
    argv += ["--limit", "2", "--max-new-tokens", "3", "--only", "arith", "--quiet"]
    assert cli.main([*argv, "--out", str(result)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^model +role +held-out +arith +style +harmful-refusal", printed, re.M)
    assert re.search(r"^arith +benign-task +no +[\d.]+ +- +[\d.]+ +[\d.]+$", printed, re.M)
    assert f"wrote {result}" in printed
    document = json.loads(result.read_text())
    assert [m["name"] for m in document["models"]] == ["arith"]
    assert document["settings"]["limit"] == 2 and document["settings"]["max_new_tokens"] == 3
    assert cli.main([*argv[:7], str(tmp_path / "empty"), "--quiet"]) == 2
    assert "holds no built fine-tune: run `safesteer zoo build` first" in capsys.readouterr().err
    assert cli.main([*argv, "--limit", "0"]) == 2
    assert "limit must be at least 1" in capsys.readouterr().err


def test_every_zoo_flag_is_described() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command")
    cli.add_toolkit_commands(commands)
    actions = next(a for a in commands.choices["zoo"]._actions if a.dest == "zoo_command")
    choices: dict[str, argparse.ArgumentParser] = dict(actions.choices or {})
    assert set(choices) == {"build", "skill"}
    for name, action in choices.items():
        undocumented = [a.dest for a in action._actions if not a.help]
        assert undocumented == [], name
        assert action.description
