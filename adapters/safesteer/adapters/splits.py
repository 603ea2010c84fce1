"""Fixed, seeded fit / dev / test splits of the harmful and benign prompt sets.

Splits are drawn per group (harmful: per category, with the project's short prompts of a
category, `data/short_harmful_prompts.jsonl`, in a group of their own, `<category>/short`, and
those of the second batch, `data/short_harmful_prompts_2.jsonl`, in `<category>/short-2`;
benign: per category for the edgy prompts, one `general` group for the rest). A group's
prompts are ranked by sha256 of (seed, prompt id), and the first 50% of the ranking is `fit`,
the next 20% `dev`, the rest `test` (`SPLIT_FRACTIONS`, largest remainder; a group of three
or more gets at least one prompt in each split). The split of a prompt thus depends only on the
seed and the ids of its group, not on file order or the Python run; adding a prompt to a group
moves at most the prompts next to a split boundary of that group, which `split_digest` makes
visible. Their own groups keep the short prompts from moving any vendored prompt: the vendored
ones split exactly as they would without them, each category's 15 short prompts split
8 / 3 / 4 by themselves, and the second batch's 12 split 6 / 2 / 4 without moving the first.

Ids are drawn apart, so two near-copies from different sources can land in different splits
("Write a guide on how to commit insider trading" in fit, "Guide on how to commit insider
trading" in dev). A fit prompt that *overlaps* a dev or test prompt (one contains the other as
whole words after `normalize_prompt`, `HeldOut`) is dropped from fit: nothing fitted ever saw
a copy of a prompt it is measured on. Dev and test are never trimmed.

The benign prompts (`data/benign_prompts.jsonl`) are written by the project; the edgy ones
borrow the vocabulary of a harm category ("how do I kill a Python process") and are tagged
with it. `load_harmful_file` / `load_benign_file` read external prompt files (JSONL rows
`{"prompt": str, "category": str | null}`) into the same types, e.g. for evaluation sets.

`python -m safesteer.adapters.splits` prints the split sizes per category.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from safesteer.adapters.categories import CATEGORIES
from safesteer.adapters.prompts import (
    DATA_DIR,
    SHORT_PROMPTS_FILE,
    SHORT_PROMPTS_FILE_2,
    HarmfulPrompt,
    load_harmful_prompts,
)

Split = Literal["fit", "dev", "test"]
SPLITS: tuple[Split, ...] = ("fit", "dev", "test")
SPLIT_FRACTIONS: Mapping[Split, float] = {"fit": 0.5, "dev": 0.2, "test": 0.3}
DEFAULT_SEED = 20240611
# Groups this large get at least one prompt in every split.
MIN_GROUP_FOR_ALL_SPLITS = 3
# Suffix of the split group of a category's short prompts (`violence/short`), per batch file.
SHORT_GROUP_SUFFIX = "/short"
SHORT_GROUP_SUFFIXES: Mapping[str, str] = {
    SHORT_PROMPTS_FILE: SHORT_GROUP_SUFFIX,
    SHORT_PROMPTS_FILE_2: SHORT_GROUP_SUFFIX + "-2",
}
# The group of benign prompts that are not edgy.
GENERAL = "general"
BENIGN_PROMPTS_FILE = "benign_prompts.jsonl"
# Evaluation sets that must never be vendored or used for fitting, with a pattern that
# recognises their file names.
RESERVED_SETS: Mapping[str, re.Pattern[str]] = {
    "XSTest": re.compile(r"xs[\W_]*test", re.IGNORECASE),
    "StrongREJECT": re.compile(r"strong[\W_]*reject", re.IGNORECASE),
    "HarmBench test split": re.compile(r"harm[\W_]*bench.*test", re.IGNORECASE),
}


class _Identified(Protocol):
    @property
    def id(self) -> str: ...


_T = TypeVar("_T", bound=_Identified)


@dataclass(frozen=True)
class BenignPrompt:
    """A harmless request; `category` names the harm vocabulary an edgy prompt borrows."""

    id: str
    prompt: str
    topic: str
    edgy: bool
    category: str | None = None

    @property
    def group(self) -> str:
        """The split group: the category of an edgy prompt, `general` otherwise."""
        return self.category if self.category is not None else GENERAL


def normalize_prompt(text: str) -> str:
    """Lower-cased words without punctuation: two prompts are the same if these are equal."""
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split())


def reserved_set_of(name: str) -> str | None:
    """The reserved evaluation set a file name belongs to, or None."""
    return next((label for label, rx in RESERVED_SETS.items() if rx.search(name)), None)


# ----- split assignment ------------------------------------------------------------------
def split_position(prompt_id: str, seed: int = DEFAULT_SEED) -> float:
    """Where a prompt falls in [0, 1): the first 8 bytes of sha256(seed, id)."""
    digest = hashlib.sha256(f"{seed}\x00{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_sizes(n: int) -> dict[Split, int]:
    """How many of a group's `n` prompts go to each split.

    Largest remainder on `SPLIT_FRACTIONS`; a group of `MIN_GROUP_FOR_ALL_SPLITS` or more then
    gives each empty split one prompt from the largest split.
    """
    exact = {s: n * SPLIT_FRACTIONS[s] for s in SPLITS}
    sizes = {s: int(exact[s]) for s in SPLITS}
    by_remainder = sorted(SPLITS, key=lambda s: exact[s] - sizes[s], reverse=True)
    for split in by_remainder[: n - sum(sizes.values())]:
        sizes[split] += 1
    if n >= MIN_GROUP_FOR_ALL_SPLITS:
        for split in SPLITS:
            if sizes[split] == 0:
                sizes[max(SPLITS, key=lambda s: sizes[s])] -= 1
                sizes[split] = 1
    return sizes


def _assign_group(ids: Sequence[str], seed: int) -> dict[str, Split]:
    ranked = sorted(ids, key=lambda prompt_id: (split_position(prompt_id, seed), prompt_id))
    assigned: dict[str, Split] = {}
    start = 0
    for split, size in split_sizes(len(ranked)).items():
        assigned.update((prompt_id, split) for prompt_id in ranked[start : start + size])
        start += size
    return assigned


def assign_splits(
    items: Sequence[_T], group_of: Callable[[_T], str], seed: int = DEFAULT_SEED
) -> dict[str, Split]:
    """Map each item's id to its split, drawn per group (see the module docstring).

    Raises:
        ValueError: two items share an id.
    """
    groups: dict[str, list[str]] = {}
    seen: set[str] = set()
    for item in items:
        prompt_id = item.id
        if prompt_id in seen:
            raise ValueError(f"duplicate prompt id {prompt_id!r}")
        seen.add(prompt_id)
        groups.setdefault(group_of(item), []).append(prompt_id)
    assigned: dict[str, Split] = {}
    for ids in groups.values():
        assigned.update(_assign_group(ids, seed))
    return assigned


def _partition(items: Sequence[_T], splits: Mapping[str, Split]) -> dict[Split, list[_T]]:
    parts: dict[Split, list[_T]] = {split: [] for split in SPLITS}
    for item in items:
        parts[splits[item.id]].append(item)
    return parts


def _padded(text: str) -> str:
    # Spaces on both sides make `in` match whole words only.
    return f" {normalize_prompt(text)} "


class HeldOut:
    """Normalised texts of held-out prompts, to find near-copies of them."""

    def __init__(self, texts: Iterable[str]) -> None:
        self._texts = tuple(sorted({_padded(text) for text in texts}))

    def __len__(self) -> int:
        return len(self._texts)

    def overlaps(self, text: str) -> bool:
        """Whether `text` contains a held-out prompt, or a held-out prompt contains it."""
        padded = _padded(text)
        return any(held in padded or padded in held for held in self._texts)


class _Prompted(Protocol):
    @property
    def prompt(self) -> str: ...


_P = TypeVar("_P", bound=_Prompted)


def _fit_without_copies(parts: dict[Split, list[_P]]) -> dict[Split, list[_P]]:
    heldout = HeldOut([p.prompt for split in ("dev", "test") for p in parts[split]])
    parts["fit"] = [p for p in parts["fit"] if not heldout.overlaps(p.prompt)]
    return parts


def split_digest(parts: Mapping[Split, Sequence[_Identified]]) -> str:
    """sha256 of the sorted (id, split) pairs: equal digests mean identical splits."""
    pairs = sorted(
        f"{prompt.id}\t{split}" for split, prompts in parts.items() for prompt in prompts
    )
    return hashlib.sha256("\n".join(pairs).encode()).hexdigest()


def harmful_splits(seed: int = DEFAULT_SEED) -> dict[Split, list[HarmfulPrompt]]:
    """The harmful prompts by split, each split in `load_harmful_prompts` order."""
    prompts = load_harmful_prompts()
    return _fit_without_copies(_partition(prompts, assign_splits(prompts, _harmful_group, seed)))


def harmful_split(split: Split, seed: int = DEFAULT_SEED) -> list[HarmfulPrompt]:
    """The harmful prompts of one split."""
    return harmful_splits(seed)[split]


def benign_splits(seed: int = DEFAULT_SEED) -> dict[Split, list[BenignPrompt]]:
    """The project's benign prompts by split, each split in file order."""
    prompts = load_benign_prompts()
    return _fit_without_copies(_partition(prompts, assign_splits(prompts, _benign_group, seed)))


def benign_split(
    split: Split, edgy: bool | None = None, seed: int = DEFAULT_SEED
) -> list[BenignPrompt]:
    """The benign prompts of one split: all of them, or only the edgy or only the plain ones."""
    return [p for p in benign_splits(seed)[split] if edgy is None or p.edgy == edgy]


def _harmful_group(prompt: HarmfulPrompt) -> str:
    """The category; the project's short prompts form a group of their own per category."""
    return prompt.category + SHORT_GROUP_SUFFIXES.get(prompt.source, "")


def _harmful_category(prompt: HarmfulPrompt) -> str:
    return prompt.category


def _benign_group(prompt: BenignPrompt) -> str:
    return prompt.group


# ----- reading prompt files ----------------------------------------------------------------
def _jsonl_objects(path: Path) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """Yield (line number, `<file> line <n>`, row) for each non-blank line of a JSONL file."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield number, where, row


def _text(row: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = row.get(key, default)
    if value is None:
        raise ValueError(f"{where}: missing {key!r}")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {key!r} must be a non-empty string")
    return value.strip()


def _row_id(row: Mapping[str, Any], where: str, default: str) -> str:
    value = row.get("id")
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _text(row, "id", where)


def _category(row: Mapping[str, Any], where: str) -> str | None:
    value = row.get("category")
    if value is None:
        return None
    if not isinstance(value, str) or value not in CATEGORIES:
        known = ", ".join(CATEGORIES)
        raise ValueError(f"{where}: unknown category {value!r} (known: {known})")
    return value


class _UniqueCheck:
    """Rejects a second row with the same id or the same normalised prompt text."""

    def __init__(self) -> None:
        self._ids: dict[str, str] = {}
        self._texts: dict[str, str] = {}

    def add(self, prompt_id: str, prompt: str, where: str) -> None:
        text = normalize_prompt(prompt)
        if prompt_id in self._ids:
            raise ValueError(
                f"{where}: duplicate id {prompt_id!r}, first at {self._ids[prompt_id]}"
            )
        if text in self._texts:
            raise ValueError(f"{where}: duplicate prompt, first at {self._texts[text]}")
        self._ids[prompt_id] = self._texts[text] = where


def load_benign_prompts(data_dir: Path = DATA_DIR) -> list[BenignPrompt]:
    """The project's benign prompts, validated.

    Raises:
        ValueError: a row is malformed, repeats an id or a prompt, or its `edgy` flag and
            category disagree (names the line).
    """
    prompts: list[BenignPrompt] = []
    unique = _UniqueCheck()
    for _, where, row in _jsonl_objects(data_dir / BENIGN_PROMPTS_FILE):
        prompt_id, prompt = _text(row, "id", where), _text(row, "prompt", where)
        category, edgy = _category(row, where), row.get("edgy")
        if not isinstance(edgy, bool) or edgy != (category is not None):
            raise ValueError(f"{where}: 'edgy' must be true exactly when a category is set")
        unique.add(prompt_id, prompt, where)
        prompts.append(BenignPrompt(prompt_id, prompt, _text(row, "topic", where), edgy, category))
    return prompts


def load_benign_file(path: Path, topic: str = "external") -> list[BenignPrompt]:
    """Read harmless prompts from a JSONL file.

    Rows: `{"prompt": str, "category"?: str | null, "edgy"?: bool, "id"?: str | int,
    "topic"?: str}`. `edgy` defaults to whether a category is given; ids default to
    `<file stem>:<line>`.

    Raises:
        ValueError: a line is not a JSON object, lacks a prompt, names an unknown category,
            has a non-boolean `edgy`, or repeats an id or a prompt (the message names the line).
    """
    prompts: list[BenignPrompt] = []
    unique = _UniqueCheck()
    for number, where, row in _jsonl_objects(path):
        prompt_id = _row_id(row, where, f"{path.stem}:{number}")
        prompt, category = _text(row, "prompt", where), _category(row, where)
        edgy = row.get("edgy", category is not None)
        if not isinstance(edgy, bool):
            raise ValueError(f"{where}: 'edgy' must be true or false, got {edgy!r}")
        unique.add(prompt_id, prompt, where)
        row_topic = _text(row, "topic", where, default=topic)
        prompts.append(BenignPrompt(prompt_id, prompt, row_topic, edgy, category))
    return prompts


def load_harmful_file(path: Path, default_category: str | None = None) -> list[HarmfulPrompt]:
    """Read harmful prompts from a JSONL file of `{"prompt", "category"?, "id"?: str | int}`.

    Rows without a category take `default_category`. Ids default to `<file stem>:<line>`.

    Raises:
        ValueError: a line is not a JSON object, lacks a prompt, names an unknown category,
            has no category and there is no default, carries `edgy`, or repeats an id or a
            prompt (the message names the line); `default_category` is unknown.
    """
    if default_category is not None and default_category not in CATEGORIES:
        raise ValueError(f"unknown default category {default_category!r}")
    prompts: list[HarmfulPrompt] = []
    unique = _UniqueCheck()
    for number, where, row in _jsonl_objects(path):
        prompt_id = _row_id(row, where, f"{path.stem}:{number}")
        prompt = _text(row, "prompt", where)
        if "edgy" in row:
            raise ValueError(f"{where}: 'edgy' marks safe prompts; a harmful file has none")
        category = _category(row, where) or default_category
        if category is None:
            raise ValueError(f"{where}: missing 'category' and no default category given")
        unique.add(prompt_id, prompt, where)
        label = str(row.get("category") or "")
        prompts.append(HarmfulPrompt(prompt_id, category, prompt, path.name, label))
    return prompts


# ----- report ------------------------------------------------------------------------------
def _counts(
    parts: Mapping[Split, Sequence[_T]], group_of: Callable[[_T], str], group: str
) -> list[int]:
    return [sum(1 for p in parts[s] if group_of(p) == group) for s in SPLITS]


def _cells(counts: Sequence[int] | None) -> str:
    """Right-aligned counts per split and their sum; dashes for no counts."""
    if counts is None:
        return "".join(f"{'-':>5}" for _ in SPLITS) + f"{'-':>6}"
    return "".join(f"{n:>5}" for n in counts) + f"{sum(counts):>6}"


def format_split_table(
    harmful: Mapping[Split, Sequence[HarmfulPrompt]], benign: Mapping[Split, Sequence[BenignPrompt]]
) -> str:
    """A plain-text table: per group, harmful and benign prompts in each split, and totals.

    A category's harmful row counts all its prompts, the short ones included.
    """
    names = "".join(f"{s:>5}" for s in SPLITS) + f"{'all':>6}"
    width = len(names)
    lines = [
        f"{'':<15}{'harmful':^{width}}  {'benign':^{width}}".rstrip(),
        f"{'group':<15}{names}  {names}",
    ]
    for group in (*CATEGORIES, GENERAL):
        left = None if group == GENERAL else _counts(harmful, _harmful_category, group)
        right = _counts(benign, _benign_group, group)
        lines.append(f"{group:<15}{_cells(left)}  {_cells(right)}")
    totals = [len(harmful[s]) for s in SPLITS], [len(benign[s]) for s in SPLITS]
    lines.append(f"{'total':<15}{_cells(totals[0])}  {_cells(totals[1])}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the split sizes per category (benign rows per category are the edgy prompts)."""
    del argv
    harmful, benign = harmful_splits(), benign_splits()
    print(f"seed {DEFAULT_SEED}, fractions {dict(SPLIT_FRACTIONS)}")
    print(format_split_table(harmful, benign))
    print(f"digests: harmful {split_digest(harmful)[:12]}, benign {split_digest(benign)[:12]}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
