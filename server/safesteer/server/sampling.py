"""Per-row token choice: greedy, or temperature + top-p sampling with a per-request seed."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one row chooses tokens and when it stops."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    min_tokens: int = 0  # end-of-sequence is suppressed before this many tokens

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class RowSampler:
    """Chooses one row's next token; owns the row's random generator."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._generator: torch.Generator | None = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            self._generator = torch.Generator().manual_seed(seed)

    def sample(self, logits: torch.Tensor) -> int:
        """Sample from one row's `[vocab]` logits (only called when not greedy)."""
        assert self._generator is not None
        scaled = logits.to(torch.float32) / self.params.temperature
        probs = torch.softmax(scaled, dim=-1)
        if self.params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            drop = cumulative - sorted_probs >= self.params.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self._generator))
