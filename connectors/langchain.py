"""LangChain adapters (``pip install 'kvfuse[langchain]'``; langchain-core 1.x).

- :class:`ChatKVFuse`: a chat model backed by the kvfuse sidecar. Text parts with ``cache_control`` and
  the ``documents=`` call option go to the sidecar as reusable chunks; every ``AIMessage`` reports the
  reuse in ``response_metadata["kvfuse"]`` (mode, cached/reused tokens, TTFT) and
  ``usage_metadata["input_token_details"]["cache_read"]``. Sync, async and streaming.
- :class:`KVFuseWarmingRetriever`: wraps any retriever and warms the KV of the documents it returns
  (optionally in the background); warming failures are logged, retrieval always succeeds.
- :func:`documents_to_messages`: retrieved documents as one user message, one cacheable part each.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForLLMRun,
    CallbackManagerForRetrieverRun,
)
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage, HumanMessage
from langchain_core.messages.ai import InputTokenDetails, UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field, PrivateAttr, SecretStr

from connectors import client as kc
from connectors.client_warm import ChunkWarmer

_ROLES = {"system": "system", "human": "user", "ai": "assistant", "tool": "tool"}
_PASSTHROUGH = ("seed", "top_p", "max_completion_tokens", "logprobs", "top_logprobs")


def _part(block: Any) -> dict[str, Any]:
    if isinstance(block, str):
        return {"type": "text", "text": block}
    if isinstance(block, dict) and block.get("type") == "text":
        part: dict[str, Any] = {"type": "text", "text": block["text"]}
        if block.get("cache_control") or (block.get("extras") or {}).get("cache_control"):
            part["cache_control"] = dict(kc.CACHE_CONTROL)
        return part
    kind = block.get("type") if isinstance(block, dict) else type(block).__name__
    raise ValueError(f"kvfuse takes text content only, got a {kind!r} block")


def to_openai_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages -> OpenAI chat messages; text blocks keep their ``cache_control``."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role = m.role if isinstance(m, ChatMessage) else _ROLES.get(m.type)
        if role is None:
            raise ValueError(f"kvfuse cannot send a {m.type!r} message")
        content = m.content if isinstance(m.content, str) else [_part(b) for b in m.content]
        msg: dict[str, Any] = {"role": role, "content": content}
        if m.name:
            msg["name"] = m.name
        out.append(msg)
    return out


def documents_to_messages(docs: Sequence[Document | str]) -> list[BaseMessage]:
    """Retrieved documents as one user message: a ``Document [i]:`` header, then the document's text as a
    cacheable part (so each document is its own reusable chunk, in any order). For a
    ``MessagesPlaceholder`` in a prompt."""
    parts: list[str | dict[str, Any]] = []
    for i, doc in enumerate(docs, start=1):
        text = doc if isinstance(doc, str) else doc.page_content
        parts += [f"Document [{i}]:", kc.cacheable(text)]
    return [HumanMessage(content=parts)] if parts else []


def _usage(res_usage: dict[str, Any], info: kc.ReuseInfo) -> UsageMetadata:
    return UsageMetadata(
        input_tokens=res_usage["prompt_tokens"],
        output_tokens=res_usage["completion_tokens"],
        total_tokens=res_usage["total_tokens"],
        input_token_details=InputTokenDetails(cache_read=info.cached_tokens),
    )


def _metadata(info: kc.ReuseInfo, model: str, finish_reason: str | None) -> dict[str, Any]:
    return {
        "model_name": model,
        "model_provider": "kvfuse",
        "finish_reason": finish_reason,
        "kvfuse": info.as_dict(),
        "mode": info.mode,
        "cached_tokens": info.cached_tokens,
        "ttft_ms": info.ttft_ms,
    }


class ChatKVFuse(BaseChatModel):
    """Chat model served by a kvfuse sidecar (OpenAI-compatible API plus reusable chunks).

    Call options (``invoke(..., documents=[...], kvfuse={"mode": "dense"})`` or ``bind``): ``documents``
    (strings, dicts or ``Document`` s: each a reusable chunk), ``kvfuse`` (the request extension),
    ``mode``, ``recompute_ratio``, ``max_tokens``, ``temperature``, ``seed``, ``top_p``.
    """

    model_config = ConfigDict(populate_by_name=True, protected_namespaces=())

    base_url: str = Field(default_factory=kc.default_url)
    api_key: SecretStr | None = None
    model_name: str = Field(default="default", alias="model")
    max_tokens: int | None = 256
    temperature: float = 0.0
    stop: list[str] | None = None
    mode: str | None = None
    recompute_ratio: float | None = None
    timeout: float = 300.0
    streaming: bool = False
    _client: kc.KVFuseClient | None = PrivateAttr(default=None)

    @property
    def _llm_type(self) -> str:
        return "kvfuse"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "model_name": self.model_name, "mode": self.mode,
                "max_tokens": self.max_tokens, "temperature": self.temperature}  # fmt: skip

    def _key(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key else None

    @property
    def client(self) -> kc.KVFuseClient:
        """The sync sidecar client (created on first use)."""
        if self._client is None:
            self._client = kc.KVFuseClient(self.base_url, self._key(), self.timeout)
        return self._client

    def _options(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "model": self.model_name,
            "max_tokens": kwargs.get("max_tokens", self.max_tokens),
            "temperature": kwargs.get("temperature", self.temperature),
            "stop": stop or kwargs.get("stop") or self.stop,
            "mode": kwargs.get("mode", self.mode),
            "recompute_ratio": kwargs.get("recompute_ratio", self.recompute_ratio),
        }
        docs = kwargs.get("documents")
        if docs:
            opts["documents"] = [d.page_content if isinstance(d, Document) else d for d in docs]
        if kwargs.get("kvfuse"):
            opts["kvfuse"] = dict(kwargs["kvfuse"])
        opts.update({k: kwargs[k] for k in _PASSTHROUGH if k in kwargs})
        return opts

    @staticmethod
    def _result(res: kc.ChatResult) -> ChatResult:
        message = AIMessage(
            content=res.text,
            id=res.id,
            response_metadata=_metadata(res.kvfuse, res.model, res.finish_reason),
            usage_metadata=_usage(res.usage, res.kvfuse),
        )
        gen = ChatGeneration(message=message, generation_info={"finish_reason": res.finish_reason})
        return ChatResult(generations=[gen], llm_output={"model_name": res.model, "kvfuse": res.kvfuse.as_dict()})

    @staticmethod
    def _chunk(event: kc.StreamEvent, model: str) -> ChatGenerationChunk:
        if event.kvfuse is None or event.usage is None:
            return ChatGenerationChunk(message=AIMessageChunk(content=event.delta))
        message = AIMessageChunk(
            content=event.delta,
            response_metadata=_metadata(event.kvfuse, model, event.finish_reason),
            usage_metadata=_usage(event.usage, event.kvfuse),
            chunk_position="last",
        )
        return ChatGenerationChunk(message=message, generation_info={"finish_reason": event.finish_reason})

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._result(self.client.chat(to_openai_messages(messages), **self._options(stop, kwargs)))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        aclient = kc.AsyncKVFuseClient(self.base_url, self._key(), self.timeout)
        return self._result(await aclient.chat(to_openai_messages(messages), **self._options(stop, kwargs)))

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for event in self.client.stream_chat(to_openai_messages(messages), **self._options(stop, kwargs)):
            if not event.delta and event.kvfuse is None:
                continue
            chunk = self._chunk(event, self.model_name)
            if run_manager and event.delta:
                run_manager.on_llm_new_token(event.delta, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        aclient = kc.AsyncKVFuseClient(self.base_url, self._key(), self.timeout)
        async for event in aclient.stream_chat(to_openai_messages(messages), **self._options(stop, kwargs)):
            if not event.delta and event.kvfuse is None:
                continue
            chunk = self._chunk(event, self.model_name)
            if run_manager and event.delta:
                await run_manager.on_llm_new_token(event.delta, chunk=chunk)
            yield chunk


class KVFuseWarmingRetriever(BaseRetriever):
    """Wraps ``retriever``; warms the KV of every document it returns through the sidecar at ``base_url``
    (or the in-process ``engine``). ``system_prompt=None`` warms chunks standalone (hit by any chat);
    ``background=True`` returns the documents before warming finishes. Warming never raises."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    retriever: BaseRetriever
    base_url: str = Field(default_factory=kc.default_url)
    api_key: SecretStr | None = None
    engine: Any = None
    system_prompt: str | None = None
    namespace: str = "default"
    background: bool = False
    timeout: float = 60.0
    _warmer: ChunkWarmer | None = PrivateAttr(default=None)

    @property
    def warmer(self) -> ChunkWarmer:
        """The :class:`ChunkWarmer` (counts ``warmed`` / ``failures``; ``flush()`` waits for the background)."""
        if self._warmer is None:
            client = None
            if self.engine is None:
                key = self.api_key.get_secret_value() if self.api_key else None
                client = kc.KVFuseClient(self.base_url, key, self.timeout)
            self._warmer = ChunkWarmer(client, engine=self.engine, system_prompt=self.system_prompt,
                                       namespace=self.namespace, background=self.background)  # fmt: skip
        return self._warmer

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        docs = self.retriever.invoke(query, config={"callbacks": run_manager.get_child()})
        self.warmer.warm([d.page_content for d in docs])
        return docs

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun
    ) -> list[Document]:
        docs = await self.retriever.ainvoke(query, config={"callbacks": run_manager.get_child()})
        texts = [d.page_content for d in docs]
        if self.background:
            self.warmer.warm(texts)
        else:
            await asyncio.to_thread(self.warmer.warm, texts)
        return docs
