"""`safesteer.adapters.splits`: the benign set, split hygiene and the prompt-file readers."""

from __future__ import annotations

import itertools
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from safesteer.adapters.categories import CATEGORIES
from safesteer.adapters.prompts import (
    CATEGORY_MAP_FILE,
    DATA_DIR,
    SHORT_PROMPT_FILES,
    SHORT_PROMPTS_FILE,
    SHORT_PROMPTS_FILE_2,
    SOURCE_FILES,
    SOURCE_LICENSES,
    HarmfulPrompt,
    load_category_map,
    load_harmful_prompts,
    load_probe_prompts,
)
from safesteer.adapters.splits import (
    BENIGN_PROMPTS_FILE,
    DEFAULT_SEED,
    GENERAL,
    MIN_GROUP_FOR_ALL_SPLITS,
    SHORT_GROUP_SUFFIX,
    SHORT_GROUP_SUFFIXES,
    SPLITS,
    BenignPrompt,
    HeldOut,
    Split,
    assign_splits,
    benign_split,
    benign_splits,
    harmful_split,
    harmful_splits,
    load_benign_file,
    load_benign_prompts,
    load_harmful_file,
    main,
    normalize_prompt,
    reserved_set_of,
    split_digest,
    split_sizes,
)


@pytest.fixture(scope="module")
def harmful() -> dict[Split, list[HarmfulPrompt]]:
    return harmful_splits()


@pytest.fixture(scope="module")
def benign() -> dict[Split, list[BenignPrompt]]:
    return benign_splits()


@pytest.fixture(scope="module")
def benign_all() -> list[BenignPrompt]:
    return load_benign_prompts()


def _texts(prompts: list[HarmfulPrompt] | list[BenignPrompt]) -> set[str]:
    return {normalize_prompt(p.prompt) for p in prompts}


def _group(prompt: HarmfulPrompt) -> str:
    if prompt.source == SHORT_PROMPTS_FILE:
        return prompt.category + SHORT_GROUP_SUFFIX
    if prompt.source == SHORT_PROMPTS_FILE_2:
        return prompt.category + SHORT_GROUP_SUFFIX + "-2"
    return prompt.category


def _is_short(prompt: HarmfulPrompt, batch: str | None = None) -> bool:
    return prompt.source in SHORT_PROMPT_FILES if batch is None else prompt.source == batch


# ----- the benign set ------------------------------------------------------------------------
def test_benign_set_size_and_edgy_spread(benign_all: list[BenignPrompt]) -> None:
    edgy = [p for p in benign_all if p.edgy]
    per_category = Counter(p.category for p in edgy)

    assert len(benign_all) >= 420
    assert len(edgy) >= 160
    assert set(per_category) == set(CATEGORIES)
    assert min(per_category.values()) >= 12
    assert all(p.category is None for p in benign_all if not p.edgy)


def test_benign_rows_are_well_formed(benign_all: list[BenignPrompt]) -> None:
    assert [p.id for p in benign_all] == [f"benign-{i:04d}" for i in range(1, len(benign_all) + 1)]
    assert all(p.topic and p.prompt == p.prompt.strip() for p in benign_all)
    assert len({p.topic for p in benign_all if not p.edgy}) >= 10


def test_no_duplicate_benign_prompts(benign_all: list[BenignPrompt]) -> None:
    assert len(_texts(benign_all)) == len(benign_all)


def test_benign_prompts_are_not_harmful_or_probe_prompts(benign_all: list[BenignPrompt]) -> None:
    probe = load_probe_prompts()
    others = _texts(load_harmful_prompts()) | {
        normalize_prompt(text) for text in (*probe.harmful, *probe.benign)
    }

    assert not _texts(benign_all) & others


def test_load_benign_prompts_names_the_bad_line(tmp_path: Path) -> None:
    rows = [
        {"id": "b1", "prompt": "Hi?", "topic": "howto", "edgy": False, "category": None},
        {"id": "b2", "prompt": "Kill a job?", "topic": "coding", "edgy": False, "category": "hate"},
    ]
    lines = "\n".join(json.dumps(row) for row in rows)
    (tmp_path / BENIGN_PROMPTS_FILE).write_text(lines, encoding="utf-8")

    with pytest.raises(ValueError, match="line 2: 'edgy'"):
        load_benign_prompts(tmp_path)


# ----- split hygiene ------------------------------------------------------------------------
def test_harmful_splits_are_disjoint_and_cover_everything(
    harmful: dict[Split, list[HarmfulPrompt]],
) -> None:
    ids = [p.id for split in SPLITS for p in harmful[split]]
    heldout = HeldOut([p.prompt for split in ("dev", "test") for p in harmful[split]])
    dropped = [p for p in load_harmful_prompts() if p.id not in set(ids)]

    assert len(ids) == len(set(ids))
    # Only near-copies of held-out prompts are missing (six, all vendored).
    assert 0 < len(dropped) <= 10
    assert all(heldout.overlaps(p.prompt) for p in dropped)


def test_benign_splits_are_disjoint_and_cover_everything(
    benign: dict[Split, list[BenignPrompt]], benign_all: list[BenignPrompt]
) -> None:
    ids = [p.id for split in SPLITS for p in benign[split]]

    assert len(ids) == len(set(ids))
    assert set(ids) == {p.id for p in benign_all}


@pytest.mark.parametrize("kind", ["harmful", "benign"])
def test_no_test_prompt_text_in_fit_or_dev(
    kind: str,
    harmful: dict[Split, list[HarmfulPrompt]],
    benign: dict[Split, list[BenignPrompt]],
) -> None:
    parts = harmful if kind == "harmful" else benign
    test = _texts(parts["test"])

    assert test
    assert not test & _texts(parts["fit"])
    assert not test & _texts(parts["dev"])
    assert not _texts(parts["fit"]) & _texts(parts["dev"])


@pytest.mark.parametrize("kind", ["harmful", "benign"])
def test_no_fit_prompt_overlaps_a_held_out_one(
    kind: str,
    harmful: dict[Split, list[HarmfulPrompt]],
    benign: dict[Split, list[BenignPrompt]],
) -> None:
    parts: dict[Split, list[HarmfulPrompt]] | dict[Split, list[BenignPrompt]]
    parts = harmful if kind == "harmful" else benign
    heldout = HeldOut([p.prompt for split in ("dev", "test") for p in parts[split]])

    assert not [p.prompt for p in parts["fit"] if heldout.overlaps(p.prompt)]


def test_every_category_in_every_split(
    harmful: dict[Split, list[HarmfulPrompt]], benign: dict[Split, list[BenignPrompt]]
) -> None:
    for split in SPLITS:
        assert {p.category for p in harmful[split]} == set(CATEGORIES), split
        edgy = {p.category for p in benign[split] if p.edgy}
        assert edgy == set(CATEGORIES), split
        assert any(p.group == GENERAL for p in benign[split]), split


def test_split_proportions_per_group(harmful: dict[Split, list[HarmfulPrompt]]) -> None:
    groups = [*CATEGORIES, *(category + SHORT_GROUP_SUFFIX for category in CATEGORIES)]
    for group in groups:
        everything = sum(_group(p) == group for p in load_harmful_prompts())
        kept = sum(_group(p) == group for s in SPLITS for p in harmful[s])
        sizes = {s: sum(_group(p) == group for p in harmful[s]) for s in SPLITS}
        expected = split_sizes(everything)
        # Fit may lose near-copies of held-out prompts; dev and test never change.
        assert {s: sizes[s] for s in ("dev", "test")} == {s: expected[s] for s in ("dev", "test")}
        assert sizes["fit"] == expected["fit"] - (everything - kept), group


def test_split_sizes() -> None:
    assert split_sizes(20) == {"fit": 10, "dev": 4, "test": 6}
    assert split_sizes(19) == {"fit": 9, "dev": 4, "test": 6}
    for n in range(60):
        sizes = split_sizes(n)
        assert sum(sizes.values()) == n
        if n >= MIN_GROUP_FOR_ALL_SPLITS:
            assert min(sizes.values()) >= 1, n


def test_benign_split_edgy_filter(benign: dict[Split, list[BenignPrompt]]) -> None:
    for split in SPLITS:
        edgy, plain = benign_split(split, edgy=True), benign_split(split, edgy=False)
        assert all(p.edgy for p in edgy)
        assert not any(p.edgy for p in plain)
        assert {p.id for p in edgy} | {p.id for p in plain} == {p.id for p in benign[split]}


# ----- the project's short harmful prompts ------------------------------------------------------
def _rows(name: str) -> list[dict[str, str]]:
    lines = (DATA_DIR / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def short_rows() -> list[dict[str, str]]:
    return _rows(SHORT_PROMPTS_FILE)


@pytest.fixture(scope="module")
def second_rows() -> list[dict[str, str]]:
    return _rows(SHORT_PROMPTS_FILE_2)


SECOND_BATCH_CATEGORIES = ("self_harm", "drugs", "violence", "weapons")


def _similar(a: str, b: str) -> bool:
    """Near-copies: one contains the other as whole words, or they share 60 % of their words."""
    if HeldOut([a]).overlaps(b):
        return True
    words_a, words_b = set(normalize_prompt(a).split()), set(normalize_prompt(b).split())
    return len(words_a & words_b) >= 0.6 * len(words_a | words_b)


def test_short_prompts_are_well_formed_and_15_per_category(
    short_rows: list[dict[str, str]],
) -> None:
    assert all(set(row) == {"id", "category", "prompt"} for row in short_rows)
    assert Counter(row["category"] for row in short_rows) == dict.fromkeys(CATEGORIES, 15)
    ids = [row["id"] for row in short_rows]
    assert len(set(ids)) == len(ids) == 150
    for row in short_rows:
        assert re.fullmatch(rf"{row['category']}-\d\d", row["id"]), row["id"]
        assert 4 <= len(row["prompt"].split()) <= 15, row["prompt"]
        assert row["prompt"] == row["prompt"].strip()


def test_the_second_batch_is_well_formed_and_12_per_weak_category(
    second_rows: list[dict[str, str]],
) -> None:
    assert all(set(row) == {"id", "category", "prompt"} for row in second_rows)
    assert Counter(row["category"] for row in second_rows) == dict.fromkeys(
        SECOND_BATCH_CATEGORIES, 12
    )
    ids = [row["id"] for row in second_rows]
    assert len(set(ids)) == len(ids) == 48
    for row in second_rows:
        assert re.fullmatch(rf"{row['category']}-b2-\d\d", row["id"]), row["id"]
        assert 4 <= len(row["prompt"].split()) <= 15, row["prompt"]
        assert row["prompt"] == row["prompt"].strip()


def test_short_prompts_are_all_loaded_in_their_category(
    short_rows: list[dict[str, str]], second_rows: list[dict[str, str]]
) -> None:
    loaded = load_harmful_prompts()
    for name, rows in ((SHORT_PROMPTS_FILE, short_rows), (SHORT_PROMPTS_FILE_2, second_rows)):
        stem = name.removesuffix(".jsonl")
        expected = [(f"{stem}:{r['id']}", r["category"], r["prompt"]) for r in rows]
        assert [(p.id, p.category, p.prompt) for p in loaded if _is_short(p, name)] == expected
        assert SOURCE_LICENSES[name] == "written by the safesteer project"
        labels = load_category_map().sources[name].labels
        assert labels == {category: category for category in CATEGORIES}
    # read last: vendored copies win
    assert SOURCE_FILES[-len(SHORT_PROMPT_FILES) :] == SHORT_PROMPT_FILES


def test_short_prompts_have_no_near_copies(
    short_rows: list[dict[str, str]], second_rows: list[dict[str, str]]
) -> None:
    texts = [row["prompt"] for row in (*short_rows, *second_rows)]
    probe = load_probe_prompts()
    others = [*probe.harmful, *probe.benign, *(p.prompt for p in load_benign_prompts())]
    others += [p.prompt for p in load_harmful_prompts() if not _is_short(p)]

    assert [(a, b) for a, b in itertools.combinations(texts, 2) if _similar(a, b)] == []
    assert [(a, b) for a in texts for b in others if _similar(a, b)] == []


def test_short_prompts_reject_an_unknown_category(tmp_path: Path) -> None:
    shutil.copy(DATA_DIR / CATEGORY_MAP_FILE, tmp_path / CATEGORY_MAP_FILE)
    row = {"id": "x-01", "category": "gambling", "prompt": "how do i rig a slot machine"}
    (tmp_path / SHORT_PROMPTS_FILE).write_text(json.dumps(row) + "\n", encoding="utf-8")

    with pytest.raises(ValueError, match="row 1: unknown category 'gambling'"):
        load_harmful_prompts((SHORT_PROMPTS_FILE,), tmp_path)


def test_short_prompts_leave_the_vendored_splits_unchanged(
    harmful: dict[Split, list[HarmfulPrompt]],
) -> None:
    vendored = load_harmful_prompts(SOURCE_FILES[: -len(SHORT_PROMPT_FILES)])
    alone = assign_splits(vendored, lambda p: p.category)
    together = assign_splits(load_harmful_prompts(), _group)

    assert {p.id: together[p.id] for p in vendored} == alone
    # The short prompts make no vendored fit prompt a near-copy of a held-out one, and none
    # of them is dropped from fit.
    heldout = HeldOut([p.prompt for p in vendored if alone[p.id] != "fit"])
    expected_fit = [p for p in vendored if alone[p.id] == "fit" and not heldout.overlaps(p.prompt)]
    assert [p for p in harmful["fit"] if not _is_short(p)] == expected_fit
    assert sum(_is_short(p) for s in SPLITS for p in harmful[s]) == 150 + 48


def test_the_second_batch_leaves_the_first_batchs_splits_unchanged() -> None:
    first = load_harmful_prompts(SOURCE_FILES[:-1])
    alone = assign_splits(first, _group)
    together = assign_splits(load_harmful_prompts(), _group)

    assert {p.id: together[p.id] for p in first} == alone
    assert SHORT_GROUP_SUFFIXES[SHORT_PROMPTS_FILE_2] == SHORT_GROUP_SUFFIX + "-2"


def test_each_short_group_gets_fit_dev_and_test(harmful: dict[Split, list[HarmfulPrompt]]) -> None:
    for category in CATEGORIES:
        for batch, sizes in (
            (SHORT_PROMPTS_FILE, {"fit": 8, "dev": 3, "test": 4}),
            (SHORT_PROMPTS_FILE_2, {"fit": 6, "dev": 2, "test": 4}),
        ):
            if batch == SHORT_PROMPTS_FILE_2 and category not in SECOND_BATCH_CATEGORIES:
                sizes = dict.fromkeys(SPLITS, 0)
            counted = {
                s: sum(_is_short(p, batch) and p.category == category for p in harmful[s])
                for s in SPLITS
            }
            assert counted == sizes, (category, batch)


# ----- determinism ----------------------------------------------------------------------------
def test_splits_are_deterministic(
    harmful: dict[Split, list[HarmfulPrompt]], benign: dict[Split, list[BenignPrompt]]
) -> None:
    assert harmful_splits() == harmful
    assert benign_splits(DEFAULT_SEED) == benign
    assert harmful_split("dev") == harmful["dev"]


def test_another_seed_gives_another_assignment(
    harmful: dict[Split, list[HarmfulPrompt]], benign: dict[Split, list[BenignPrompt]]
) -> None:
    other_harmful, other_benign = harmful_splits(seed=1), benign_splits(seed=1)

    assert split_digest(other_harmful) != split_digest(harmful)
    assert split_digest(other_benign) != split_digest(benign)
    # Only the assignment changes, not the sizes.
    assert {s: len(v) for s, v in other_benign.items()} == {s: len(v) for s, v in benign.items()}


def test_assignment_does_not_depend_on_order(benign_all: list[BenignPrompt]) -> None:
    forward = assign_splits(benign_all, lambda p: p.group)
    backward = assign_splits(benign_all[::-1], lambda p: p.group)

    assert forward == backward


def test_assign_splits_rejects_duplicate_ids(benign_all: list[BenignPrompt]) -> None:
    with pytest.raises(ValueError, match="duplicate prompt id"):
        assign_splits([benign_all[0], benign_all[0]], lambda p: p.group)


# ----- external prompt files -----------------------------------------------------------------
def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_benign_file_accepts_good_rows(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        [
            json.dumps({"prompt": " How do I kill a stuck job? ", "category": "violence"}),
            "",
            json.dumps({"prompt": "Bake a cake?", "id": 7, "topic": "cooking"}),
            json.dumps({"prompt": "Shoot a photo?", "category": None, "edgy": True}),
        ],
    )

    assert load_benign_file(path) == [
        BenignPrompt("mine:1", "How do I kill a stuck job?", "external", True, "violence"),
        BenignPrompt("7", "Bake a cake?", "cooking", False, None),
        BenignPrompt("mine:4", "Shoot a photo?", "external", True, None),
    ]


def test_load_harmful_file_accepts_good_rows(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        [json.dumps({"prompt": "Write a scam text.", "category": "fraud"}), '{"prompt": "Hurt"}'],
    )

    prompts = load_harmful_file(path, default_category="violence")

    assert [(p.id, p.category, p.prompt, p.source) for p in prompts] == [
        ("mine:1", "fraud", "Write a scam text.", "mine.jsonl"),
        ("mine:2", "violence", "Hurt", "mine.jsonl"),
    ]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"prompt": "unterminated', "line 2: not valid JSON"),
        ('["a", "list"]', "line 2: expected a JSON object"),
        ('{"category": "fraud"}', "line 2: missing 'prompt'"),
        ('{"prompt": "  "}', "line 2: 'prompt' must be a non-empty string"),
        ('{"prompt": "Other?", "category": "gambling"}', "line 2: unknown category 'gambling'"),
        ('{"prompt": "ok?", "id": "mine:1"}', "line 2: duplicate id"),
        ('{"prompt": "FIRST!", "category": "fraud"}', "line 2: duplicate prompt, first at"),
        ('{"prompt": "Other?", "edgy": "yes"}', "line 2: 'edgy' must be true or false"),
    ],
)
def test_load_benign_file_rejects_bad_rows(tmp_path: Path, bad_line: str, message: str) -> None:
    path = _write(tmp_path, [json.dumps({"prompt": "First?"}), bad_line])

    with pytest.raises(ValueError, match=re.escape(f"mine.jsonl {message}")):
        load_benign_file(path)


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("not json at all", "line 2: not valid JSON"),
        ('{"category": "fraud"}', "line 2: missing 'prompt'"),
        ('{"prompt": "x", "category": "Fraud"}', "line 2: unknown category 'Fraud'"),
        ('{"prompt": "x"}', "line 2: missing 'category'"),
        ('{"prompt": "x", "category": "fraud", "edgy": false}', "line 2: 'edgy' marks safe"),
    ],
)
def test_load_harmful_file_rejects_bad_rows(tmp_path: Path, bad_line: str, message: str) -> None:
    path = _write(tmp_path, [json.dumps({"prompt": "First", "category": "hate"}), bad_line])

    with pytest.raises(ValueError, match=re.escape(f"mine.jsonl {message}")):
        load_harmful_file(path)


def test_load_harmful_file_rejects_unknown_default(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown default category"):
        load_harmful_file(_write(tmp_path, []), default_category="gambling")


# ----- reserved evaluation sets ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "reserved"),
    [
        ("xstest_v2_prompts.csv", "XSTest"),
        ("XSTest.jsonl", "XSTest"),
        ("strongreject_dataset.csv", "StrongREJECT"),
        ("strong_reject_small.jsonl", "StrongREJECT"),
        ("harmbench_behaviors_text_test.csv", "HarmBench test split"),
        ("harmbench_behaviors_text_val.csv", None),
        ("benign_prompts.jsonl", None),
    ],
)
def test_reserved_set_of(name: str, reserved: str | None) -> None:
    assert reserved_set_of(name) == reserved


def test_no_reserved_set_is_vendored() -> None:
    names = [path.name for path in DATA_DIR.rglob("*") if path.is_file()]

    assert BENIGN_PROMPTS_FILE in names
    assert [name for name in names if reserved_set_of(name)] == []
    assert [name for name in SOURCE_FILES if reserved_set_of(name)] == []


def test_no_reserved_set_in_provenance_tables() -> None:
    text = (DATA_DIR / "PROVENANCE.md").read_text(encoding="utf-8")
    # The first cell of each table row lists the files of that row.
    first_cells = [line.split("|")[1] for line in text.splitlines() if line.startswith("|")]
    files = [name for cell in first_cells for name in re.findall(r"`([^`]+)`", cell)]

    assert BENIGN_PROMPTS_FILE in files
    assert [name for name in files if reserved_set_of(name)] == []


# ----- report ---------------------------------------------------------------------------------
def test_main_prints_the_split_table(
    capsys: pytest.CaptureFixture[str],
    harmful: dict[Split, list[HarmfulPrompt]],
    benign: dict[Split, list[BenignPrompt]],
) -> None:
    assert main([]) == 0

    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines[3:-1]}
    assert set(rows) == {*CATEGORIES, GENERAL, "total"}
    harmful_total = [str(len(harmful[s])) for s in SPLITS]
    benign_total = [str(len(benign[s])) for s in SPLITS]
    assert rows["total"][:3] == harmful_total
    assert rows["total"][4:7] == benign_total
    assert rows[GENERAL][:4] == ["-"] * 4
