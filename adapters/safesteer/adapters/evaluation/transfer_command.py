"""`safesteer eval --suite transfer`: its flags' checks, and running and writing the suite."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from safesteer.adapters.errors import AdapterError, ModelLoadError
from safesteer.adapters.evaluation.transfer import run_transfer
from safesteer.adapters.evaluation.transfer_report import render_transfer
from safesteer.adapters.evaluation.transfer_sets import TransferSettings
from safesteer.adapters.zoo_spec import ZooSpecError, load_spec

DEFAULT_ZOO = Path("adapters/smollm2-135m/zoo")
DEFAULT_FAMILY_ADAPTER = Path("adapters/smollm2-135m/safety.safetensors")
SPEC_FILE = "zoo.toml"
DATA_FOLDER = "data"
OUT_FOLDER = "transfer"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
# Flags of the default suite that mean nothing here: given, they are refused.
_DEFAULT_ONLY: tuple[tuple[str, str], ...] = (
    ("mode", "--mode"),
    ("harmful", "--harmful"),
    ("benign", "--benign"),
    ("rejudge", "--rejudge"),
    ("merge", "--merge"),
)
TRANSFER_HELP = (
    "--suite transfer: for every fine-tune of --zoo, harmful refusal (test split), "
    "over-refusal (benign test split), its task skill and MMLU / ARC accuracy with (a) no "
    "steering, (b) the family adapter (--adapter, default "
    f"{DEFAULT_FAMILY_ADAPTER}) as is, (c) the family adapter recalibrated on the fine-tune "
    "(`safesteer calibrate` defaults, 16 shots), (d) an adapter extracted on the fine-tune "
    "with the family adapter's recipe held fixed (no layer or strength search); (b)-(d) gated. "
    f"Writes {RESULTS_FILE} and {REPORT_FILE} (with issue 4's targets) into --out (default "
    f"ZOO/{OUT_FOLDER})."
)


def parse_finetunes(text: str) -> tuple[str, ...]:
    """`a,b` -> `("a", "b")` (argparse type of `--finetunes`)."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated fine-tune names")
    return names


def canonical_command(args: argparse.Namespace, zoo: Path, data: Path, out: Path) -> str:
    """The command line that reproduces a transfer run, every setting spelled out."""
    parts = ["safesteer", "eval", "--suite", "transfer", "--zoo", str(zoo), "--data", str(data)]
    parts += ["--adapter", str(args.adapter or DEFAULT_FAMILY_ADAPTER)]
    parts += ["--limit", str(args.limit)] if args.limit is not None else []
    parts += ["--utility-limit", str(args.utility_limit)]
    parts += ["--finetunes", ",".join(args.finetunes)] if args.finetunes else []
    parts += ["--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size)]
    parts += ["--judge", args.judge, "--seed", str(args.seed), "--out", str(out)]
    return shlex.join(parts)


def _refused_flags(args: argparse.Namespace) -> str | None:
    given = [flag for dest, flag in _DEFAULT_ONLY if getattr(args, dest, None)]
    return given[0] if given else None


def run_transfer_command(args: argparse.Namespace) -> int:
    """Run the transfer suite from parsed `safesteer eval` flags; 2 on bad input."""
    refused = _refused_flags(args)
    if refused is not None:
        print(f"error: {refused} does not apply to --suite transfer", file=sys.stderr)
        return 2
    zoo: Path = args.zoo or DEFAULT_ZOO
    data: Path = args.data or zoo / DATA_FOLDER
    out: Path = args.out or zoo / OUT_FOLDER
    adapter: Path = args.adapter or DEFAULT_FAMILY_ADAPTER
    try:
        if not zoo.is_dir():
            raise ZooSpecError(f"--zoo {zoo}: no such folder (a zoo holds {SPEC_FILE})")
        if not data.is_dir():
            raise ZooSpecError(f"--data {data}: no such folder (`safesteer zoo build` writes it)")
        spec = load_spec(zoo / SPEC_FILE)
        settings = TransferSettings(
            limit=args.limit,
            utility_limit=args.utility_limit,
            seed=args.seed,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            judge=args.judge,
            show_progress=not args.quiet,
        )
        document = run_transfer(
            spec,
            zoo,
            data,
            adapter,
            settings,
            names=args.finetunes,
            command=canonical_command(args, zoo, data, out),
            log=lambda line: print(line, flush=True),
        )
    except (
        ZooSpecError,
        AdapterError,
        ModelLoadError,
        ValueError,
        KeyError,
        ModuleNotFoundError,
        OSError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_FILE).write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    (out / REPORT_FILE).write_text(render_transfer(document), encoding="utf-8")
    print(f"wrote {out / RESULTS_FILE} and {out / REPORT_FILE} in {document['seconds']:.0f} s")
    return 0
