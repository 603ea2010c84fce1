"""Chat fine-tuning data: JSONL rows `{"messages": [{"role", "content"}, ...]}`, tokenized with
the model's chat template, with labels on the assistant turns' tokens only.

An assistant turn's target is the text its message adds to the rendered conversation after the
generation prompt (`<|im_start|>assistant\\n`): its content and the template's end-of-turn
marker, so the fine-tune learns where to stop. Tokens are matched to that text by their
character offsets, which needs a fast tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from safesteer.adapters.loading import file_sha256

ROLES: tuple[str, ...] = ("system", "user", "assistant")
IGNORE_INDEX = -100  # label of tokens the loss skips (transformers' convention)


class ChatDataError(ValueError):
    """A data file or row that cannot be used for fine-tuning; names the file and line."""


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class ChatExample:
    """One conversation and where it came from (`file:line`)."""

    messages: tuple[ChatMessage, ...]
    origin: str


@dataclass(frozen=True)
class ChatFile:
    """A data file as used: its path, sha256 and row count."""

    path: Path
    sha256: str
    rows: int


@dataclass(frozen=True)
class EncodedChat:
    """Token ids of a rendered conversation and their labels (`IGNORE_INDEX` off-target)."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def target_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def _message(value: object, where: str) -> ChatMessage:
    if not isinstance(value, dict):
        raise ChatDataError(f"{where}: a message must be an object with role and content")
    role, content = value.get("role"), value.get("content")
    if role not in ROLES:
        raise ChatDataError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
    if not isinstance(content, str) or not content.strip():
        raise ChatDataError(f"{where}: content must be a non-empty string")
    return ChatMessage(str(role), content)


def parse_row(line: str, where: str) -> ChatExample:
    """One JSONL row; keys other than `messages` (ids, categories) are ignored."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ChatDataError(f"{where}: not JSON ({exc.msg})") from exc
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ChatDataError(f"{where}: expected an object with a non-empty 'messages' list")
    parsed = tuple(_message(m, f"{where}: messages.{i}") for i, m in enumerate(messages))
    if parsed[0].role == "assistant":
        raise ChatDataError(f"{where}: the conversation starts with an assistant message")
    if not any(m.role == "assistant" for m in parsed):
        raise ChatDataError(f"{where}: no assistant message to learn")
    return ChatExample(parsed, where)


def read_chat_file(path: Path) -> tuple[ChatFile, list[ChatExample]]:
    """Read and check every row of a JSONL file (blank lines skipped).

    Raises:
        ChatDataError: the file is missing, unreadable, empty, or a row is malformed.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ChatDataError(f"data file {path} cannot be read: {exc}") from exc
    examples = [
        parse_row(line, f"{path}:{number}")
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]
    if not examples:
        raise ChatDataError(f"data file {path} has no rows")
    return ChatFile(path, file_sha256(path), len(examples)), examples


def _render(
    tokenizer: Any, messages: Sequence[ChatMessage], generation_prompt: bool, origin: str
) -> str:
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    try:
        text = tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=generation_prompt
        )
    except (ValueError, TypeError, TemplateError) as exc:  # no template, or it refused the turns
        raise ChatDataError(f"{origin}: cannot apply the model's chat template: {exc}") from exc
    if not isinstance(text, str):
        raise ChatDataError(f"{origin}: the chat template did not render text")
    return text


def target_spans(tokenizer: Any, example: ChatExample) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    Raises:
        ChatDataError: the model has no chat template, or its template does not render a
            conversation as its prefixes followed by each new turn.
    """
    messages, origin = example.messages, example.origin
    text = _render(tokenizer, messages, False, origin)
    spans = []
    for index, message in enumerate(messages):
        if message.role != "assistant":
            continue
        prompt = _render(tokenizer, messages[:index], True, origin)
        through = _render(tokenizer, messages[: index + 1], False, origin)
        if not (through.startswith(prompt) and text.startswith(through)):
            raise ChatDataError(
                f"{origin}: the chat template does not render this conversation turn by turn; "
                "cannot tell the assistant's tokens apart"
            )
        spans.append((len(prompt), len(through)))
    return text, spans


def encode_chat(tokenizer: Any, example: ChatExample, max_length: int) -> EncodedChat:
    """Token ids and assistant-only labels of one conversation, cut to `max_length` tokens.

    Raises:
        ChatDataError: see `target_spans`; or the tokenizer is not a fast one.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ChatDataError("fine-tuning needs a fast tokenizer (character offsets)")
    text, spans = target_spans(tokenizer, example)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [int(token) for token in encoded["input_ids"]]
    labels = [
        token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
        for token, (begin, _) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    truncated = len(ids) > max_length
    return EncodedChat(ids[:max_length], labels[:max_length], truncated)
