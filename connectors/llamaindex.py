"""LlamaIndex adapters (``pip install 'kvfuse[llamaindex]'``; llama-index-core 0.14.x).

- :class:`KVFuseLLM`: a ``CustomLLM`` backed by the kvfuse sidecar (complete, stream_complete, chat,
  stream_chat). Chat messages keep their chunk structure: a ``TextBlock`` followed by a ``CachePoint`` is
  a reusable chunk. Texts registered with :meth:`KVFuseLLM.add_chunks` (the postprocessor does it) are
  cut out of any prompt they appear in on their own lines, so the query engines' formatted context
  reuses node KV; the prompt text itself is unchanged. Reuse is in ``additional_kwargs["kvfuse"]``.
- :class:`KVFuseWarmingPostprocessor`: put it last in ``node_postprocessors`` (after rerankers) to warm
  the KV of the final nodes, exactly as they are rendered into the prompt; it never fails the query.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import Any

from llama_index.core.base.llms.types import (
    CachePoint,
    ChatMessage,
    ChatResponse,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle
from pydantic import Field, PrivateAttr

from connectors import client as kc
from connectors.client_warm import ChunkWarmer

_ROLES = {"developer": "system", "chatbot": "assistant", "model": "assistant", "function": "tool"}
_OPTIONS = ("max_tokens", "temperature", "stop", "mode", "recompute_ratio", "documents", "kvfuse", "seed", "top_p")


def split_known(text: str, known: Iterable[str]) -> list[dict[str, Any]]:
    """``text`` as content parts where every occurrence of a ``known`` text on its own line(s) is a
    cacheable part. The sidecar joins parts with ``"\\n"``: one newline on each side of a chunk is dropped
    from the neighbouring text, so the joined prompt equals ``text``."""
    spans: list[tuple[int, int]] = []
    for chunk in sorted(set(known), key=len, reverse=True):
        start = 0
        while (i := text.find(chunk, start)) >= 0:
            end, start = i + len(chunk), i + 1
            lined = (i == 0 or text[i - 1] == "\n") and (end == len(text) or text[end] == "\n")
            if lined and not any(i < e and s < end for s, e in spans):
                spans.append((i, end))
    if not spans:
        return [{"type": "text", "text": text}]
    spans.sort()
    gaps = [text[: spans[0][0]], *(text[e:s] for (_, e), (s, _) in pairwise(spans))]
    gaps.append(text[spans[-1][1] :])
    parts: list[dict[str, Any]] = []
    for i, gap in enumerate(gaps):
        first, last = i == 0, i == len(gaps) - 1
        if gap and not (gap == "\n" and not first and not last):  # a lone "\n" between chunks is the separator
            parts.append({"type": "text", "text": gap[0 if first else 1 : len(gap) - (0 if last else 1)]})
        if not last:
            parts.append(kc.cacheable(text[spans[i][0] : spans[i][1]]))
    return parts


class KVFuseLLM(CustomLLM):
    """LlamaIndex LLM served by a kvfuse sidecar. Call options (``complete(prompt, documents=[...],
    mode="dense")``): ``documents``, ``mode``, ``recompute_ratio``, ``kvfuse``, ``max_tokens``, ``stop``."""

    base_url: str = Field(default_factory=kc.default_url)
    api_key: str | None = None
    model_name: str = "default"
    max_tokens: int = 256
    temperature: float = 0.0
    context_window: int = 8192
    mode: str | None = None
    recompute_ratio: float | None = None
    timeout: float = 300.0
    max_known_chunks: int = 4096
    _client: kc.KVFuseClient | None = PrivateAttr(default=None)
    _known: OrderedDict[str, None] = PrivateAttr(default_factory=OrderedDict)
    _last: kc.ReuseInfo | None = PrivateAttr(default=None)

    @classmethod
    def class_name(cls) -> str:
        return "kvfuse_llm"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self.context_window, num_output=self.max_tokens, is_chat_model=True,
                           model_name=self.model_name)  # fmt: skip

    @property
    def client(self) -> kc.KVFuseClient:
        if self._client is None:
            self._client = kc.KVFuseClient(self.base_url, self.api_key, self.timeout)
        return self._client

    @property
    def last_reuse(self) -> kc.ReuseInfo | None:
        """The ``kvfuse`` block of the most recent response."""
        return self._last

    def add_chunks(self, texts: Iterable[str]) -> None:
        """Register texts to send as reusable chunks wherever they appear on their own lines in a prompt."""
        for t in texts:
            if len(t) >= 16:
                self._known[t] = None
                self._known.move_to_end(t)
        while len(self._known) > self.max_known_chunks:
            self._known.popitem(last=False)

    def _text(self, text: str) -> list[dict[str, Any]]:
        return split_known(text, self._known)

    def _messages(self, messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for m in messages:
            role = _ROLES.get(m.role.value, m.role.value)
            parts: list[dict[str, Any]] = []
            for block in m.blocks:
                if isinstance(block, TextBlock):
                    parts += self._text(block.text)
                elif isinstance(block, CachePoint):
                    if parts:
                        parts[-1]["cache_control"] = dict(kc.CACHE_CONTROL)
                else:
                    raise ValueError(f"kvfuse takes text content only, got a {block.block_type!r} block")
            out.append({"role": role, "content": parts})
        return out

    def _options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        opts: dict[str, Any] = {"model": self.model_name, "max_tokens": self.max_tokens,
                                "temperature": self.temperature, "mode": self.mode,
                                "recompute_ratio": self.recompute_ratio}  # fmt: skip
        opts.update({k: kwargs[k] for k in _OPTIONS if k in kwargs})
        return opts

    def _extra(self, info: kc.ReuseInfo | None, usage: dict[str, Any] | None) -> dict[str, Any]:
        self._last = info
        if info is None:
            return {}
        return {"kvfuse": info.as_dict(), "usage": usage, "cached_tokens": info.cached_tokens, "mode": info.mode}

    def _chat(self, messages: list[dict[str, Any]], kwargs: dict[str, Any]) -> kc.ChatResult:
        res = self.client.chat(messages, **self._options(kwargs))
        self._extra(res.kvfuse, res.usage)
        return res

    def _stream(self, messages: list[dict[str, Any]], kwargs: dict[str, Any]) -> Iterable[tuple[str, str, dict]]:
        text = ""
        for event in self.client.stream_chat(messages, **self._options(kwargs)):
            if event.delta or event.kvfuse is not None:
                text += event.delta
                yield text, event.delta, self._extra(event.kvfuse, event.usage) if event.kvfuse else {}

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        res = self._chat([{"role": "user", "content": self._text(prompt)}], kwargs)
        return CompletionResponse(text=res.text, raw=res.raw, additional_kwargs=self._extra(res.kvfuse, res.usage))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        messages = [{"role": "user", "content": self._text(prompt)}]
        for text, delta, extra in self._stream(messages, kwargs):
            yield CompletionResponse(text=text, delta=delta, additional_kwargs=extra)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        res = self._chat(self._messages(messages), kwargs)
        message = ChatMessage(role=MessageRole.ASSISTANT, content=res.text)
        return ChatResponse(message=message, raw=res.raw, additional_kwargs=self._extra(res.kvfuse, res.usage))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        for text, delta, extra in self._stream(self._messages(messages), kwargs):
            message = ChatMessage(role=MessageRole.ASSISTANT, content=text)
            yield ChatResponse(message=message, delta=delta, additional_kwargs=extra)


class KVFuseWarmingPostprocessor(BaseNodePostprocessor):
    """Warms the KV of the nodes it receives (their ``metadata_mode`` content, as the prompt shows them)
    through the sidecar at ``base_url`` or the in-process ``engine``, and registers them with ``llm``.
    Returns the nodes unchanged; warming failures are logged, never raised."""

    base_url: str = Field(default_factory=kc.default_url)
    api_key: str | None = None
    engine: Any = None
    system_prompt: str | None = None
    namespace: str = "default"
    background: bool = False
    metadata_mode: MetadataMode = MetadataMode.LLM
    llm: KVFuseLLM | None = None
    timeout: float = 60.0
    _warmer: ChunkWarmer | None = PrivateAttr(default=None)

    @classmethod
    def class_name(cls) -> str:
        return "KVFuseWarmingPostprocessor"

    @property
    def warmer(self) -> ChunkWarmer:
        if self._warmer is None:
            client = kc.KVFuseClient(self.base_url, self.api_key, self.timeout) if self.engine is None else None
            self._warmer = ChunkWarmer(client, engine=self.engine, system_prompt=self.system_prompt,
                                       namespace=self.namespace, background=self.background)  # fmt: skip
        return self._warmer

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        texts = [n.node.get_content(metadata_mode=self.metadata_mode) for n in nodes]
        self.warmer.warm(texts)
        if self.llm is not None:
            self.llm.add_chunks(texts)
        return nodes
