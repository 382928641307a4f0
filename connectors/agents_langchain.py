"""Shared multi-agent context for LangChain agents and LangGraph graphs (``pip install 'kvfuse[langchain]'``).

- :class:`KVFuseContextMiddleware`: ``create_agent(..., middleware=[KVFuseContextMiddleware()])``; its
  ``wrap_model_call`` marks the shared context of every model call (the question, other agents' messages,
  tool outputs) as cacheable parts, warms new shared texts once, and sets the ``kvfuse`` options.
- :func:`with_shared_context`: the same for a LangGraph node's model, as a runnable
  (``with_shared_context(ChatKVFuse(...), ctx).invoke(messages)``); share one :class:`SharedContext`
  between the nodes of a graph.
- :func:`mark_shared_messages`: the marking alone, on LangChain messages.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

from langchain.agents.middleware import AgentMiddleware, ModelRequest, ModelResponse
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AnyMessage, BaseMessage, convert_to_messages
from langchain_core.prompt_values import PromptValue
from langchain_core.runnables import Runnable, RunnableLambda

from connectors.agents import MIN_CHARS, SHARED_ROLES, SharedContext, _mark_parts
from connectors.client import KVFuseClient, kvfuse_options
from connectors.langchain import ChatKVFuse, to_openai_messages

_ROLES = {"human": "user", "ai": "assistant", "tool": "tool", "system": "system"}


def mark_shared_messages(
    messages: Sequence[BaseMessage], roles: Sequence[str] = SHARED_ROLES, min_chars: int = MIN_CHARS
) -> list[BaseMessage]:
    """Copies of ``messages`` whose shared context (messages of OpenAI ``roles``) is in cacheable text parts;
    tool calls, names and ids are kept."""
    out = []
    for m in messages:
        if _ROLES.get(m.type, getattr(m, "role", None)) in roles and m.content:
            m = m.model_copy(update={"content": _mark_parts(m.content, min_chars)})
        out.append(m)
    return out


def _share(context: SharedContext, messages: Sequence[BaseMessage]) -> list[BaseMessage]:
    marked = mark_shared_messages(messages, context.roles, context.min_chars)
    context.warm(t for m in to_openai_messages(marked) if isinstance(m["content"], list) for t in _texts(m))
    return marked


def _texts(message: dict[str, Any]) -> list[str]:
    return [p["text"] for p in message["content"] if p.get("cache_control")]


def _client_of(model: Any) -> KVFuseClient | None:
    return model.client if isinstance(model, ChatKVFuse) else None


class KVFuseContextMiddleware(AgentMiddleware):
    """Agent middleware: shared context as cacheable parts (warmed once, through ``client`` or the agent's
    :class:`ChatKVFuse` model), plus the ``kvfuse`` options ``mode`` / ``recompute_ratio``. Pass one
    ``context`` to the middleware of several agents to warm each shared text only once."""

    def __init__(
        self,
        client: KVFuseClient | None = None,
        *,
        context: SharedContext | None = None,
        mode: str | None = None,
        recompute_ratio: float | None = None,
        warm: bool = True,
    ) -> None:
        super().__init__()
        self.context = context or SharedContext(client, warm=warm)
        self.options = kvfuse_options(mode, recompute_ratio)

    def _prepare(self, request: ModelRequest) -> ModelRequest:
        client = _client_of(request.model)
        if client is not None:
            self.context.attach(client)
        settings = dict(request.model_settings)
        if self.options:
            settings["kvfuse"] = {**settings.get("kvfuse", {}), **self.options}
        messages = cast("list[AnyMessage]", _share(self.context, request.messages))
        return request.override(messages=messages, model_settings=settings)

    def wrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]
    ) -> ModelResponse | AIMessage:
        return handler(self._prepare(request))

    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[ModelResponse]]
    ) -> ModelResponse | AIMessage:
        return await handler(await asyncio.to_thread(self._prepare, request))


def with_shared_context(
    model: BaseChatModel,
    context: SharedContext | None = None,
    *,
    mode: str | None = None,
    recompute_ratio: float | None = None,
) -> Runnable[LanguageModelInput, BaseMessage]:
    """``model`` behind a step that marks (and warms) the shared context of its input messages; for the
    nodes of a LangGraph graph. A :class:`ChatKVFuse` model's client is used for warming."""
    ctx = context or SharedContext()
    client = _client_of(model)
    if client is not None:
        ctx.attach(client)

    def share(value: LanguageModelInput) -> list[BaseMessage]:
        if isinstance(value, PromptValue):
            messages = value.to_messages()
        elif isinstance(value, str):
            messages = convert_to_messages([value])
        else:
            messages = convert_to_messages(value)
        return _share(ctx, messages)

    opts = kvfuse_options(mode, recompute_ratio)
    bound: Runnable[Any, BaseMessage] = model.bind(kvfuse=opts) if opts else model
    return RunnableLambda(share, name="kvfuse_shared_context") | bound
