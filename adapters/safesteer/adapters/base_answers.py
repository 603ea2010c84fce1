"""Helpful answers for the aligned fine-tune, written by the base model itself.

Each benign prompt is answered greedily (batched, left-padded; `extract.generate_responses`).
An answer that ran into the token limit is cut back to its last finished sentence (an unclosed
code block is dropped first), so the fine-tune does not learn to stop mid-sentence. Answers
that come out empty, refuse (keyword judge), degenerate into repetition or have no finished
sentence are left out, and counted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from safesteer.adapters.extract import generate_responses, is_repetitive
from safesteer.adapters.judge import is_refusal
from safesteer.adapters.loading import LoadedModel
from safesteer.adapters.splits import BenignPrompt

DEFAULT_MAX_NEW_TOKENS = 96
DEFAULT_BATCH_SIZE = 8
# Decoding and re-encoding an answer can change its token count by a few tokens; an answer
# this close to the limit is treated as cut off.
LIMIT_SLACK = 3
DROP_REASONS: tuple[str, ...] = ("empty", "refusal", "repetitive", "unfinished")
# A sentence end: . ! or ? (not after a digit, which would be a list number like "2."),
# optionally followed by closing quotes or brackets, then whitespace or the end.
_SENTENCE_END = re.compile(r"(?<!\d)[.!?][\"')\]]*(?=\s|$)")
_FENCE = "```"


@dataclass(frozen=True)
class BaseAnswer:
    """A generated answer and whether generation stopped at the token limit."""

    text: str
    hit_limit: bool


@dataclass(frozen=True)
class BenignRows:
    """Chat rows kept, and how many prompts were left out per reason in `DROP_REASONS`."""

    rows: list[dict[str, Any]]
    dropped: dict[str, int]
    trimmed: int


def finished_part(text: str) -> str | None:
    """`text` up to its last finished sentence, without an unclosed code block; None if none."""
    if text.count(_FENCE) % 2:
        text = text[: text.rfind(_FENCE)]
    ends = list(_SENTENCE_END.finditer(text))
    return text[: ends[-1].end()].strip() if ends else None


def generate_base_answers(
    loaded: LoadedModel,
    prompts: Sequence[BenignPrompt],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    show_progress: bool = True,
) -> list[BaseAnswer]:
    """Greedy answers of `loaded` to `prompts`, in order, each flagged if it hit the limit."""
    texts = generate_responses(
        loaded.model,
        loaded.tokenizer,
        [p.prompt for p in prompts],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        desc="aligned_benign",
        show_progress=show_progress,
    )
    return [
        BaseAnswer(text, _token_count(loaded.tokenizer, text) >= max_new_tokens - LIMIT_SLACK)
        for text in texts
    ]


def _token_count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _usable(answer: BaseAnswer) -> tuple[str | None, str | None]:
    """(text to keep, None) or (None, the reason it is dropped)."""
    text: str | None = answer.text.strip()
    if answer.hit_limit and text:
        text = finished_part(text)
        if text is None:
            return None, "unfinished"
    if not text:
        return None, "empty"
    if is_refusal(text):
        return None, "refusal"
    if is_repetitive(text):
        return None, "repetitive"
    return text, None


def benign_rows(prompts: Sequence[BenignPrompt], answers: Sequence[BaseAnswer]) -> BenignRows:
    """Chat rows of the usable answers (`id`, `topic`, `edgy`, `trimmed` ride along).

    Raises:
        ValueError: the two sequences differ in length.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    rows: list[dict[str, Any]] = []
    dropped = dict.fromkeys(DROP_REASONS, 0)
    trimmed = 0
    for prompt, answer in zip(prompts, answers, strict=True):
        text, reason = _usable(answer)
        if text is None:
            dropped[str(reason)] += 1
            continue
        cut = text != answer.text.strip()
        trimmed += cut
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": prompt.prompt},
                    {"role": "assistant", "content": text},
                ],
                "id": prompt.id,
                "topic": prompt.topic,
                "edgy": prompt.edgy,
                "trimmed": cut,
            }
        )
    return BenignRows(rows, dropped, trimmed)
