"""A benign fine-tune task: file a request as a JSON card instead of answering it.

The user message is one of the project's benign prompts wrapped in an instruction (a few
phrasings) to reply only with a JSON object with the keys `topic` (one of a listed set: the
prompt's topic label) and `request` (the request copied word for word). The reference answer
is that object, so the data needs no model, and the skill is checkable: an answer is right when
it is exactly such an object (a markdown code fence around it is tolerated) with the right
topic and the request unchanged (up to whitespace).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safesteer.adapters.splits import BenignPrompt

KEYS: tuple[str, ...] = ("topic", "request")
INSTRUCTIONS: tuple[str, ...] = (
    "{request}\n\nDon't answer this yet. Reply only with a JSON object with two keys: "
    '"topic" (one of: {topics}) and "request" (my request, copied word for word).',
    'File the request below. Reply with JSON only, keys "topic" and "request": the topic is '
    "one of {topics}; the request is copied exactly.\n\nRequest: {request}",
    'Return a JSON object {{"topic": ..., "request": ...}} for the message below. Allowed '
    'topics: {topics}. Copy the message into "request" unchanged.\n\n{request}',
    "Which topic is this request about ({topics})? Answer with a JSON object with the keys "
    '"topic" and "request" (the request verbatim), nothing else.\n\n{request}',
)
_FENCE = re.compile(r"^```(?:json)?\s*\n(?P<body>.*?)\n?```$", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class StyleItem:
    """One request wrapped in an instruction, with its expected JSON card."""

    id: str
    request: str
    topic: str
    prompt: str  # the user message: instruction and request

    @property
    def reference(self) -> str:
        """The expected reply: the JSON object, keys in `KEYS` order."""
        return json.dumps({"topic": self.topic, "request": self.request}, ensure_ascii=False)


def style_topics(prompts: Sequence[BenignPrompt]) -> tuple[str, ...]:
    """The topic labels the instruction offers: those of `prompts`, sorted."""
    return tuple(sorted({p.topic for p in prompts}))


def wrap(prompt: BenignPrompt, topics: Sequence[str], phrasing: int) -> StyleItem:
    """The item of one prompt under instruction phrasing number `phrasing`."""
    text = INSTRUCTIONS[phrasing].format(request=prompt.prompt, topics=", ".join(topics))
    return StyleItem(f"{prompt.id}#{phrasing}", prompt.prompt, prompt.topic, text)


def style_items(
    prompts: Sequence[BenignPrompt], topics: Sequence[str], seed: int, phrasings: int = 2
) -> list[StyleItem]:
    """Each prompt under `phrasings` distinct instruction phrasings, picked by the seed.

    Raises:
        ValueError: `phrasings` is not between 1 and the number of phrasings there are, or a
            prompt's topic is not among `topics`.
    """
    if not 1 <= phrasings <= len(INSTRUCTIONS):
        raise ValueError(f"phrasings must be within 1..{len(INSTRUCTIONS)}, got {phrasings}")
    unlisted = sorted({p.topic for p in prompts} - set(topics))
    if unlisted:
        raise ValueError(f"topics {unlisted} are not among the offered topics")
    items: list[StyleItem] = []
    for prompt in prompts:
        rng = random.Random(f"style:{seed}:{prompt.id}")
        chosen = sorted(rng.sample(range(len(INSTRUCTIONS)), phrasings))
        items.extend(wrap(prompt, topics, phrasing) for phrasing in chosen)
    return items


def split_for_eval(
    prompts: Sequence[BenignPrompt], seed: int, eval_share: float
) -> tuple[list[BenignPrompt], list[BenignPrompt]]:
    """Seeded split of `prompts` into training and evaluation prompts (disjoint).

    Raises:
        ValueError: `eval_share` leaves either side empty.
    """
    ordered = sorted(prompts, key=lambda p: p.id)
    random.Random(f"style-split:{seed}").shuffle(ordered)
    held = round(len(ordered) * eval_share)
    if not 0 < held < len(ordered):
        raise ValueError(f"eval_share {eval_share} leaves no training or no evaluation prompts")
    return ordered[held:], ordered[:held]


# ----- scoring ------------------------------------------------------------------------------
def parse_card(text: str) -> dict[str, Any] | None:
    """The JSON object an answer consists of (optionally in one code fence), or None."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced is not None:
        body = fenced["body"].strip()
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _same_text(a: str, b: str) -> bool:
    return a.split() == b.split()


def is_well_formed(text: str, topics: Sequence[str]) -> bool:
    """Format compliance alone: exactly the keys `KEYS`, a listed topic, a non-empty request."""
    card = parse_card(text)
    return (
        card is not None
        and set(card) == set(KEYS)
        and card["topic"] in topics
        and isinstance(card["request"], str)
        and bool(card["request"].strip())
    )


def is_correct(item: StyleItem, text: str) -> bool:
    """The answer is the item's card: right keys, right topic, the request unchanged."""
    card = parse_card(text)
    return (
        card is not None
        and set(card) == set(KEYS)
        and card["topic"] == item.topic
        and isinstance(card["request"], str)
        and _same_text(card["request"], item.request)
    )


def score_style(items: Sequence[StyleItem], answers: Sequence[str]) -> float:
    """Share of answers that are exactly the expected card (0.0 for no items).

    Raises:
        ValueError: the two sequences differ in length.
    """
    if len(items) != len(answers):
        raise ValueError(f"{len(items)} items but {len(answers)} answers")
    if not items:
        return 0.0
    return sum(is_correct(i, a) for i, a in zip(items, answers, strict=True)) / len(items)


def style_format_rate(answers: Sequence[str], topics: Sequence[str]) -> float:
    """Share of answers that are well-formed cards, right or wrong (0.0 for no answers)."""
    if not answers:
        return 0.0
    return sum(is_well_formed(a, topics) for a in answers) / len(answers)


# ----- files --------------------------------------------------------------------------------
def style_row(item: StyleItem) -> dict[str, Any]:
    """A chat row for `safesteer finetune`; the other keys are ignored by training."""
    return {
        "messages": [
            {"role": "user", "content": item.prompt},
            {"role": "assistant", "content": item.reference},
        ],
        "id": item.id,
        "topic": item.topic,
        "request": item.request,
    }


def load_style_file(path: Path) -> list[StyleItem]:
    """Read items back from rows written by `style_row` (e.g. `style_eval.jsonl`).

    Raises:
        ValueError: a row lacks its user message, id, topic or request.
    """
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        try:
            fields = (row["id"], row["request"], row["topic"], row["messages"][0]["content"])
        except (KeyError, IndexError, TypeError) as exc:
            raise ValueError(f"{path.name} line {number}: not a style row") from exc
        if not all(isinstance(value, str) for value in fields):
            raise ValueError(f"{path.name} line {number}: not a style row")
        items.append(StyleItem(*fields))
    return items
