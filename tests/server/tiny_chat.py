"""A tiny chat model with a character-level tokenizer, for engine and API tests.

The tokenizer is built offline (ASCII characters + ChatML specials), so these tests need no
model download and no packaged wheel.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from safesteer.adapters.family import ModelFamily
from safesteer.adapters.loading import LoadedModel, weights_fingerprint

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_MODEL_NAME = "tiny-chat"
TINY_CONTEXT = 256


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (and newline), plus ChatML specials."""
    chars = ["\n"] + [chr(code) for code in range(32, 127)]
    vocab = {ch: i for i, ch in enumerate(chars)}
    vocab["<unk>"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens(
        {
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "pad_token": "<pad>",
            "unk_token": "<unk>",
        }
    )
    tokenizer.chat_template = CHATML
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_chat_model(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=vocab_size,
        max_position_embeddings=TINY_CONTEXT,
        eos_token_id=vocab_size - 2,
        pad_token_id=vocab_size - 1,
    )
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


def tiny_qwen2_chat_model(vocab_size: int) -> Qwen2ForCausalLM:
    """A second family for multi-family tests: Qwen2, hidden 48, 3 layers."""
    torch.manual_seed(1)
    config = Qwen2Config(
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        vocab_size=vocab_size,
        max_position_embeddings=TINY_CONTEXT,
        eos_token_id=vocab_size - 2,
        pad_token_id=vocab_size - 1,
    )
    model = Qwen2ForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


def tiny_loaded_model(architecture: str = "llama", name: str = TINY_MODEL_NAME) -> LoadedModel:
    tokenizer = tiny_tokenizer()
    build = tiny_qwen2_chat_model if architecture == "qwen2" else tiny_chat_model
    model = build(len(tokenizer))
    assert tokenizer.eos_token_id == len(tokenizer) - 2
    return LoadedModel(
        name=name,
        source="test",
        model=model,
        tokenizer=tokenizer,
        family=ModelFamily.from_config(model.config),
        fingerprint=weights_fingerprint(model),
        context_length=TINY_CONTEXT,
    )


def chat_ids(tokenizer: Any, text: str) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True
    )
    return [int(t) for t in encoded["input_ids"]]


def plain_greedy(loaded: LoadedModel, ids: list[int], max_new_tokens: int) -> str:
    """What transformers' own greedy `generate` answers, unhooked and unbatched."""
    output = loaded.model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=loaded.tokenizer.pad_token_id,
    )
    text: str = loaded.tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True)
    return text
