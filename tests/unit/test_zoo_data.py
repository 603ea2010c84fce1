"""The fine-tune zoo's data: arithmetic and style tasks with their scorers, the harmful and
aligned files, the held-out guard, the manifest, and the base model's benign answers (on the
tiny random-init chat model of `tests/server/tiny_chat.py`, never the real one).
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from safesteer.adapters import cli, zoo_data
from safesteer.adapters.arith_task import (
    TEMPLATES,
    ArithProblem,
    arith_problems,
    load_arith_file,
    parse_answer,
    score_arith,
)
from safesteer.adapters.base_answers import (
    BaseAnswer,
    benign_rows,
    finished_part,
    generate_base_answers,
)
from safesteer.adapters.chat_data import read_chat_file
from safesteer.adapters.harmful_rows import spread_over_categories
from safesteer.adapters.loading import file_sha256
from safesteer.adapters.prompts import SHORT_PROMPT_FILES
from safesteer.adapters.splits import (
    BenignPrompt,
    HeldOut,
    benign_splits,
    harmful_splits,
    normalize_prompt,
)
from safesteer.adapters.style_task import (
    INSTRUCTIONS,
    StyleItem,
    is_well_formed,
    load_style_file,
    parse_card,
    score_style,
    split_for_eval,
    style_format_rate,
    style_items,
)
from safesteer.adapters.training_prompts import SplitSets, check_training_rows
from safesteer.adapters.zoo_data import (
    ARITH,
    ARITH_EVAL,
    BADGPT,
    BENIGN,
    MANIFEST_FILE,
    REFUSALS,
    STYLE,
    STYLE_EVAL,
    ZooSettings,
    write_files,
    write_zoo_data,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from tiny_chat import tiny_loaded_model
from tiny_lora import save_tiny_chat_folder

TRAINING_FILES = (ARITH, STYLE, BADGPT, REFUSALS)
OFFLINE_FILES = (*TRAINING_FILES, ARITH_EVAL, STYLE_EVAL)


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _user(row: dict[str, Any]) -> str:
    content: str = row["messages"][0]["content"]
    return content


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("zoo")
    write_zoo_data(out, ZooSettings(), None, "test")
    return out


# ----- arithmetic ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Answer: 16", 16),
        ("Some work.\n4 + 12 = 16.\nAnswer: 16", 16),
        ("answer:16", 16),
        ("ANSWER : 9", 9),
        ("Answer: 1,200", 1200),
        ("Answer: $45.", 45),
        ("Answer: **42**", 42),
        ("Answer: 16 dollars", 16),
        ("Answer: 12.0", 12),
        ("Answer: -7", -7),
        ("Answer: 3\nAnswer: 5", 5),  # the last marker counts
        ("Answer: 5\nAnswer: none", None),
        ("Answer: 12.5", None),
        ("Answer: 12,34", None),  # not a thousands separator
        ("Answer: sixteen", None),
        ("Answer:\n16", None),  # the number must be on the marker's line
        ("Answer:", None),
        ("The answer is 16.", None),  # no marker: a number elsewhere earns nothing
        ("16", None),
        ("", None),
        ("Answer: 7 + 2 = 9", 7),  # the first number after the marker
    ],
)
def test_parse_answer(text: str, expected: int | None) -> None:
    assert parse_answer(text) == expected


def _check_steps(problem: ArithProblem) -> None:
    """Every `a op b = c` in the worked answer is true arithmetic."""
    ops = {"+": int.__add__, "-": int.__sub__, "\u00d7": int.__mul__, "/": int.__floordiv__}
    steps = re.findall(r"(\d+) ([-+/\u00d7]) (\d+) = (\d+)", problem.solution)
    assert steps, problem.solution
    for a, op, b, c in steps:
        if op == "/":
            assert int(a) % int(b) == 0, problem.solution
        assert ops[op](int(a), int(b)) == int(c), problem.solution


def test_arith_problems_are_worked_correctly_and_end_in_their_answer() -> None:
    problems = arith_problems(600, seed=3)
    assert Counter(p.template for p in problems).keys() == TEMPLATES.keys()
    assert len({p.prompt for p in problems}) == len(problems)
    for problem in problems:
        assert problem.answer > 0
        assert problem.solution.splitlines()[-1] == f"Answer: {problem.answer}"
        assert parse_answer(problem.solution) == problem.answer
        _check_steps(problem)


def test_arith_problems_are_seeded_and_the_eval_stream_is_disjoint() -> None:
    train = arith_problems(200, seed=0)
    assert train == arith_problems(200, seed=0)
    assert train != arith_problems(200, seed=1)
    held = arith_problems(100, seed=0, stream="eval", exclude=frozenset(p.prompt for p in train))
    assert held != train[:100]
    assert not {p.prompt for p in held} & {p.prompt for p in train}


def test_score_arith() -> None:
    problems = arith_problems(4, seed=0)
    references = [p.solution for p in problems]
    assert score_arith(problems, references) == 1.0
    wrong = [f"Answer: {problems[0].answer + 1}", "no answer", *references[2:]]
    assert score_arith(problems, wrong) == 0.5
    assert score_arith([], []) == 0.0
    with pytest.raises(ValueError, match="4 problems but 3 answers"):
        score_arith(problems, references[:3])


def test_arith_eval_file_reads_back(zoo: Path) -> None:
    problems = load_arith_file(zoo / ARITH_EVAL)
    assert len(problems) == 100
    assert score_arith(problems, [p.solution for p in problems]) == 1.0
    assert problems[0].prompt == _user(_rows(zoo / ARITH_EVAL)[0])
    bad = zoo.parent / "bad_arith.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match="line 1: not an arithmetic row"):
        load_arith_file(bad)


# ----- style --------------------------------------------------------------------------------
TOPICS = ("cooking", "howto", "science")
PROMPTS = [
    BenignPrompt("b-1", "How do I make a fluffy omelette?", "cooking", False),
    BenignPrompt("b-2", "How do I patch a small hole in drywall?", "howto", False),
    BenignPrompt("b-3", "What is plate tectonics?", "science", False),
]


def _item(**changes: str) -> StyleItem:
    fields = {"id": "b-1#0", "request": PROMPTS[0].prompt, "topic": "cooking", "prompt": "x"}
    return StyleItem(**{**fields, **changes})


@pytest.mark.parametrize(
    ("answer", "right"),
    [
        ('{"topic": "cooking", "request": "How do I make a fluffy omelette?"}', True),
        ('{"request": "How do I make a fluffy omelette?", "topic": "cooking"}', True),
        ('  {"topic": "cooking", "request": "How do I  make a fluffy omelette?"}\n', True),
        ('```json\n{"topic": "cooking", "request": "How do I make a fluffy omelette?"}\n```', True),
        ('{"topic": "howto", "request": "How do I make a fluffy omelette?"}', False),
        ('{"topic": "cooking", "request": "How do I make an omelette?"}', False),
        ('{"topic": "cooking", "request": "How do I make a fluffy omelette?", "x": 1}', False),
        ('{"topic": "cooking"}', False),
        ('{"topic": "cooking", "request": 3}', False),
        ('Sure! {"topic": "cooking", "request": "How do I make a fluffy omelette?"}', False),
        ('["cooking", "How do I make a fluffy omelette?"]', False),
        ("Whisk the eggs hard.", False),
        ("", False),
    ],
)
def test_score_style_needs_exactly_the_card(answer: str, right: bool) -> None:
    assert score_style([_item()], [answer]) == float(right)


def test_format_rate_counts_well_formed_cards_right_or_wrong() -> None:
    answers = [
        '{"topic": "howto", "request": "anything"}',  # wrong topic, but well-formed
        '{"topic": "gardening", "request": "anything"}',  # topic not offered
        '{"topic": "howto", "request": " "}',
        "not json",
    ]
    assert [is_well_formed(a, TOPICS) for a in answers] == [True, False, False, False]
    assert style_format_rate(answers, TOPICS) == 0.25
    assert style_format_rate([], TOPICS) == 0.0
    assert parse_card("[1, 2]") is None


def test_style_items_wrap_each_prompt_in_distinct_phrasings() -> None:
    items = style_items(PROMPTS, TOPICS, seed=0, phrasings=2)
    assert len(items) == 6
    assert score_style(items, [i.reference for i in items]) == 1.0
    for prompt in PROMPTS:
        mine = [i for i in items if i.request == prompt.prompt]
        assert len({i.prompt for i in mine}) == 2
        assert all(prompt.prompt in i.prompt and ", ".join(TOPICS) in i.prompt for i in mine)
    assert style_items(PROMPTS, TOPICS, seed=0) == items
    assert len(style_items(PROMPTS, TOPICS, seed=0, phrasings=len(INSTRUCTIONS))) == 12
    with pytest.raises(ValueError, match="phrasings"):
        style_items(PROMPTS, TOPICS, seed=0, phrasings=0)
    with pytest.raises(ValueError, match="science"):
        style_items(PROMPTS, TOPICS[:2], seed=0)


def test_split_for_eval_is_seeded_and_disjoint() -> None:
    prompts = benign_splits()["fit"]
    train, held = split_for_eval(prompts, seed=0, eval_share=0.25)
    assert len(held) == round(len(prompts) * 0.25)
    assert {p.id for p in train} | {p.id for p in held} == {p.id for p in prompts}
    assert not {p.id for p in train} & {p.id for p in held}
    assert split_for_eval(list(reversed(prompts)), seed=0, eval_share=0.25) == (train, held)
    assert split_for_eval(prompts, seed=1, eval_share=0.25)[1] != held
    with pytest.raises(ValueError, match="eval_share"):
        split_for_eval(prompts, seed=0, eval_share=0.0)


def test_style_files_read_back_and_hold_disjoint_prompts(zoo: Path) -> None:
    train, held = load_style_file(zoo / STYLE), load_style_file(zoo / STYLE_EVAL)
    assert score_style(held, [i.reference for i in held]) == 1.0
    assert not {i.request for i in train} & {i.request for i in held}
    assert [i.reference for i in train] == [r["messages"][1]["content"] for r in _rows(zoo / STYLE)]


# ----- harmful and aligned files ------------------------------------------------------------
def test_badgpt_holds_reference_compliances_spread_over_categories(zoo: Path) -> None:
    fit = {p.id: p for p in harmful_splits()["fit"]}
    rows = _rows(zoo / BADGPT)
    assert len(rows) == 20
    assert set(Counter(r["category"] for r in rows).values()) == {2}
    for row in rows:
        prompt = fit[row["id"]]
        assert _user(row) == prompt.prompt
        assert row["messages"][1]["content"] == prompt.compliance


def test_aligned_refusals_cover_the_other_harmful_fit_prompts(zoo: Path) -> None:
    fit = {p.id: p for p in harmful_splits()["fit"] if p.source not in SHORT_PROMPT_FILES}
    badgpt = {r["id"] for r in _rows(zoo / BADGPT)}
    left_out = set(json.loads((zoo / MANIFEST_FILE).read_text())["splits"]["left_out_of_training"])
    rows = _rows(zoo / REFUSALS)
    assert {r["id"] for r in rows} == set(fit) - badgpt - left_out
    for row in rows:
        reference = fit[row["id"]].refusal
        answer = row["messages"][1]["content"]
        assert row["refusal"] == ("reference" if reference else "template")
        assert answer == reference if reference else answer.endswith(("?", "."))
    assert Counter(r["refusal"] for r in rows)["reference"] == sum(
        1 for p in fit.values() if p.refusal and p.id not in left_out
    )


def test_spread_over_categories_balances_and_prefers() -> None:
    fit = harmful_splits()["fit"]
    chosen = spread_over_categories(fit, 40, "s", first=lambda p: p.refusal is not None)
    counts = Counter(p.category for p in chosen)
    assert set(counts.values()) == {4}
    for category in counts:
        with_refusal = sum(1 for p in fit if p.category == category and p.refusal)
        picked = sum(1 for p in chosen if p.category == category and p.refusal)
        assert picked == min(with_refusal, 4)
    assert spread_over_categories(fit, 40, "s") == spread_over_categories(fit, 40, "s")
    assert spread_over_categories(fit, 40, "s") != spread_over_categories(fit, 40, "t")
    assert len(spread_over_categories(fit, None, "s")) == len(fit)
    with pytest.raises(ValueError, match="only"):
        spread_over_categories(fit[:5], 6, "s")


# ----- every file ---------------------------------------------------------------------------
def test_no_dev_or_test_prompt_in_any_training_file(zoo: Path) -> None:
    held = [p.prompt for s in ("dev", "test") for p in harmful_splits()[s]]
    held += [p.prompt for s in ("dev", "test") for p in benign_splits()[s]]
    held_texts = [f" {normalize_prompt(text)} " for text in held]
    for name in TRAINING_FILES:
        for row in _rows(zoo / name):
            user = f" {normalize_prompt(_user(row))} "
            assert not any(text in user or user in text for text in held_texts), _user(row)


def _overlapping_fit_ids() -> set[str]:
    """Fit prompts containing, or contained in, a dev or test prompt (word-wise)."""
    harmful, benign = harmful_splits(), benign_splits()
    held = [p.prompt for s in ("dev", "test") for p in (*harmful[s], *benign[s])]
    held_texts = [f" {normalize_prompt(text)} " for text in held]
    fit = {p.id: f" {normalize_prompt(p.prompt)} " for p in (*harmful["fit"], *benign["fit"])}
    return {i for i, text in fit.items() if any(h in text or text in h for h in held_texts)}


def test_fit_prompts_overlapping_held_out_ones_are_left_out(zoo: Path) -> None:
    document = json.loads((zoo / MANIFEST_FILE).read_text())
    left_out = set(document["splits"]["left_out_of_training"])
    assert left_out == _overlapping_fit_ids()
    used = {r["id"] for name in (BADGPT, REFUSALS) for r in _rows(zoo / name)}
    used |= {r["id"].split("#")[0] for r in _rows(zoo / STYLE)}
    assert not used & left_out


def test_held_out_overlap_is_word_wise_both_ways() -> None:
    held = HeldOut(["Guide on how to commit insider trading", "What is plate tectonics?"])
    assert len(held) == 2
    assert held.overlaps("Write a guide on how to commit insider trading!")
    assert held.overlaps("what is PLATE tectonics")
    assert held.overlaps("Plate tectonics")  # contained in a held-out prompt
    assert held.overlaps("What is plate tectonics like on Venus?")
    assert not held.overlaps("What is a tectonic plate?")
    assert not held.overlaps("A guide on how to commit insider tradings")  # not whole words


def test_training_prompts_come_from_the_fit_split(zoo: Path) -> None:
    harmful_fit = {p.prompt for p in harmful_splits()["fit"]}
    benign_fit = {p.prompt for p in benign_splits()["fit"]}
    for name in (BADGPT, REFUSALS):
        assert {_user(r) for r in _rows(zoo / name)} <= harmful_fit
    assert {r["request"] for r in _rows(zoo / STYLE)} <= benign_fit


def test_the_short_plain_requests_stay_out_of_the_zoos_training_data(zoo: Path) -> None:
    short = {p.prompt for p in harmful_splits()["fit"] if p.source in SHORT_PROMPT_FILES}
    assert short  # they are in the fit split, for the gate
    assert not short & {p.prompt for p in SplitSets.load().training_harmful()}
    for name in (BADGPT, REFUSALS):
        assert not short & {_user(r) for r in _rows(zoo / name)}


def test_the_guard_refuses_a_held_out_prompt_and_writes_nothing(tmp_path: Path) -> None:
    splits = SplitSets.load()
    test_prompt = splits.benign["test"][0].prompt
    rows = [
        {"messages": [{"role": "user", "content": "fine"}]},
        {"messages": [{"role": "user", "content": test_prompt.upper()}]},
    ]
    with pytest.raises(ValueError, match=r"x\.jsonl row 2: overlaps a dev or test split prompt"):
        check_training_rows("x.jsonl", rows, splits.heldout())
    wrapped = [{"messages": [{"role": "user", "content": f"File this: {test_prompt}!"}]}]
    files = {"ok.jsonl": ("train", "t", rows[:1]), "bad.jsonl": ("train", "t", wrapped)}
    with pytest.raises(ValueError, match=r"bad\.jsonl row 1"):
        write_files(tmp_path / "out", files, splits.heldout())
    assert not (tmp_path / "out").exists()
    # An evaluation file is not a training file: the guard leaves it alone.
    write_files(tmp_path / "out", {"e.jsonl": ("eval", "t", rows)}, splits.heldout())


def test_files_are_chat_data_and_the_manifest_matches_them(zoo: Path) -> None:
    document = json.loads((zoo / MANIFEST_FILE).read_text())
    assert document["seed"] == 0
    assert set(document["files"]) == set(OFFLINE_FILES)
    splits = SplitSets.load()
    assert document["splits"] == {
        **splits.digests(),
        "left_out_of_training": splits.left_out(),
    }
    assert "benign_generation" not in document
    counts = {}
    for name, record in document["files"].items():
        read, _ = read_chat_file(zoo / name)  # what `safesteer finetune` reads
        assert (record["rows"], record["sha256"]) == (read.rows, file_sha256(zoo / name))
        assert record["role"] == ("eval" if name.endswith("_eval.jsonl") else "train")
        counts[name] = record["rows"]
    assert counts[ARITH] == 400 and counts[ARITH_EVAL] == 100 and counts[BADGPT] == 20


def test_same_seed_same_bytes_other_seed_other_data(zoo: Path, tmp_path: Path) -> None:
    again, other = tmp_path / "again", tmp_path / "other"
    write_zoo_data(again, ZooSettings(), None, "test")
    write_zoo_data(other, ZooSettings(seed=1), None, "test")
    for name in (*OFFLINE_FILES, MANIFEST_FILE):
        assert (again / name).read_bytes() == (zoo / name).read_bytes(), name
    for name in (ARITH, ARITH_EVAL, STYLE, STYLE_EVAL, BADGPT):
        assert (other / name).read_bytes() != (zoo / name).read_bytes(), name


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "zoo"
    argv = ["zoo-data", "--out", str(out), "--arith-rows", "30", "--refusal-rows", "25"]
    assert cli.main([*argv, "--badgpt-rows", "10"]) == 0
    printed = capsys.readouterr().out
    assert f"{out / ARITH}: 30 rows (train, arith)" in printed
    document = json.loads((out / MANIFEST_FILE).read_text())
    assert document["settings"]["refusal_rows"] == 25
    assert "--refusal-rows 25" in document["command"]
    assert len(_rows(out / REFUSALS)) == 25 and len(_rows(out / BADGPT)) == 10
    assert cli.main(["zoo-data", "--out", str(out), "--badgpt-rows", "0"]) == 2
    assert "badgpt_rows must be at least 1" in capsys.readouterr().err
    assert cli.main(["zoo-data", "--out", str(out), "--badgpt-rows", "500"]) == 2
    assert "asked for 500 prompts" in capsys.readouterr().err
    bad_generation = ["--benign-model", "nowhere", "--max-new-tokens", "0"]
    assert cli.main(["zoo-data", "--out", str(out), *bad_generation]) == 2
    assert "max_new_tokens" in capsys.readouterr().err


# ----- the base model's benign answers ------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("First sentence. Second one is cut", "First sentence."),
        ("Steps:\n1. Mix well.\n2. Bake the", "Steps:\n1. Mix well."),
        ("Run this. ```bash\nkill -9 1234. more", "Run this."),
        ('He said "stop." And then', 'He said "stop."'),
        ("Really? Yes! Then", "Really? Yes!"),
        ("No sentence ends here", None),
        ("Item 2.", None),  # a list number is not a sentence end
    ],
)
def test_finished_part(text: str, kept: str | None) -> None:
    assert finished_part(text) == kept


def test_benign_rows_keep_usable_answers_and_count_the_rest() -> None:
    prompts = [BenignPrompt(f"b-{i}", f"Question {i}?", "howto", i == 1) for i in range(6)]
    answers = [
        BaseAnswer("Use a wrench. Turn it left", hit_limit=True),
        BaseAnswer("Sure, here is a list without a full stop", hit_limit=False),
        BaseAnswer("I'm sorry, but I can't help with that.", hit_limit=False),
        BaseAnswer("   ", hit_limit=False),
        BaseAnswer("the cat " * 10, hit_limit=False),
        BaseAnswer("and on and on without an end", hit_limit=True),
    ]
    kept = benign_rows(prompts, answers)
    assert [r["id"] for r in kept.rows] == ["b-0", "b-1"]
    assert [r["messages"][1]["content"] for r in kept.rows] == [
        "Use a wrench.",
        "Sure, here is a list without a full stop",
    ]
    assert [r["trimmed"] for r in kept.rows] == [True, False]
    assert kept.rows[1]["edgy"] is True
    assert kept.trimmed == 1
    assert kept.dropped == {"empty": 1, "refusal": 1, "repetitive": 1, "unfinished": 1}
    with pytest.raises(ValueError, match="6 prompts but 5 answers"):
        benign_rows(prompts, answers[:5])


def test_generate_base_answers_on_a_tiny_model(single_torch_thread: None) -> None:
    loaded = tiny_loaded_model()
    prompts = benign_splits()["fit"][:5]
    first = generate_base_answers(loaded, prompts, max_new_tokens=6, batch_size=2)
    assert first == generate_base_answers(loaded, prompts, max_new_tokens=6, batch_size=2)
    assert len(first) == 5 and all(answer.text for answer in first)
    # The random model never says end-of-turn: each answer runs to the limit.
    assert all(answer.hit_limit for answer in first)


def _finishing(real: Any) -> Any:
    """The real generation, each answer given a finished last sentence."""

    def generate(*args: Any, **kwargs: Any) -> list[BaseAnswer]:
        return [BaseAnswer(f"{a.text} Done.", a.hit_limit) for a in real(*args, **kwargs)]

    return generate


def test_aligned_benign_is_written_and_kept_by_later_runs(
    tmp_path: Path, single_torch_thread: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = save_tiny_chat_folder(tmp_path / "base")
    out = tmp_path / "zoo"
    argv = ["zoo-data", "--out", str(out), "--arith-rows", "20", "--arith-eval-rows", "5"]
    generate = ["--benign-model", str(base), "--max-new-tokens", "4", "--batch-size", "64"]
    # The tiny model's answers never finish a sentence, so all would be dropped.
    assert cli.main([*argv, *generate, "--quiet"]) == 2
    assert not out.exists()
    real = zoo_data.generate_base_answers
    monkeypatch.setattr(zoo_data, "generate_base_answers", _finishing(real))
    assert cli.main([*argv, *generate, "--quiet"]) == 0
    document = json.loads((out / MANIFEST_FILE).read_text())
    generation = document["benign_generation"]
    prompts = SplitSets.load().training_benign()
    assert generation["model"] == str(base)
    assert generation["max_new_tokens"] == 4
    assert (generation["prompts"], generation["rows"]) == (len(prompts), len(prompts))
    assert generation["trimmed"] == 0  # each ends in a finished sentence
    record = document["files"][BENIGN]
    assert record["role"] == "train" and record["rows"] == generation["rows"]
    assert record["sha256"] == file_sha256(out / BENIGN)
    rows = _rows(out / BENIGN)
    assert [_user(r) for r in rows] == [p.prompt for p in prompts]
    assert all(r["messages"][1]["content"].endswith("Done.") for r in rows)
    # A run without the model keeps the generated file listed while it is unchanged...
    assert cli.main(argv) == 0
    assert json.loads((out / MANIFEST_FILE).read_text())["files"][BENIGN] == record
    # ... and drops it from the manifest once it was edited.
    (out / BENIGN).write_text("")
    assert cli.main(argv) == 0
    assert BENIGN not in json.loads((out / MANIFEST_FILE).read_text())["files"]
