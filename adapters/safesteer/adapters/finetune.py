"""LoRA fine-tuning on CPU, seeded: the training behind `safesteer finetune`.

The base (any `load_model` source, a fine-tune `BASE+LORA_DIR` included) stays frozen; peft
LoRA matrices on the chosen linear layers learn the assistant tokens of chat data (the loss
covers those tokens only, see `chat_data`). One seed fixes the LoRA initialisation, the data
order and dropout, so two runs on one machine give the same weights. The folder written holds
the peft adapter (`adapter_config.json`, `adapter_model.safetensors`; loadable as
`BASE+DIR`) and `finetune.json`: base, data, settings, losses, time and versions.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from safesteer.adapters.chat_data import (
    IGNORE_INDEX,
    ChatExample,
    ChatFile,
    EncodedChat,
    encode_chat,
)
from safesteer.adapters.loading import LoadedModel, weights_fingerprint
from safesteer.adapters.lora import FINETUNE_RECORD_FILE, LORA_CONFIG_FILE, LORA_WEIGHTS_FILE

RECORD_FORMAT_VERSION = 1
ALL_LINEAR = "all-linear"  # peft's name for every linear layer but the output head


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of one LoRA fine-tune (all recorded in `finetune.json`)."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = (ALL_LINEAR,)
    epochs: int = 1
    steps: int | None = None  # when set, train this many steps instead of `epochs` passes
    lr: float = 2e-4
    batch_size: int = 8
    max_length: int = 512
    seed: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    show_progress: bool = field(default=True, compare=False)

    def __post_init__(self) -> None:
        positive = {
            "rank": self.rank,
            "alpha": self.alpha,
            "epochs": self.epochs,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "max_grad_norm": self.max_grad_norm,
        }
        if self.steps is not None:
            positive["steps"] = self.steps
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be within [0, 1), got {self.dropout}")
        if not self.target_modules or not all(self.target_modules):
            raise ValueError("target_modules: name at least one module")

    def total_steps(self, rows: int) -> int:
        return (
            self.steps
            if self.steps is not None
            else self.epochs * math.ceil(rows / self.batch_size)
        )

    def hyperparameters(self) -> dict[str, Any]:
        settings = asdict(self)
        del settings["show_progress"]
        if self.steps is not None:
            settings["epochs"] = None  # not what decided the length of this run
        settings["target_modules"] = list(self.target_modules)
        settings.update(optimizer="adamw", schedule="constant", precision="float32")
        return settings


@dataclass
class FinetuneResult:
    """A trained peft model and how its training went."""

    model: Any  # peft PeftModel wrapping the base; LoRA weights trained
    step_losses: list[float]
    initial_loss: float  # mean loss per assistant token over all rows, before training
    final_loss: float  # the same after training (eval mode, no dropout)
    steps: int
    rows: int
    rows_seen: int  # rows fed to training steps, over all epochs
    target_tokens: int
    truncated_rows: int
    trainable_parameters: int
    seconds: float  # the whole run: both loss evaluations and the training steps
    step_seconds: float  # the training steps alone


def _batch(rows: Sequence[EncodedChat], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, labels (padding ignored) and attention mask."""
    width = max(len(row.input_ids) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        length = len(row.input_ids)
        ids[index, :length] = torch.tensor(row.input_ids)
        labels[index, :length] = torch.tensor(row.labels)
        mask[index, :length] = 1
    return ids, labels, mask


def _summed_loss(model: Any, rows: Sequence[EncodedChat], pad_id: int) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over the rows' target tokens, and how many there are."""
    ids, labels, mask = _batch(rows, pad_id)
    targets = labels[:, 1:]
    # Only positions whose next token is a target go through the vocabulary-wide output layer
    # (a fifth of SmolLM2-135M's compute per token); transformers flattens them to [kept, vocab].
    predicts = torch.zeros_like(ids, dtype=torch.bool)
    predicts[:, :-1] = targets != IGNORE_INDEX
    wanted = targets[targets != IGNORE_INDEX]
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=predicts).logits
    if logits.shape[:-1] != wanted.shape:
        raise ValueError(f"{type(model).__name__} cannot keep the logits of chosen positions")
    return F.cross_entropy(logits, wanted, reduction="sum"), int(wanted.numel())


def mean_loss(model: Any, rows: Sequence[EncodedChat], pad_id: int, batch_size: int) -> float:
    """Mean loss per target token over all rows, without dropout or gradients."""
    training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            loss, tokens = _summed_loss(model, rows[start : start + batch_size], pad_id)
            total, count = total + float(loss), count + tokens
    model.train(training)
    return total / max(count, 1)


def encode_examples(
    loaded: LoadedModel, examples: Sequence[ChatExample], max_length: int
) -> list[EncodedChat]:
    """Tokenize every example; refuses one whose assistant tokens all fall past `max_length`."""
    encoded = [encode_chat(loaded.tokenizer, example, max_length) for example in examples]
    for example, row in zip(examples, encoded, strict=True):
        if row.target_tokens == 0:
            raise ValueError(
                f"{example.origin}: no assistant token left within --max-length {max_length}"
            )
    return encoded


def _lora_config(config: FinetuneConfig) -> Any:
    from peft import LoraConfig

    targets: str | list[str] = (
        ALL_LINEAR if config.target_modules == (ALL_LINEAR,) else list(config.target_modules)
    )
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def train_lora(
    loaded: LoadedModel,
    examples: Sequence[ChatExample],
    config: FinetuneConfig,
    on_step: Callable[[int, float], None] | None = None,
) -> FinetuneResult:
    """Train a LoRA on `loaded` (its model is wrapped in place) from chat examples.

    Torch's global generator is seeded for the run and restored afterwards.

    Raises:
        ValueError: a setting or row cannot be used (`ChatDataError` for the data), or the
            target modules match nothing in the model.
    """
    from peft import get_peft_model

    encoded = encode_examples(loaded, examples, config.max_length)
    pad_id = int(loaded.tokenizer.pad_token_id)
    total = config.total_steps(len(encoded))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # LoRA initialisation and dropout
        order_generator = torch.Generator().manual_seed(config.seed)
        model = get_peft_model(loaded.model, _lora_config(config))
        trainable = [param for param in model.parameters() if param.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
        started = time.perf_counter()
        initial = mean_loss(model, encoded, pad_id, config.batch_size)
        model.train()
        losses: list[float] = []
        order: list[int] = []
        seen = 0
        steps_started = time.perf_counter()
        progress = tqdm(total=total, desc="finetune", disable=not config.show_progress)
        for step in range(total):
            if not order:
                order = torch.randperm(len(encoded), generator=order_generator).tolist()
            chosen, order = order[: config.batch_size], order[config.batch_size :]
            seen += len(chosen)
            summed, tokens = _summed_loss(model, [encoded[i] for i in chosen], pad_id)
            loss = summed / max(tokens, 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
            if on_step is not None:
                on_step(step, losses[-1])
        progress.close()
        step_seconds = time.perf_counter() - steps_started
        final = mean_loss(model, encoded, pad_id, config.batch_size)
        model.eval()
        seconds = time.perf_counter() - started
    return FinetuneResult(
        model=model,
        step_losses=losses,
        initial_loss=initial,
        final_loss=final,
        steps=total,
        rows=len(encoded),
        rows_seen=seen,
        target_tokens=sum(row.target_tokens for row in encoded),
        truncated_rows=sum(row.truncated for row in encoded),
        trainable_parameters=sum(param.numel() for param in trainable),
        seconds=seconds,
        step_seconds=step_seconds,
    )


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("safesteer", "torch", "transformers", "peft"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "unknown"
    return found


def finetune_record(
    result: FinetuneResult,
    base: LoadedModel,
    files: Sequence[ChatFile],
    config: FinetuneConfig,
    fingerprint: str,
    command: str,
) -> dict[str, Any]:
    """The contents of `finetune.json`."""
    return {
        "format_version": RECORD_FORMAT_VERSION,
        "base": {
            "source": base.source,
            "fingerprint": base.fingerprint,
            "family": base.family.id,
            "family_alias": base.family.alias,
        },
        "fingerprint": fingerprint,
        "data": [{"path": str(f.path), "sha256": f.sha256, "rows": f.rows} for f in files],
        "hyperparameters": config.hyperparameters(),
        "training": {
            "steps": result.steps,
            "rows": result.rows,
            "epochs": round(result.rows_seen / result.rows, 4),
            "target_tokens": result.target_tokens,
            "truncated_rows": result.truncated_rows,
            "trainable_parameters": result.trainable_parameters,
            "initial_loss": result.initial_loss,
            "final_loss": result.final_loss,
            "step_losses": result.step_losses,
            "threads": torch.get_num_threads(),
            "seconds": round(result.seconds, 2),
            "seconds_per_step": round(result.step_seconds / result.steps, 4),
        },
        "command": command,
        "versions": _versions(),
    }


OUTPUT_FILES: tuple[str, ...] = (LORA_CONFIG_FILE, LORA_WEIGHTS_FILE, FINETUNE_RECORD_FILE)


def save_finetune(
    result: FinetuneResult,
    base: LoadedModel,
    files: Sequence[ChatFile],
    config: FinetuneConfig,
    out: Path,
    command: str = "",
) -> dict[str, Any]:
    """Write the adapter and `finetune.json` into `out`; returns the record.

    The LoRA is merged into the model afterwards to fingerprint the fine-tune's weights (what
    `load_model("BASE+OUT")` reports), so `result.model` is spent.
    """
    model = result.model
    model.peft_config["default"].base_model_name_or_path = base.source
    out.mkdir(parents=True, exist_ok=True)
    # peft also writes a model-card README.md; only its two adapter files are kept.
    staging = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        # The vocabulary is never resized here, so no base embedding weights are saved (and
        # peft's "auto" would look the base's name up on the Hugging Face Hub to decide).
        model.save_pretrained(str(staging), save_embedding_layers=False)
        for name in (LORA_CONFIG_FILE, LORA_WEIGHTS_FILE):
            # A copy, not a rename: safetensors writes its file owner-only (0600), which a
            # server running as another user (the container's uid 10001) could not read.
            shutil.copyfile(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    fingerprint = weights_fingerprint(model.merge_and_unload())
    record = finetune_record(result, base, files, config, fingerprint, command)
    (out / FINETUNE_RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record
