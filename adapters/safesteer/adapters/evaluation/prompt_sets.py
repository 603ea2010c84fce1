"""The prompts an evaluation asks: the project's test split or the user's own JSONL files.

External files are read by `safesteer.adapters.splits` (rows `{"prompt": ..., "category":
optional, "id": optional}`; a benign row with a category is an edgy one, borrowing that
category's words; a harmful row needs a category or a default one).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from safesteer.adapters.prompts import HarmfulPrompt
from safesteer.adapters.splits import (
    BenignPrompt,
    Split,
    benign_split,
    harmful_split,
    load_benign_file,
    load_harmful_file,
)

HARMFUL = "harmful"
BENIGN = "benign"
PROJECT_SPLIT: Split = "test"


class PromptFileError(ValueError):
    """An external prompt file cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt to answer: harmful ones should be refused, benign ones answered."""

    id: str
    kind: str  # HARMFUL or BENIGN
    prompt: str
    category: str | None = None
    edgy: bool = False


@dataclass(frozen=True)
class PromptSet:
    """Prompts of one kind and where they come from (a split or a file)."""

    kind: str
    source: str
    prompts: tuple[EvalPrompt, ...]


def _harmful(prompts: Sequence[HarmfulPrompt], source: str) -> PromptSet:
    rows = tuple(EvalPrompt(p.id, HARMFUL, p.prompt, p.category) for p in prompts)
    return PromptSet(HARMFUL, source, rows)


def _benign(prompts: Sequence[BenignPrompt], source: str) -> PromptSet:
    rows = tuple(EvalPrompt(p.id, BENIGN, p.prompt, p.category, p.edgy) for p in prompts)
    return PromptSet(BENIGN, source, rows)


def project_harmful() -> PromptSet:
    """The vendored harmful prompts of the project's test split."""
    return _harmful(harmful_split(PROJECT_SPLIT), f"project {PROJECT_SPLIT} split (harmful)")


def project_benign() -> PromptSet:
    """The project's own benign prompts (edgy ones included) of its test split."""
    return _benign(benign_split(PROJECT_SPLIT), f"project {PROJECT_SPLIT} split (benign)")


def _checked(path: Path, flag: str) -> Path:
    if not path.is_file():
        raise PromptFileError(f"{flag} {path}: no such file")
    return path


def harmful_file(path: Path, default_category: str | None = None) -> PromptSet:
    """Harmful prompts of an external JSONL file.

    Raises:
        PromptFileError: the file is missing, a row is malformed (names file and line), or a
            row has no category and no default is given.
    """
    try:
        prompts = load_harmful_file(_checked(path, "--harmful"), default_category)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PromptFileError(f"--harmful {path}: {exc}") from exc
    if not prompts:
        raise PromptFileError(f"--harmful {path}: no prompts in the file")
    return _harmful(prompts, str(path))


def benign_file(path: Path) -> PromptSet:
    """Benign prompts of an external JSONL file (rows with a category are edgy).

    Raises:
        PromptFileError: the file is missing or a row is malformed (names file and line).
    """
    try:
        prompts = load_benign_file(_checked(path, "--benign"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise PromptFileError(f"--benign {path}: {exc}") from exc
    if not prompts:
        raise PromptFileError(f"--benign {path}: no prompts in the file")
    return _benign(prompts, str(path))


def limit_prompts(prompt_set: PromptSet, limit: int | None, seed: int) -> PromptSet:
    """At most `limit` prompts, spread over (category, edgy) groups, the same for a seed.

    Each group is shuffled with the seed and the groups are taken round-robin, so a small
    limit still covers every category; the kept prompts stay in their original order.
    """
    if limit is None or limit >= len(prompt_set.prompts):
        return prompt_set
    rng = random.Random(f"{seed}:{prompt_set.kind}")
    groups: dict[tuple[str, bool], list[int]] = {}
    for index, prompt in enumerate(prompt_set.prompts):
        groups.setdefault((prompt.category or "", prompt.edgy), []).append(index)
    queues = [groups[key] for key in sorted(groups)]
    for queue in queues:
        rng.shuffle(queue)
    kept: list[int] = []
    while len(kept) < limit:
        for queue in queues:
            if queue and len(kept) < limit:
                kept.append(queue.pop())
    prompts = tuple(prompt_set.prompts[i] for i in sorted(kept))
    return replace(
        prompt_set, prompts=prompts, source=f"{prompt_set.source}, {limit} by seed {seed}"
    )
