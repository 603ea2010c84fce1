"""Judge the stored answers of an evaluation again, with the current judge.

Answers are greedy and deterministic, so judging a run's stored answers again gives the report
a fresh `safesteer eval` with the same flags would give, without generating anything: useful
when the judge improves. Only the verdicts and the judge's measured accuracy change; the run's
command, settings, answers, firings and utility rows are kept.
"""

from __future__ import annotations

from dataclasses import replace

from safesteer.adapters.evaluation.judging import make_judge
from safesteer.adapters.evaluation.results import EvalResults


def rejudge(results: EvalResults, judge_name: str | None = None) -> EvalResults:
    """`results` with every row judged again by `judge_name` (default: the run's judge)."""
    judge, info = make_judge(judge_name or results.judge.name)
    verdicts = judge.judge([r.prompt for r in results.rows], [r.response for r in results.rows])
    rows = tuple(replace(r, refused=v) for r, v in zip(results.rows, verdicts, strict=True))
    return replace(results, judge=info, rows=rows)
