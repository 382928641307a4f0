"""Request and response models of the HTTP API (they are also its OpenAPI schema)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ModeName = Literal["auto", "dense", "naive", "blend", "anchor", "hybrid"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KVFuseOptions(_Strict):
    """Per-request reuse options."""

    mode: ModeName | None = Field(
        default=None,
        description="auto (default), dense (full prefill; neither reads nor writes the cache), naive, "
        "blend, anchor or hybrid",
    )
    recompute_ratio: float | None = Field(default=None, ge=0.0, le=1.0, description="share of cached tokens recomputed")


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
    id: str | int | None = None
    text: str


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
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: Literal[1] = 1


class ChatRequest(PromptRequest, SamplingFields):
    """``POST /v1/chat/completions`` (OpenAI-compatible, plus ``documents`` and ``kvfuse``)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(PromptRequest, SamplingFields):
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


class KVFuseInfo(BaseModel):
    """How the prompt's KV was obtained."""

    mode: str
    requested_mode: str
    fallback_reason: str | None
    ttft_ms: float
    prompt_tokens: int
    cached_tokens: int
    reused_tokens: int
    recomputed_tokens: int
    computed_tokens: int
    chunk_hits: int
    chunk_misses: int


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
