"""Utility under steering: multiple-choice accuracy by answer log-likelihood, and perplexity.

A question is one chat turn; each choice is scored as the assistant's answer: the sum of its
tokens' log-probabilities after the prompt. The chosen answer has the highest sum (`acc`);
`acc_norm` divides by the number of characters instead (long answers are not penalised).
Perplexity is `exp(total NLL / total tokens)` of reference answers after their prompts.
Rows are left-padded with explicit positions, so a row scores the same in any batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from safesteer.adapters.evaluation.benchmarks import Question, Reference
from safesteer.adapters.evaluation.modes import RowSteering, SteeringMode
from safesteer.adapters.extract import chat_prompt_ids
from safesteer.adapters.loading import LoadedModel
from safesteer.adapters.padding import left_pad


@dataclass(frozen=True)
class Continuation:
    """Log-likelihood of one answer after its prompt, and what steered the row."""

    logprob: float
    tokens: int
    steering: RowSteering


@dataclass(frozen=True)
class QuestionScore:
    """The choices one mode picks for a question, by sum and by per-character log-likelihood."""

    id: str
    answer: int
    chosen: int
    chosen_norm: int
    steering: RowSteering

    @property
    def correct(self) -> bool:
        return self.chosen == self.answer


@torch.inference_mode()
def continuation_logprobs(
    loaded: LoadedModel,
    mode: SteeringMode,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int,
    desc: str = "scoring",
    show_progress: bool = True,
) -> list[Continuation]:
    """Sum of log-probabilities of each answer's tokens after its chat prompt, under `mode`.

    Raises:
        ValueError: an answer has no tokens.
    """
    tokenizer = loaded.tokenizer
    rows: list[tuple[list[int], int]] = []
    for prompt, answer in zip(prompts, answers, strict=True):
        answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
        if not answer_ids:
            raise ValueError(f"empty answer for prompt {prompt[:60]!r}")
        rows.append((chat_prompt_ids(tokenizer, prompt) + answer_ids, len(answer_ids)))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    results: dict[int, Continuation] = {}
    pad = int(tokenizer.pad_token_id or 0)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, disable=not show_progress):
        indices = order[start : start + batch_size]
        # The pad id is masked out, so any id will do.
        input_ids, attention = left_pad([rows[i][0] for i in indices], pad)
        positions = (attention.cumsum(dim=-1) - 1).clamp(min=0)
        keep = max(rows[i][1] for i in indices) + 1
        with mode.scoring([prompts[i] for i in indices]) as steered:
            logits = loaded.model(
                input_ids=input_ids,
                attention_mask=attention,
                position_ids=positions,
                use_cache=False,
                logits_to_keep=keep,
            ).logits
        # logits[:, j] predicts token (width - keep + j + 1); answers end at the right edge.
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        targets = input_ids[:, input_ids.shape[1] - keep + 1 :]
        token_logprobs = logprobs.gather(-1, targets[..., None])[..., 0]
        for row, index in enumerate(indices):
            length = rows[index][1]
            total = float(token_logprobs[row, keep - 1 - length :].sum())
            results[index] = Continuation(total, length, steered[row])
    return [results[i] for i in range(len(rows))]


def score_questions(
    loaded: LoadedModel,
    mode: SteeringMode,
    questions: Sequence[Question],
    *,
    batch_size: int,
    desc: str = "questions",
    show_progress: bool = True,
) -> list[QuestionScore]:
    """Pick each question's choice with the highest answer log-likelihood under `mode`."""
    prompts = [q.question for q in questions for _ in q.choices]
    answers = [choice for q in questions for choice in q.choices]
    scored = continuation_logprobs(
        loaded,
        mode,
        prompts,
        answers,
        batch_size=batch_size,
        desc=desc,
        show_progress=show_progress,
    )
    results: list[QuestionScore] = []
    start = 0
    for question in questions:
        chunk = scored[start : start + len(question.choices)]
        start += len(question.choices)
        sums = [c.logprob for c in chunk]
        per_char = [
            c.logprob / max(1, len(text)) for c, text in zip(chunk, question.choices, strict=True)
        ]
        results.append(
            QuestionScore(
                id=question.id,
                answer=question.answer,
                chosen=max(range(len(sums)), key=sums.__getitem__),
                chosen_norm=max(range(len(per_char)), key=per_char.__getitem__),
                steering=chunk[0].steering,
            )
        )
    return results


@dataclass(frozen=True)
class Perplexity:
    """Perplexity of reference answers under one mode."""

    nll: float
    tokens: int
    texts: int
    steered_texts: int

    @property
    def value(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else math.nan


def reference_perplexity(
    loaded: LoadedModel,
    mode: SteeringMode,
    references: Sequence[Reference],
    *,
    batch_size: int,
    desc: str = "perplexity",
    show_progress: bool = True,
) -> Perplexity:
    """Perplexity of the reference answers after their prompts under `mode`."""
    scored = continuation_logprobs(
        loaded,
        mode,
        [r.prompt for r in references],
        [r.answer for r in references],
        batch_size=batch_size,
        desc=desc,
        show_progress=show_progress,
    )
    return Perplexity(
        nll=-sum(c.logprob for c in scored),
        tokens=sum(c.tokens for c in scored),
        texts=len(scored),
        steered_texts=sum(1 for c in scored if c.steering.steered),
    )
