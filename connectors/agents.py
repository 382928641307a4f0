"""Multi-agent context sharing, framework-free: mark the context that several agents see as cacheable.

In a multi-agent pipeline every agent wraps the same question, the other agents' messages and tool
outputs in its own system prompt. kvfuse reuses such text when it arrives as cacheable content parts,
and :class:`SharedContext` also warms each new shared text once, *standalone*, so the next agent hits it
whatever its system prompt. Use it with any OpenAI-compatible client::

    ctx = SharedContext(KVFuseClient("http://127.0.0.1:8000"))
    openai_client.chat.completions.create(
        model="default", messages=ctx.openai(messages), extra_body=kvfuse_extra_body(mode="auto"))

LangChain agent middleware and LangGraph helpers are in ``connectors.agents_langchain``.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from connectors.client import CACHE_CONTROL, KVFuseClient, kvfuse_options
from connectors.client_warm import ChunkWarmer

SHARED_ROLES = ("user", "assistant", "tool")
MIN_CHARS = 32  # shorter text is below the sidecar's minimum chunk size (8 tokens) anyway


def kvfuse_extra_body(mode: str | None = None, recompute_ratio: float | None = None) -> dict[str, Any]:
    """``extra_body`` for OpenAI SDKs: the ``kvfuse`` request extension (empty when both are defaults)."""
    opts = kvfuse_options(mode, recompute_ratio)
    return {"kvfuse": opts} if opts else {}


def _mark_parts(content: Any, min_chars: int) -> Any:
    """String or list content -> parts with ``cache_control`` on each text part of ``min_chars`` or more."""
    if isinstance(content, str):
        return (
            [{"type": "text", "text": content, "cache_control": dict(CACHE_CONTROL)}]
            if len(content) >= min_chars
            else content
        )
    if not isinstance(content, list):
        return content
    out = []
    for part in content:
        if isinstance(part, str):
            part = {"type": "text", "text": part}
        if isinstance(part, dict) and part.get("type") == "text" and len(part.get("text", "")) >= min_chars:
            part = {**part, "cache_control": part.get("cache_control") or dict(CACHE_CONTROL)}
        out.append(part)
    return out


def share_openai_messages(
    messages: Sequence[dict[str, Any]], roles: Sequence[str] = SHARED_ROLES, min_chars: int = MIN_CHARS
) -> list[dict[str, Any]]:
    """Copies of OpenAI chat ``messages`` whose shared context (messages of ``roles``: the question, other
    agents' replies, tool outputs) is cacheable. System prompts stay plain: they are each agent's prefix."""
    out = []
    for m in messages:
        m = copy.deepcopy(dict(m))
        if m.get("role") in roles and m.get("content") is not None:
            m["content"] = _mark_parts(m["content"], min_chars)
        out.append(m)
    return out


def cacheable_texts(messages: Iterable[dict[str, Any]]) -> list[str]:
    """The texts of all parts marked with ``cache_control``."""
    return [
        p["text"]
        for m in messages
        if isinstance(m.get("content"), list)
        for p in m["content"]
        if isinstance(p, dict) and p.get("cache_control") and p.get("text")
    ]


class SharedContext:
    """Marks shared context and warms every new shared text once through ``client`` (standalone KV, hit
    by every agent). Without a client it only marks (the sidecar then reuses parts seen before under the
    same system prompt). Thread-safe; remembers the last ``remember`` texts it warmed."""

    def __init__(
        self,
        client: KVFuseClient | None = None,
        *,
        warm: bool = True,
        background: bool = False,
        roles: Sequence[str] = SHARED_ROLES,
        min_chars: int = MIN_CHARS,
        remember: int = 4096,
    ) -> None:
        self.roles, self.min_chars, self.warm_enabled, self.background = tuple(roles), min_chars, warm, background
        self.remember = remember
        self.warmer: ChunkWarmer | None = None
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        if client is not None:
            self.attach(client)

    def attach(self, client: KVFuseClient) -> None:
        """Warm through ``client`` from now on (no-op when a client is attached already)."""
        if self.warmer is None and self.warm_enabled:
            self.warmer = ChunkWarmer(client, background=self.background)

    def openai(self, messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """:func:`share_openai_messages`, then warm the shared texts not warmed before."""
        marked = share_openai_messages(messages, self.roles, self.min_chars)
        self.warm(cacheable_texts(marked))
        return marked

    def warm(self, texts: Iterable[str]) -> None:
        """Warm the texts this context has not warmed yet (failures are logged and retried next time)."""
        if self.warmer is None:
            return
        with self._lock:
            new = [t for t in dict.fromkeys(texts) if t not in self._seen]
        if not new:
            return
        keys = self.warmer.warm(new)
        if keys is None or len(keys) == len(new):  # background, or done: remember them
            with self._lock:
                for t in new:
                    self._seen[t] = None
                while len(self._seen) > self.remember:
                    self._seen.popitem(last=False)
