"""Everything one evaluation produced, row by row, and its `results.json` form.

The summaries (`summaries`, `selectivity`, `utility_scores`) are computed from the rows, so a
results file read back gives the same report; the file also carries them for other readers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safesteer.adapters.evaluation.judging import JudgeInfo
from safesteer.adapters.evaluation.metrics import ModeSummary, Rate, Selectivity, selectivity

FORMAT = 1


def _names(value: Any) -> tuple[str, ...] | None:
    return None if value is None else tuple(str(v) for v in value)


@dataclass(frozen=True)
class EvalRow:
    """One prompt answered under one mode (`disabled`: the category switched off, if any)."""

    prompt_id: str
    kind: str
    category: str | None
    edgy: bool
    mode: str
    prompt: str
    response: str
    refused: bool
    steered: tuple[str, ...] = ()
    fired: tuple[str, ...] | None = None
    disabled: str | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> EvalRow:
        return cls(
            **{**raw, "steered": _names(raw["steered"]) or (), "fired": _names(raw["fired"])}
        )


@dataclass(frozen=True)
class UtilityRow:
    """One multiple-choice question scored under one mode."""

    benchmark: str
    mode: str
    question_id: str
    answer: int
    chosen: int
    chosen_norm: int
    steered: tuple[str, ...] = ()
    fired: tuple[str, ...] | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> UtilityRow:
        return cls(
            **{**raw, "steered": _names(raw["steered"]) or (), "fired": _names(raw["fired"])}
        )


@dataclass(frozen=True)
class PerplexityRow:
    """Perplexity of the reference answers under one mode."""

    mode: str
    nll: float
    tokens: int
    texts: int
    steered_texts: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else math.nan


@dataclass(frozen=True)
class UtilityScore:
    """Accuracy of one mode on one benchmark, by summed and by per-character log-likelihood."""

    benchmark: str
    mode: str
    acc: Rate
    acc_norm: Rate
    steered: int


@dataclass(frozen=True)
class RunInfo:
    """How the run was made: the command, the model, the adapter, the data, the settings."""

    command: str
    model: str
    model_source: str
    fingerprint: str
    adapter_id: str | None
    adapter_sha256: str | None
    adapter_file: str | None
    modes: tuple[str, ...]
    selectivity_mode: str | None
    harmful_source: str
    benign_source: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    started: str = ""
    seconds: float = 0.0
    versions: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> RunInfo:
        return cls(**{**raw, "modes": tuple(raw["modes"])})


@dataclass(frozen=True)
class EvalResults:
    """A whole evaluation: run info, judge, judged rows, utility rows, perplexities."""

    run: RunInfo
    judge: JudgeInfo
    rows: tuple[EvalRow, ...]
    utility: tuple[UtilityRow, ...] = ()
    perplexity: tuple[PerplexityRow, ...] = ()

    def mode_rows(self, mode: str) -> list[EvalRow]:
        """The rows of `mode` with every category on."""
        return [row for row in self.rows if row.mode == mode and row.disabled is None]

    def summaries(self) -> list[ModeSummary]:
        return [ModeSummary.of(mode, self.mode_rows(mode)) for mode in self.run.modes]

    def selectivity(self) -> list[Selectivity]:
        mode = self.run.selectivity_mode
        if mode is None:
            return []
        all_on = [row for row in self.mode_rows(mode) if row.kind == "harmful"]
        disabled = sorted({row.disabled for row in self.rows if row.disabled is not None})
        return [
            selectivity(c, [r for r in self.rows if r.disabled == c and r.mode == mode], all_on)
            for c in disabled
        ]

    def utility_scores(self) -> list[UtilityScore]:
        scores: list[UtilityScore] = []
        keys = dict.fromkeys((row.benchmark, row.mode) for row in self.utility)
        for benchmark, mode in keys:
            rows = [r for r in self.utility if r.benchmark == benchmark and r.mode == mode]
            scores.append(
                UtilityScore(
                    benchmark,
                    mode,
                    Rate.of(r.chosen == r.answer for r in rows),
                    Rate.of(r.chosen_norm == r.answer for r in rows),
                    sum(1 for r in rows if r.steered),
                )
            )
        return scores

    def to_dict(self) -> dict[str, Any]:
        utility = [
            {
                "benchmark": s.benchmark,
                "mode": s.mode,
                "acc": s.acc.to_dict(),
                "acc_norm": s.acc_norm.to_dict(),
                "steered_questions": s.steered,
            }
            for s in self.utility_scores()
        ]
        perplexity = [{**asdict(p), "perplexity": p.perplexity} for p in self.perplexity]
        return {
            "format": FORMAT,
            "run": asdict(self.run),
            "judge": self.judge.to_dict(),
            "summary": {
                "modes": [s.to_dict() for s in self.summaries()],
                "selectivity": [s.to_dict() for s in self.selectivity()],
                "utility": utility,
                "perplexity": perplexity,
            },
            "rows": [asdict(row) for row in self.rows],
            "utility_rows": [asdict(row) for row in self.utility],
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> EvalResults:
        """Read back `to_dict()`'s output (the summary is recomputed from the rows).

        Raises:
            ValueError: the format version is not this code's.
        """
        if raw.get("format") != FORMAT:
            raise ValueError(f"results format {raw.get('format')!r}; this reader knows {FORMAT}")
        perplexity = [
            PerplexityRow(**{k: v for k, v in p.items() if k != "perplexity"})
            for p in raw["summary"]["perplexity"]
        ]
        return cls(
            run=RunInfo.from_dict(raw["run"]),
            judge=JudgeInfo(**raw["judge"]),
            rows=tuple(EvalRow.from_dict(row) for row in raw["rows"]),
            utility=tuple(UtilityRow.from_dict(row) for row in raw["utility_rows"]),
            perplexity=tuple(perplexity),
        )

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n", "utf-8")
        return path

    @classmethod
    def read(cls, path: Path) -> EvalResults:
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
