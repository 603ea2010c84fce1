"""OpenAI wire models, plus the `safety` extension block.

Request fields follow the order of the OpenAI API reference. Unknown top-level keys are
accepted and logged (clients send vendor extras), but fields that would change the output and
that this server does not implement are refused by `unsupported()` with a 400.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from safesteer.adapters.table import MAX_WEIGHT

log = logging.getLogger(__name__)


class OpenAIModel(BaseModel):
    """Base for requests: extra keys allowed, and logged so nobody wonders where they went."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_ignored(self) -> OpenAIModel:
        if self.model_extra:
            log.warning("ignoring unknown request fields: %s", sorted(self.model_extra))
        return self


# ----- safesteer extension --------------------------------------------------------------
class SafetyOptions(BaseModel):
    """The `safety` block: per-request steering. Sent by the SDK via `extra_body`."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["gated", "always", "off"] | None = Field(
        None,
        description="`gated`: steer a category only when its condition probe fires on the "
        "prompt; `always`: steer every token; `off`: no steering. Default: `gated` when the "
        "adapter has a gate, else `always`.",
    )
    categories: dict[str, float] = Field(
        default_factory=dict,
        description=f"Weight per harm category, 0..{MAX_WEIGHT:g}; unnamed ones keep the default.",
    )
    strength: float = Field(
        1.0, ge=0.0, le=MAX_WEIGHT, description="Multiplies every category weight."
    )

    @model_validator(mode="after")
    def _weights_in_range(self) -> SafetyOptions:
        for name, weight in self.categories.items():
            if not 0.0 <= weight <= MAX_WEIGHT:
                raise ValueError(f"weight of category {name!r} must be within 0..{MAX_WEIGHT:g}")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


StopField = str | list[str] | None


class SamplingFields(OpenAIModel):
    """Fields shared by chat and text completions."""

    model: str | None = None
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: StopField = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None

    # --- extensions (not in the OpenAI API) -----------------------------------------------
    ignore_eos: bool = Field(
        False, description="vLLM extension: never stop at end-of-sequence (benchmarks)."
    )
    min_tokens: int = Field(
        0, ge=0, description="vLLM extension: no end-of-sequence before this many tokens."
    )
    safety: SafetyOptions = Field(
        default_factory=SafetyOptions,
        description="safesteer: safety steering for this request (mode, category weights).",
    )

    def min_completion_tokens(self, max_tokens: int) -> int:
        return max_tokens if self.ignore_eos else min(self.min_tokens, max_tokens)

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return [s for s in stops if s]

    def unsupported(self) -> list[tuple[str, str]]:
        """(field, reason) for each field set to something this server cannot honour."""
        found: list[tuple[str, str]] = []
        if self.logit_bias:
            found.append(("logit_bias", "logit biasing is not implemented"))
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                found.append((name, "only 0 is implemented"))
        return found


# ----- chat completions -------------------------------------------------------------------
class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: dict[str, Any] | None = None
    tool_choice: Any = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    parallel_tool_calls: bool | None = None
    top_logprobs: int | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def unsupported(self) -> list[tuple[str, str]]:
        found = super().unsupported()
        if self.tools or self.functions:
            param = "tools" if self.tools else "functions"
            found.append((param, "tool calling is not implemented"))
        if self.tool_choice not in (None, "none", "auto"):
            found.append(("tool_choice", "tool calling is not implemented"))
        if self.logprobs or self.top_logprobs:
            found.append(("logprobs", "log-probabilities are not implemented"))
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            found.append(("response_format", "only {'type': 'text'} is implemented"))
        for index, message in enumerate(self.messages):
            if message.role in ("tool", "function"):
                found.append((f"messages.{index}.role", "tool messages are not implemented"))
        return found


# ----- text completions -------------------------------------------------------------------
class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = Field(None, ge=1)
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    def token_limit(self) -> int | None:
        return self.max_tokens if "max_tokens" in self.model_fields_set else 16

    def unsupported(self) -> list[tuple[str, str]]:
        found = super().unsupported()
        if self.best_of not in (None, self.n):
            found.append(("best_of", "only best_of == n is implemented"))
        if self.echo:
            found.append(("echo", "echo is not implemented"))
        if self.logprobs is not None:
            found.append(("logprobs", "log-probabilities are not implemented"))
        if self.suffix:
            found.append(("suffix", "insertion (suffix) is not implemented"))
        return found


# ----- responses --------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SafetyReport(BaseModel):
    """What steering a response got: the model's family, adapter identity, mode, and the
    weight per category."""

    family: str = Field(description="Family id of the model that answered (e.g. llama-576x30).")
    adapter: str | None
    sha256: str | None
    mode: str
    strength: float
    categories: dict[str, float]
    fired: list[str] | None = Field(
        None, description="`gated` mode: the categories whose probes fired on the prompt."
    )


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    safety: SafetyReport


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    safety: SafetyReport | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    safety: SafetyReport | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "safesteer"
    family: str
    family_alias: str
    adapter: str | None
    context_length: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
