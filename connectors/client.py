"""A small typed HTTP client for the kvfuse sidecar, used by the framework adapters.

``KVFuseClient`` (sync) and ``AsyncKVFuseClient`` cover chat completions (documents, cacheable content
parts, the ``kvfuse`` extension, SSE streaming), teacher-forced ``/v1/logprobs``, chunk warming
(``/v1/chunks``), ``/v1/stats`` and ``/healthz``. Transport failures raise :class:`KVFuseConnectionError`,
API errors :class:`KVFuseAPIError` (the server's ``{"error": {...}}`` body, parsed).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from blending.accounting import ReuseReport

DEFAULT_URL = "http://127.0.0.1:8000"


def default_url() -> str:
    """``$KVFUSE_URL`` (read at each call), else :data:`DEFAULT_URL`."""
    return os.environ.get("KVFUSE_URL") or DEFAULT_URL


def default_api_key() -> str | None:
    """``$KVFUSE_API_KEY`` (read at each call), as ``kvfuse stats``/``warm`` read it; ``None`` when unset."""
    return os.environ.get("KVFUSE_API_KEY") or None
CACHE_CONTROL = {"type": "ephemeral"}
Message = dict[str, Any]
DocumentLike = str | Mapping[str, Any]


class KVFuseError(RuntimeError):
    """Base class of the client's errors."""


class KVFuseConnectionError(KVFuseError):
    """The sidecar could not be reached (refused, timed out, DNS, broken connection)."""


class KVFuseAPIError(KVFuseError):
    """The sidecar answered with an error status."""

    def __init__(self, status: int, message: str, type_: str = "", param: str | None = None) -> None:
        super().__init__(f"kvfuse API error {status} ({type_ or 'error'}): {message}")
        self.status, self.message, self.type, self.param = status, message, type_, param


class ReuseInfo(ReuseReport):
    """The response's ``kvfuse`` block: how the prompt's KV was obtained. The service's own model
    (``blending.accounting.ReuseReport``): token counts that add up to ``prompt_tokens`` (checked on
    parsing), ``cached_tokens`` derived from them, the mode, TTFT and queue time."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReuseInfo:
        return cls.model_validate(dict(d))

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump()


@dataclass(frozen=True)
class ChatResult:
    """A non-streamed chat completion."""

    id: str
    text: str
    finish_reason: str
    usage: dict[str, Any]
    kvfuse: ReuseInfo
    model: str
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> ChatResult:
        choice = body["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        info = ReuseInfo.from_dict(body["kvfuse"])
        return cls(body["id"], text, choice["finish_reason"], body["usage"], info, body["model"], dict(body))


@dataclass(frozen=True)
class StreamEvent:
    """One SSE event of a streamed completion; the last one has ``finish_reason``, ``usage`` and ``kvfuse``."""

    delta: str
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    kvfuse: ReuseInfo | None = None


def cacheable(text: str) -> dict[str, Any]:
    """A content part that kvfuse caches as a position-independent chunk."""
    return {"type": "text", "text": text, "cache_control": dict(CACHE_CONTROL)}


def kvfuse_options(mode: str | None = None, recompute_ratio: float | None = None) -> dict[str, Any] | None:
    """The ``kvfuse`` request extension, or None when both are defaults."""
    opts = {k: v for k, v in (("mode", mode), ("recompute_ratio", recompute_ratio)) if v is not None}
    return opts or None


def chat_body(
    messages: Sequence[Message],
    *,
    documents: Sequence[DocumentLike] | None = None,
    model: str = "default",
    max_tokens: int | None = None,
    temperature: float = 0.0,
    stop: Sequence[str] | None = None,
    mode: str | None = None,
    recompute_ratio: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The JSON body of ``/v1/chat/completions`` (and, with ``continuation``, of ``/v1/logprobs``)."""
    body: dict[str, Any] = {"model": model, "messages": list(messages), "temperature": temperature, **extra}
    if documents:
        body["documents"] = [d if isinstance(d, str) else dict(d) for d in documents]
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if stop:
        body["stop"] = list(stop)
    opts = kvfuse_options(mode, recompute_ratio)
    if opts:
        body["kvfuse"] = {**body.get("kvfuse", {}), **opts}
    return body


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        err = response.json()["error"]
        raise KVFuseAPIError(response.status_code, err["message"], err.get("type", ""), err.get("param"))
    except (ValueError, KeyError, TypeError):
        raise KVFuseAPIError(response.status_code, response.text[:500] or response.reason_phrase) from None


def _parse_sse(line: str) -> StreamEvent | None:
    """A ``data: {...}`` line -> event (None for ``[DONE]``, comments and blank lines)."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    obj = json.loads(line[len("data: ") :])
    choice = obj["choices"][0]
    delta = choice.get("delta", {}).get("content") if "delta" in choice else choice.get("text")
    info = obj.get("kvfuse")
    return StreamEvent(
        delta or "", choice.get("finish_reason"), obj.get("usage"), ReuseInfo.from_dict(info) if info else None
    )


class _Base:
    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 300.0) -> None:
        """``base_url`` and ``api_key`` default to ``$KVFUSE_URL`` and ``$KVFUSE_API_KEY``."""
        self.base_url = (base_url or default_url()).rstrip("/")
        self.api_key = api_key if api_key is not None else default_api_key()
        self.timeout = timeout

    def _kwargs(self) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return {"base_url": self.base_url, "headers": headers, "timeout": self.timeout}

    def _unreachable(self, exc: httpx.TransportError) -> KVFuseConnectionError:
        return KVFuseConnectionError(
            f"kvfuse sidecar at {self.base_url} is unreachable ({type(exc).__name__}: {exc}); "
            "is `kvfuse serve` running there?"
        )


class KVFuseClient(_Base):
    """Synchronous client (thread-safe; one pooled ``httpx.Client``)."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 300.0) -> None:
        super().__init__(base_url, api_key, timeout)
        self._http = httpx.Client(**self._kwargs())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> KVFuseClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, json_body: Any = None) -> Any:
        """One JSON request; returns the decoded body."""
        try:
            response = self._http.request(method, path, json=json_body)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        _raise_for(response)
        return response.json()

    def chat(self, messages: Sequence[Message], **options: Any) -> ChatResult:
        """``POST /v1/chat/completions``; ``options`` as :func:`chat_body`."""
        return ChatResult.from_json(self.request("POST", "/v1/chat/completions", chat_body(messages, **options)))

    def stream_chat(self, messages: Sequence[Message], **options: Any) -> Iterator[StreamEvent]:
        """Streamed chat completion: one event per text delta, the last one with usage and ``kvfuse``."""
        body = {**chat_body(messages, **options), "stream": True}
        try:
            with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for(response)
                for line in response.iter_lines():
                    event = _parse_sse(line)
                    if event is not None:
                        yield event
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def logprobs(self, messages: Sequence[Message], continuation: str, top_logprobs: int = 5, **options: Any) -> Any:
        """Teacher-forced ``/v1/logprobs`` of ``continuation`` (the full response body)."""
        body = {**chat_body(messages, **options), "continuation": continuation, "top_logprobs": top_logprobs}
        return self.request("POST", "/v1/logprobs", body)

    def warm(self, texts: Sequence[str], prefix: str | None = None, raw_prefix: bool = False) -> dict[str, Any]:
        """``POST /v1/chunks``: precompute the texts' KV after the chat prefix of system prompt ``prefix``
        (``raw_prefix``: ``prefix`` verbatim; ``""`` stores them standalone, reusable after any prefix)."""
        return dict(
            self.request("POST", "/v1/chunks", {"texts": list(texts), "prefix": prefix, "raw_prefix": raw_prefix})
        )

    def stats(self) -> dict[str, Any]:
        return dict(self.request("GET", "/v1/stats"))

    def health(self) -> dict[str, Any]:
        return dict(self.request("GET", "/healthz"))

    def wait_writebacks(self, timeout_s: float = 120.0) -> None:
        """Block until the sidecar has stored the KV computed by earlier requests (background writebacks)."""
        deadline = time.monotonic() + timeout_s
        while self.stats()["writeback_pending"]:
            if time.monotonic() > deadline:
                raise KVFuseError(f"writebacks still pending after {timeout_s} s")
            time.sleep(0.05)


class AsyncKVFuseClient(_Base):
    """Asynchronous client; a fresh ``httpx.AsyncClient`` per call, so it works from any event loop."""

    async def request(self, method: str, path: str, json_body: Any = None) -> Any:
        try:
            async with httpx.AsyncClient(**self._kwargs()) as http:
                response = await http.request(method, path, json=json_body)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        _raise_for(response)
        return response.json()

    async def chat(self, messages: Sequence[Message], **options: Any) -> ChatResult:
        body = await self.request("POST", "/v1/chat/completions", chat_body(messages, **options))
        return ChatResult.from_json(body)

    async def stream_chat(self, messages: Sequence[Message], **options: Any) -> AsyncIterator[StreamEvent]:
        body = {**chat_body(messages, **options), "stream": True}
        try:
            async with (
                httpx.AsyncClient(**self._kwargs()) as http,
                http.stream("POST", "/v1/chat/completions", json=body) as response,
            ):
                if response.status_code >= 400:
                    await response.aread()
                    _raise_for(response)
                async for line in response.aiter_lines():
                    event = _parse_sse(line)
                    if event is not None:
                        yield event
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    async def warm(self, texts: Sequence[str], prefix: str | None = None, raw_prefix: bool = False) -> dict[str, Any]:
        body = {"texts": list(texts), "prefix": prefix, "raw_prefix": raw_prefix}
        return dict(await self.request("POST", "/v1/chunks", body))

    async def stats(self) -> dict[str, Any]:
        return dict(await self.request("GET", "/v1/stats"))
