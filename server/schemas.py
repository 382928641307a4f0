"""Request and response models of the HTTP API (they are also its OpenAPI schema)."""

from __future__ import annotations

import math
import unicodedata
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from blending.accounting import ReuseReport

ModeName = Literal["auto", "dense", "naive", "blend", "anchor", "hybrid"]
MAX_DOCUMENT_ID_CHARS = 128


def _finite(value: Any) -> Any:
    """NaN and infinities are refused with a clear message (JSON bodies may carry ``NaN``/``Infinity``)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


Finite = BeforeValidator(_finite)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KVFuseOptions(_Strict):
    """Per-request reuse options."""

    mode: ModeName | None = Field(
        default=None,
        description="auto (default), dense (full prefill; neither reads nor writes the cache), naive, "
        "blend, anchor or hybrid",
    )
    recompute_ratio: Annotated[float | None, Finite] = Field(
        default=None, ge=0.0, le=1.0, description="share of cached tokens recomputed"
    )
    fidelity_target: Annotated[float | None, Finite] = Field(
        default=None, gt=0.0, le=1.0,
        description="auto only: share of answers that must equal a dense prefill's at the calibrated budget "
                    "(default: the service's setting)",
    )


class CacheControl(_Strict):
    type: Literal["ephemeral"] = "ephemeral"


class TextPart(_Strict):
    """A text content part; with ``cache_control`` it is a reusable chunk (cached position-independently)."""

    type: Literal["text"] = "text"
    text: str
    cache_control: CacheControl | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class Document(_Strict):
    id: str | int | None = Field(
        default=None,
        description=f"shown in the document's header (one line, at most {MAX_DOCUMENT_ID_CHARS} characters, "
        "no control characters); default: its 1-based position",
    )
    text: str

    @field_validator("id")
    @classmethod
    def _one_line(cls, v: str | int | None) -> str | int | None:
        if isinstance(v, str) and (
            len(v) > MAX_DOCUMENT_ID_CHARS or any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in v)
        ):
            raise ValueError(
                f"a document id is one line of at most {MAX_DOCUMENT_ID_CHARS} characters without control "
                "characters (newlines included)"
            )
        return v


class PromptRequest(BaseModel):
    """What every prompt-bearing request has: the model, documents and reuse options."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(default="default", description="the served model's name, or 'default'")
    documents: list[str | Document] | None = Field(
        default=None, description="rendered before the last user message, each document a reusable chunk"
    )
    kvfuse: KVFuseOptions | None = None


class SamplingFields(BaseModel):
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: Annotated[float, Finite] = Field(default=1.0, ge=0.0, le=2.0)
    top_p: Annotated[float, Finite] = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: Literal[1] = 1


_REFUSED = "not supported by kvfuse (the embedded model has no tool calling or constrained decoding); remove it"


class NoToolsOrFormats(BaseModel):
    """OpenAI fields kvfuse cannot honour: refused with a 400 rather than silently ignored. ``null``, an empty
    ``tools`` list, ``tool_choice: "none"`` and ``response_format: {"type": "text"}`` are what kvfuse does
    anyway, and accepted."""

    tools: list[Any] | None = Field(default=None, description="not supported: only null or [] is accepted")
    tool_choice: Any = Field(default=None, description='not supported: only null or "none" is accepted')
    functions: list[Any] | None = Field(default=None, description="not supported: only null or [] is accepted")
    function_call: Any = Field(default=None, description='not supported: only null or "none" is accepted')
    response_format: dict[str, Any] | None = Field(
        default=None, description='not supported: only null or {"type": "text"} is accepted'
    )

    @field_validator("tools", "tool_choice", "functions", "function_call", "response_format", mode="before")
    @classmethod
    def _refuse(cls, v: Any) -> Any:
        if v is None or v == [] or v == "none" or v == {"type": "text"}:
            return None
        raise ValueError(_REFUSED)


class ChatRequest(PromptRequest, SamplingFields, NoToolsOrFormats):
    """``POST /v1/chat/completions`` (OpenAI-compatible, plus ``documents`` and ``kvfuse``)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(PromptRequest, SamplingFields, NoToolsOrFormats):
    """``POST /v1/completions``: a plain prompt (no chat template), documents rendered before it."""

    prompt: str
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)


class LogprobsRequest(PromptRequest):
    """``POST /v1/logprobs``: teacher-forced log-probabilities of ``continuation`` after the prompt."""

    messages: list[ChatMessage] = Field(min_length=1)
    continuation: str = Field(min_length=1)
    top_logprobs: int = Field(default=5, ge=0, le=20)


class ChunksRequest(_Strict):
    """``POST /v1/chunks``: precompute and store the KV of ``texts``."""

    texts: list[str] = Field(min_length=1)
    prefix: str | None = Field(
        default=None,
        description="system prompt the chunks will follow (rendered by the chat template); "
        "null: the chat template's default system part, as for a chat without a system message",
    )
    raw_prefix: bool = Field(default=False, description="use `prefix` verbatim (e.g. '' for /v1/completions)")
    model: str = "default"


class PrefetchRequest(_Strict):
    keys: list[str] = Field(min_length=1)
    wait: bool = Field(default=False, description="wait for the promotion and report how many were found")


# -- responses --------------------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class KVFuseInfo(ReuseReport):
    """How the prompt's KV was obtained: the token accounting (``blending.accounting``; the counts add up to
    ``prompt_tokens``), the mode, TTFT from arrival (queue included) and the queue time apart."""


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    id: int | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    kvfuse: KVFuseInfo


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str
    logprobs: dict[str, Any] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    kvfuse: KVFuseInfo


class LogprobsResponse(BaseModel):
    object: Literal["logprobs"] = "logprobs"
    model: str
    tokens: list[TokenLogprob]
    usage: Usage
    kvfuse: KVFuseInfo


class ChunksResponse(BaseModel):
    keys: list[str]
    tokens: list[int]
    prefix_tokens: int


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
