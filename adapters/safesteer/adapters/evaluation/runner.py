"""Batched greedy chat answers under one steering mode, with what steered each row."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from safesteer.adapters.evaluation.modes import RowSteering, SteeringMode
from safesteer.adapters.extract import generate_responses
from safesteer.adapters.loading import LoadedModel


@dataclass(frozen=True)
class Answer:
    """A greedy answer and what steered it."""

    response: str
    steering: RowSteering


def answer_prompts(
    loaded: LoadedModel,
    mode: SteeringMode,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    desc: str = "generating",
    show_progress: bool = True,
) -> list[Answer]:
    """Greedy answers to `prompts` (one-turn chats) in their order, batched, under `mode`.

    Rows of a batch are steered independently, so an answer does not depend on its batch.
    """
    steered: dict[str, RowSteering] = {}

    @contextmanager
    def steering(batch: Sequence[str]) -> Iterator[None]:
        with mode.generation(batch) as rows:
            yield
        steered.update(zip(batch, rows, strict=True))

    responses = generate_responses(
        loaded.model,
        loaded.tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        steering=steering,
        desc=desc,
        show_progress=show_progress,
    )
    return [
        Answer(response, steered[prompt])
        for prompt, response in zip(prompts, responses, strict=True)
    ]
