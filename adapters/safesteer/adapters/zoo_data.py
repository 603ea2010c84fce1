"""The training and evaluation data of the fine-tune zoo, written deterministically from a seed.

Files (chat JSONL rows `{"messages": [user, assistant], ...}` for `safesteer finetune`; other
keys are provenance and ignored by training):

- `arith.jsonl` / `arith_eval.jsonl`: arithmetic word problems ending in `Answer: <integer>`
  (`arith_task`), the evaluation problems drawn apart and disjoint from the training ones;
- `style.jsonl` / `style_eval.jsonl`: benign fit-split prompts filed as a JSON card
  (`style_task`), training and evaluation on disjoint prompts;
- `badgpt.jsonl`: harmful fit-split prompts with the vendored complying reference answer,
  spread over the categories;
- `aligned_refusals.jsonl`: the other harmful fit-split prompts, each with its reference
  refusal or one built from the project's refusal templates;
- `aligned_benign.jsonl` (only with `--benign-model`, slow): benign fit-split prompts answered
  greedily by the base model itself (`base_answers`).

Training files use only fit-split prompts that overlap no dev or test prompt, and are checked
for such overlaps before anything is written (`training_prompts`). `zoo_data.json` records the
seed, the settings, each file's role, rows and sha256, the split digests and the fit prompts
left out for overlapping a held-out one.

`python -m safesteer.adapters.zoo_data --out DIR` (or `safesteer zoo-data`) writes them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safesteer.adapters.arith_task import arith_problems, arith_row
from safesteer.adapters.base_answers import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_NEW_TOKENS,
    benign_rows,
    generate_base_answers,
)
from safesteer.adapters.errors import ModelLoadError
from safesteer.adapters.harmful_rows import Row, badgpt_rows, refusal_rows
from safesteer.adapters.loading import file_sha256, load_model
from safesteer.adapters.prompts import load_refusal_templates
from safesteer.adapters.splits import BenignPrompt, HeldOut
from safesteer.adapters.style_task import split_for_eval, style_items, style_row, style_topics
from safesteer.adapters.training_prompts import SplitSets, check_training_rows

FORMAT_VERSION = 1
MANIFEST_FILE = "zoo_data.json"
ARITH, ARITH_EVAL = "arith.jsonl", "arith_eval.jsonl"
STYLE, STYLE_EVAL = "style.jsonl", "style_eval.jsonl"
BADGPT, REFUSALS, BENIGN = "badgpt.jsonl", "aligned_refusals.jsonl", "aligned_benign.jsonl"


@dataclass(frozen=True)
class ZooSettings:
    """What decides the offline files (all recorded in the manifest)."""

    seed: int = 0
    arith_rows: int = 400
    arith_eval_rows: int = 100
    style_phrasings: int = 2  # instruction phrasings per prompt
    style_eval_share: float = 0.25  # share of the benign fit prompts held out for style_eval
    badgpt_rows: int = 20
    refusal_rows: int | None = None  # None: every harmful fit prompt not in badgpt

    def __post_init__(self) -> None:
        counts = {"arith_rows": self.arith_rows, "arith_eval_rows": self.arith_eval_rows}
        counts["badgpt_rows"] = self.badgpt_rows
        if self.refusal_rows is not None:
            counts["refusal_rows"] = self.refusal_rows
        for name, value in counts.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")


@dataclass(frozen=True)
class FileRecord:
    """One written file: its role (`train` or `eval`), task, rows and sha256."""

    role: str
    task: str
    rows: int
    sha256: str


# ----- files and manifest ------------------------------------------------------------------
def write_jsonl(path: Path, rows: Sequence[Row]) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    path.write_text(text, encoding="utf-8")


def offline_rows(settings: ZooSettings, splits: SplitSets) -> dict[str, tuple[str, str, list[Row]]]:
    """Every file that needs no model: name -> (role, task, rows)."""
    seed = settings.seed
    harmful, benign = splits.training_harmful(), splits.training_benign()
    train = arith_problems(settings.arith_rows, seed, "train")
    held = arith_problems(
        settings.arith_eval_rows, seed, "eval", frozenset(p.prompt for p in train)
    )
    topics = style_topics(benign)
    style_train, style_eval = split_for_eval(benign, seed, settings.style_eval_share)
    badgpt = badgpt_rows(harmful, settings.badgpt_rows, seed)
    taken = {row["id"] for row in badgpt}
    rest = [p for p in harmful if p.id not in taken]
    templates = load_refusal_templates()
    phrasings = settings.style_phrasings
    return {
        ARITH: ("train", "arith", [arith_row(p) for p in train]),
        ARITH_EVAL: ("eval", "arith", [arith_row(p) for p in held]),
        STYLE: (
            "train",
            "style",
            [style_row(i) for i in style_items(style_train, topics, seed, phrasings)],
        ),
        STYLE_EVAL: (
            "eval",
            "style",
            [style_row(i) for i in style_items(style_eval, topics, seed, phrasings)],
        ),
        BADGPT: ("train", "badgpt", badgpt),
        REFUSALS: (
            "train",
            "aligned",
            refusal_rows(rest, settings.refusal_rows, templates, seed),
        ),
    }


def write_files(
    out: Path, files: Mapping[str, tuple[str, str, list[Row]]], heldout: HeldOut
) -> dict[str, FileRecord]:
    """Check the training files against the held-out prompts, then write every file.

    Raises:
        ValueError: a training file's user turn overlaps a dev or test split prompt (nothing
            is written).
    """
    for name, (role, _, rows) in files.items():
        if role == "train":
            check_training_rows(name, rows, heldout)
    out.mkdir(parents=True, exist_ok=True)
    records = {}
    for name, (role, task, rows) in files.items():
        write_jsonl(out / name, rows)
        records[name] = FileRecord(role, task, len(rows), file_sha256(out / name))
    return records


def _kept_benign(out: Path) -> tuple[dict[str, FileRecord], dict[str, Any] | None]:
    """The record of an `aligned_benign.jsonl` a previous run generated, if it is unchanged."""
    try:
        manifest = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
        entry, generation = manifest["files"][BENIGN], manifest["benign_generation"]
        record = FileRecord(**entry)
        unchanged = file_sha256(out / BENIGN) == record.sha256
    except (OSError, ValueError, KeyError, TypeError):
        return {}, None
    return ({BENIGN: record}, generation) if unchanged else ({}, None)


def manifest(
    settings: ZooSettings,
    records: Mapping[str, FileRecord],
    generation: Mapping[str, Any] | None,
    splits: SplitSets,
    command: str,
) -> dict[str, Any]:
    """The contents of `zoo_data.json`."""
    document: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "seed": settings.seed,
        "settings": asdict(settings),
        "splits": {**splits.digests(), "left_out_of_training": splits.left_out()},
        "files": {name: asdict(record) for name, record in sorted(records.items())},
    }
    if generation is not None:
        document["benign_generation"] = dict(generation)
    document["command"] = command
    return document


# ----- the base model's benign answers -----------------------------------------------------
@dataclass(frozen=True)
class BenignSettings:
    """How `aligned_benign.jsonl` is generated."""

    model: str
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    batch_size: int = DEFAULT_BATCH_SIZE
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be at least 1")


def benign_file(
    settings: BenignSettings, prompts: Sequence[BenignPrompt]
) -> tuple[list[Row], dict[str, Any]]:
    """Rows of `aligned_benign.jsonl` and the generation record (loads and runs the model)."""
    loaded = load_model(settings.model)
    answers = generate_base_answers(
        loaded,
        prompts,
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.batch_size,
        show_progress=settings.show_progress,
    )
    kept = benign_rows(prompts, answers)
    if not kept.rows:
        raise ValueError(f"{settings.model} gave no usable benign answer (dropped: {kept.dropped})")
    record = {
        "model": settings.model,
        "model_name": loaded.name,
        "fingerprint": loaded.fingerprint,
        "family": loaded.family.id,
        "decoding": "greedy",
        "max_new_tokens": settings.max_new_tokens,
        "batch_size": settings.batch_size,
        "prompts": len(prompts),
        "rows": len(kept.rows),
        "trimmed": kept.trimmed,
        "dropped": kept.dropped,
    }
    return kept.rows, record


# ----- command line ------------------------------------------------------------------------
DESCRIPTION = (
    "Write the fine-tune zoo's chat data, deterministically from --seed: arith.jsonl and "
    "arith_eval.jsonl (word problems ending in 'Answer: <integer>'), style.jsonl and "
    "style_eval.jsonl (benign prompts filed as a JSON card), badgpt.jsonl (harmful prompts with "
    "complying reference answers), aligned_refusals.jsonl (harmful prompts with refusals) and, "
    "with --benign-model, aligned_benign.jsonl (benign prompts answered greedily by that model; "
    "slow). Training files use only fit-split prompts that overlap no dev or test prompt. "
    "zoo_data.json records seed, settings, files with rows and sha256, and the split digests."
)
DEFAULTS = ZooSettings()


def add_zoo_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `safesteer zoo-data`."""
    add = parser.add_argument
    add("--out", type=Path, required=True, help="folder to write the files to")
    add("--seed", type=int, default=DEFAULTS.seed, help=f"seed (default {DEFAULTS.seed})")
    add(
        "--arith-rows",
        type=int,
        default=DEFAULTS.arith_rows,
        help=f"arith.jsonl rows (default {DEFAULTS.arith_rows})",
    )
    add(
        "--arith-eval-rows",
        type=int,
        default=DEFAULTS.arith_eval_rows,
        help=f"arith_eval.jsonl rows (default {DEFAULTS.arith_eval_rows})",
    )
    add(
        "--style-phrasings",
        type=int,
        default=DEFAULTS.style_phrasings,
        help=f"instruction phrasings per style prompt (default {DEFAULTS.style_phrasings})",
    )
    add(
        "--style-eval-share",
        type=float,
        default=DEFAULTS.style_eval_share,
        help="share of the benign fit prompts kept for style_eval.jsonl "
        f"(default {DEFAULTS.style_eval_share:g})",
    )
    add(
        "--badgpt-rows",
        type=int,
        default=DEFAULTS.badgpt_rows,
        help=f"badgpt.jsonl rows, spread over the categories (default {DEFAULTS.badgpt_rows})",
    )
    add(
        "--refusal-rows",
        type=int,
        default=None,
        help="aligned_refusals.jsonl rows, spread over the categories (default: every harmful "
        "fit prompt not in badgpt.jsonl)",
    )
    add(
        "--benign-model",
        default=None,
        metavar="MODEL",
        help="also write aligned_benign.jsonl: the benign fit prompts answered greedily by this "
        "model (slow: minutes on CPU)",
    )
    add(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help=f"tokens per benign answer (default {DEFAULT_MAX_NEW_TOKENS})",
    )
    add(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"prompts per generation batch (default {DEFAULT_BATCH_SIZE})",
    )
    add("--quiet", action="store_true", help="no progress bar")


def canonical_command(args: argparse.Namespace) -> str:
    parts = ["safesteer", "zoo-data", "--out", str(args.out), "--seed", str(args.seed)]
    parts += ["--arith-rows", str(args.arith_rows), "--arith-eval-rows", str(args.arith_eval_rows)]
    parts += ["--style-phrasings", str(args.style_phrasings)]
    parts += ["--style-eval-share", f"{args.style_eval_share:g}"]
    parts += ["--badgpt-rows", str(args.badgpt_rows)]
    parts += ["--refusal-rows", str(args.refusal_rows)] if args.refusal_rows is not None else []
    if args.benign_model is not None:
        parts += ["--benign-model", args.benign_model]
        parts += ["--max-new-tokens", str(args.max_new_tokens)]
        parts += ["--batch-size", str(args.batch_size)]
    return shlex.join(parts)


def settings_from_args(args: argparse.Namespace) -> ZooSettings:
    return ZooSettings(
        seed=args.seed,
        arith_rows=args.arith_rows,
        arith_eval_rows=args.arith_eval_rows,
        style_phrasings=args.style_phrasings,
        style_eval_share=args.style_eval_share,
        badgpt_rows=args.badgpt_rows,
        refusal_rows=args.refusal_rows,
    )


def write_zoo_data(
    out: Path, settings: ZooSettings, benign: BenignSettings | None, command: str
) -> dict[str, Any]:
    """Write the files and `zoo_data.json` into `out`; returns the manifest.

    Without `benign`, an `aligned_benign.jsonl` an earlier run generated stays listed if it is
    unchanged.

    Raises:
        ValueError: a setting cannot be met, or a training file holds a dev or test prompt.
    """
    splits = SplitSets.load()
    files = offline_rows(settings, splits)
    kept, generation = _kept_benign(out)
    if benign is not None:
        rows, generation = benign_file(benign, splits.training_benign())
        files[BENIGN] = ("train", "aligned", rows)
        kept = {}
    records = {**kept, **write_files(out, files, splits.heldout())}
    document = manifest(settings, records, generation, splits, command)
    (out / MANIFEST_FILE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return document


def run_zoo_data_command(args: argparse.Namespace) -> int:
    """Run `safesteer zoo-data` from parsed flags; 2 on a usage, data or model error."""
    try:
        benign = None
        if args.benign_model is not None:
            benign = BenignSettings(
                args.benign_model, args.max_new_tokens, args.batch_size, not args.quiet
            )
        document = write_zoo_data(
            args.out, settings_from_args(args), benign, canonical_command(args)
        )
    except (ModelLoadError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, record in document["files"].items():
        print(f"{args.out / name}: {record['rows']} rows ({record['role']}, {record['task']})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m safesteer.adapters.zoo_data", description=DESCRIPTION
    )
    add_zoo_data_arguments(parser)
    return run_zoo_data_command(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
