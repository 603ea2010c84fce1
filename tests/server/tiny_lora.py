"""Tiny LoRA fine-tunes of the tiny chat model, written as real peft adapter folders."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from tiny_chat import tiny_chat_model, tiny_loaded_model, tiny_qwen2_chat_model, tiny_tokenizer

DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "v_proj", "down_proj")


def save_tiny_chat_folder(folder: Path, architecture: str = "llama") -> Path:
    """The tiny chat model and its tokenizer as a Hugging Face folder."""
    loaded = tiny_loaded_model(architecture)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def make_tiny_lora(
    out: Path,
    *,
    seed: int,
    architecture: str = "llama",
    targets: Sequence[str] = DEFAULT_TARGETS,
    rank: int = 4,
    scale: float = 0.3,
) -> Any:
    """Write a LoRA of the tiny chat model with seeded random A and B (B not zero) to `out`.

    Returns the unmerged peft model (eval mode), whose outputs the merged load must match.
    """
    build = tiny_qwen2_chat_model if architecture == "qwen2" else tiny_chat_model
    base = build(len(tiny_tokenizer()))
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets))
    peft_model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(out)
    return peft_model.eval()
