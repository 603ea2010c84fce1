"""The `safesteer finetune` command line: its flags, and running a fine-tune."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from safesteer.adapters.chat_data import ChatExample, ChatFile, read_chat_file
from safesteer.adapters.errors import ModelLoadError
from safesteer.adapters.finetune import (
    ALL_LINEAR,
    OUTPUT_FILES,
    FinetuneConfig,
    save_finetune,
    train_lora,
)
from safesteer.adapters.loading import DEFAULT_MODEL, load_model

DESCRIPTION = (
    "Train a LoRA fine-tune of a model on CPU from JSONL chat data (rows "
    '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}). '
    "The conversation is rendered with the model's chat template and the loss covers the "
    "assistant turns' tokens only. Seeded: the same data, settings and seed give the same "
    "weights. Writes OUT/adapter_config.json and OUT/adapter_model.safetensors (a peft LoRA; "
    "serve or evaluate it as BASE+OUT) and OUT/finetune.json (base source and fingerprint, "
    "family, data files with sha256 and rows, every setting, losses, time, versions)."
)
DEFAULTS = FinetuneConfig()


def _modules(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected module names like q_proj,v_proj or all-linear")
    return names


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `safesteer finetune`."""
    add = parser.add_argument
    add(
        "--model",
        default=DEFAULT_MODEL,
        help="base to fine-tune: packaged name, Hugging Face folder, .gguf file, or a fine-tune "
        f"BASE+LORA_DIR (default {DEFAULT_MODEL})",
    )
    add(
        "--data",
        type=Path,
        action="append",
        required=True,
        metavar="FILE.jsonl",
        help="chat examples, one JSON object per line; repeat for several files",
    )
    add("--out", type=Path, required=True, help="folder to write the LoRA and finetune.json to")
    add("--rank", type=int, default=DEFAULTS.rank, help=f"LoRA rank (default {DEFAULTS.rank})")
    add(
        "--alpha",
        type=int,
        default=DEFAULTS.alpha,
        help=f"LoRA alpha; the update is scaled by alpha/rank (default {DEFAULTS.alpha})",
    )
    add(
        "--dropout",
        type=float,
        default=DEFAULTS.dropout,
        help=f"LoRA dropout (default {DEFAULTS.dropout:g})",
    )
    add(
        "--target-modules",
        type=_modules,
        default=DEFAULTS.target_modules,
        help=f"comma-separated linear layer names, or {ALL_LINEAR} (default {ALL_LINEAR})",
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument(
        "--epochs",
        type=int,
        default=DEFAULTS.epochs,
        help=f"passes over the data (default {DEFAULTS.epochs})",
    )
    length.add_argument(
        "--steps", type=int, default=None, help="optimizer steps, instead of --epochs"
    )
    add(
        "--lr",
        type=float,
        default=DEFAULTS.lr,
        help=f"AdamW learning rate (default {DEFAULTS.lr:g})",
    )
    add(
        "--batch-size",
        type=int,
        default=DEFAULTS.batch_size,
        help=f"conversations per step (default {DEFAULTS.batch_size})",
    )
    add(
        "--max-length",
        type=int,
        default=DEFAULTS.max_length,
        help=f"tokens kept per conversation, cut at the end (default {DEFAULTS.max_length})",
    )
    add("--seed", type=int, default=DEFAULTS.seed, help=f"seed (default {DEFAULTS.seed})")
    add(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default torch's); fewer can be faster on a busy machine",
    )
    add("--overwrite", action="store_true", help="replace a fine-tune already in --out")
    add("--quiet", action="store_true", help="no progress bar")


def canonical_command(args: argparse.Namespace) -> str:
    """The command line that reproduces a fine-tune, every setting spelled out."""
    parts = ["safesteer", "finetune", "--model", args.model]
    for path in args.data:
        parts += ["--data", str(path)]
    parts += ["--out", str(args.out), "--rank", str(args.rank), "--alpha", str(args.alpha)]
    parts += ["--dropout", f"{args.dropout:g}", "--target-modules", ",".join(args.target_modules)]
    parts += (
        ["--steps", str(args.steps)] if args.steps is not None else ["--epochs", str(args.epochs)]
    )
    parts += ["--lr", f"{args.lr:g}", "--batch-size", str(args.batch_size)]
    parts += ["--max-length", str(args.max_length), "--seed", str(args.seed)]
    parts += ["--threads", str(args.threads)] if args.threads is not None else []
    return shlex.join(parts)


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    return FinetuneConfig(
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        target_modules=args.target_modules,
        epochs=args.epochs,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        show_progress=not args.quiet,
    )


def read_data(paths: list[Path]) -> tuple[list[ChatFile], list[ChatExample]]:
    files: list[ChatFile] = []
    examples: list[ChatExample] = []
    for path in paths:
        read, rows = read_chat_file(path)
        files.append(read)
        examples.extend(rows)
    return files, examples


def run_finetune_command(args: argparse.Namespace) -> int:
    """Run `safesteer finetune` from parsed flags; 2 on a usage, data or model error."""
    taken = [name for name in OUTPUT_FILES if (args.out / name).exists()]
    if taken and not args.overwrite:
        print(
            f"error: {args.out} already holds a fine-tune ({', '.join(taken)}); "
            "pass --overwrite to replace it",
            file=sys.stderr,
        )
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print("error: --threads must be at least 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    try:
        config = config_from_args(args)
        files, examples = read_data(args.data)
        loaded = load_model(args.model)
        print(
            f"fine-tuning {loaded.name} (family {loaded.family.id}) on {len(examples)} "
            f"conversations from {len(files)} file(s), {config.total_steps(len(examples))} steps",
            flush=True,
        )
        result = train_lora(loaded, examples, config)
        record = save_finetune(result, loaded, files, config, args.out, canonical_command(args))
    except (ModelLoadError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"loss per assistant token {result.initial_loss:.3f} -> {result.final_loss:.3f}; "
        f"{result.steps} steps in {result.step_seconds:.1f} s "
        f"({result.step_seconds / result.steps:.2f} s/step), {result.seconds:.1f} s in all"
    )
    fingerprint = record["fingerprint"][:16]
    print(f"wrote {args.out} (fingerprint {fingerprint}); serve it as {args.model}+{args.out}")
    return 0
