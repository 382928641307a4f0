"""OpenAI-compatible routes: chat completions, completions, models, and teacher-forced logprobs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, BackgroundTasks, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from blending.decode import SamplingParams
from blending.engine import PrefillResult
from blending.planner import PromptSegment
from server import generation as gen
from server.auth import TenantDep
from server.errors import APIError
from server.input_checks import refuse_lone_surrogates
from server.render import Chunk, Message, Piece, RenderError, document_pieces
from server.schemas import (
    ChatChoice,
    ChatCompletion,
    ChatMessageOut,
    ChatRequest,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Document,
    ErrorResponse,
    LogprobsRequest,
    LogprobsResponse,
    TokenLogprob,
)
from server.state import ServerState, StateDep

router = APIRouter(tags=["openai"], dependencies=[Depends(refuse_lone_surrogates)])
ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413)}


def _documents(state: ServerState, docs: list[str | Document] | None) -> list[tuple[str | None, str]]:
    docs = docs or []
    if len(docs) > state.settings.limits.max_documents:
        raise APIError(
            400,
            f"{len(docs)} documents; the limit is {state.settings.limits.max_documents}",
            "documents",
            "too_many_documents",
        )
    return [(None, d) if isinstance(d, str) else (None if d.id is None else str(d.id), d.text) for d in docs]


def chat_segments(state: ServerState, body: ChatRequest | LogprobsRequest) -> list[PromptSegment]:
    """Messages (+ documents before the last user message's text) -> segments via the chat template."""
    messages: list[Message] = []
    for m in body.messages:
        pieces: list[Piece] = []
        if isinstance(m.content, str):
            pieces.append(m.content)
        elif m.content is not None:
            for i, part in enumerate(m.content):
                pieces += (["\n"] if i else []) + [Chunk(part.text) if part.cache_control else part.text]
        messages.append(Message("system" if m.role == "developer" else m.role, tuple(pieces)))
    docs = _documents(state, body.documents)
    if docs:
        last = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
        if last is None:
            raise APIError(400, "documents need a user message to go into", "documents")
        target = messages[last]
        messages[last] = Message(target.role, (*document_pieces(docs), *target.pieces))
    try:
        return state.renderer.chat(messages)
    except RenderError as exc:
        raise APIError(400, str(exc), "messages") from exc


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _token_events(
    state: ServerState,
    result: PrefillResult,
    params: SamplingParams,
    stop: list[str],
    top: int | None,
    frame: Callable[[str, TokenLogprob | None, str | None], dict[str, Any]],
    requested: str,
) -> AsyncIterator[str]:
    """SSE events: one per emitted piece of text, a final one with finish_reason/usage/kvfuse."""
    steps = gen.decode_steps(state, result, params)
    text = gen.TextAssembler(state.engine.tokenizer, stop)
    finish, n = "length", 0
    while True:
        step = await run_in_threadpool(next, steps, None)
        if step is None:
            break
        token, logits = step
        if token in params.stop_token_ids:
            finish = "stop"
            break
        n += 1
        lp = gen.token_logprob(state.engine.tokenizer, logits, token, top) if top is not None else None
        delta = text.add(token)
        if delta or lp is not None:
            yield _sse(frame(delta, lp, None))
        if text.stopped:
            finish = "stop"
            break
    last = frame(text.flush(), None, finish)
    last["usage"] = gen.usage(result, n).model_dump()
    last["kvfuse"] = gen.kvfuse_info(result, requested).model_dump()
    yield _sse(last)


async def _stream(state: ServerState, result: PrefillResult, requested: str,
                  events: AsyncIterator[str]) -> AsyncIterator[str]:
    """``events`` (:func:`_token_events`), then [DONE]. A failure after the stream started ends it with an
    error event (``{"error": {...}}``, see :func:`server.generation.stream_error`) before [DONE]. The
    writeback is scheduled when the stream ends, also when it failed or the client went away."""
    task = state.writeback_task(result, requested)
    try:
        try:
            async for event in events:
                yield event
        except Exception as exc:  # not a client gone away (GeneratorExit, cancellation): that ends the stream
            yield _sse(gen.stream_error(exc, result.namespace))
        yield "data: [DONE]\n\n"
    finally:
        asyncio.get_running_loop().run_in_executor(None, task)


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS)
async def chat_completions(
    body: ChatRequest,
    request: Request,
    background: BackgroundTasks,
    tenant_name: TenantDep,
    state: StateDep,
) -> Any:
    """OpenAI chat completions; content parts with ``cache_control`` and ``documents`` are reused chunks."""
    gen.check_model(state, body.model)
    params = gen.sampling(state, body.max_completion_tokens or body.max_tokens, body.temperature, body.top_p, body.seed)
    stop = gen.stop_list(body.stop)
    top = (body.top_logprobs or 0) if body.logprobs else None
    segments = await run_in_threadpool(chat_segments, state, body)
    result = await gen.prefill(request, state, segments, tenant_name, body.kvfuse)
    requested = request.state.requested_mode
    rid, created = gen.new_id("chatcmpl")
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name}
    if body.stream:

        def frame(delta: str, lp: TokenLogprob | None, finish: str | None) -> dict[str, Any]:
            logprobs = {"content": [lp.model_dump()]} if lp is not None else None
            choice = {"index": 0, "delta": {"content": delta}, "finish_reason": finish, "logprobs": logprobs}
            return {**head, "choices": [choice]}

        async def events() -> AsyncIterator[str]:
            role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            yield _sse({**head, "choices": [role]})
            tokens = _token_events(state, result, params, stop, top, frame, requested)
            async for event in _stream(state, result, requested, tokens):
                yield event

        return StreamingResponse(events(), media_type="text/event-stream")
    out = await run_in_threadpool(gen.generate_all, state, result, params, stop, top)
    background.add_task(state.writeback_task(result, requested))
    logprobs = ChoiceLogprobs(content=out.logprobs) if out.logprobs is not None else None
    return ChatCompletion(
        id=rid,
        created=created,
        model=state.model_name,
        choices=[
            ChatChoice(message=ChatMessageOut(content=out.text), finish_reason=out.finish_reason, logprobs=logprobs)
        ],
        usage=gen.usage(result, len(out.token_ids)),
        kvfuse=gen.kvfuse_info(result, requested),
    )


def _legacy_logprobs(lps: list[TokenLogprob]) -> dict[str, Any]:
    offsets, pos = [], 0
    for lp in lps:
        offsets.append(pos)
        pos += len(lp.token)
    return {
        "tokens": [lp.token for lp in lps],
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{t.token: t.logprob for t in lp.top_logprobs} for lp in lps],
        "text_offset": offsets,
    }


@router.post("/v1/completions", response_model=Completion, responses=ERRORS)
async def completions(
    body: CompletionRequest,
    request: Request,
    background: BackgroundTasks,
    tenant_name: TenantDep,
    state: StateDep,
) -> Any:
    """OpenAI (legacy) completions: ``documents`` are rendered before the prompt, each a reused chunk."""
    gen.check_model(state, body.model)
    params = gen.sampling(state, body.max_tokens, body.temperature, body.top_p, body.seed)
    stop = gen.stop_list(body.stop)
    segments = state.renderer.completion(body.prompt, _documents(state, body.documents))
    result = await gen.prefill(request, state, segments, tenant_name, body.kvfuse, "prompt")
    requested = request.state.requested_mode
    rid, created = gen.new_id("cmpl")
    head = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name}
    if body.stream:

        def frame(delta: str, lp: TokenLogprob | None, finish: str | None) -> dict[str, Any]:
            logprobs = _legacy_logprobs([lp]) if lp is not None else None
            return {
                **head,
                "choices": [{"index": 0, "text": delta, "finish_reason": finish, "logprobs": logprobs}],
            }

        tokens = _token_events(state, result, params, stop, body.logprobs, frame, requested)
        return StreamingResponse(_stream(state, result, requested, tokens), media_type="text/event-stream")
    out = await run_in_threadpool(gen.generate_all, state, result, params, stop, body.logprobs)
    background.add_task(state.writeback_task(result, requested))
    return Completion(
        id=rid,
        created=created,
        model=state.model_name,
        choices=[
            CompletionChoice(
                text=out.text,
                finish_reason=out.finish_reason,
                logprobs=_legacy_logprobs(out.logprobs) if out.logprobs is not None else None,
            )
        ],
        usage=gen.usage(result, len(out.token_ids)),
        kvfuse=gen.kvfuse_info(result, requested),
    )


@router.post("/v1/logprobs", response_model=LogprobsResponse, responses=ERRORS)
async def logprobs(
    body: LogprobsRequest,
    request: Request,
    background: BackgroundTasks,
    tenant_name: TenantDep,
    state: StateDep,
) -> LogprobsResponse:
    """Teacher-forced logprob and top-k of every ``continuation`` token after the chat prompt, under the
    selected mode (compare with ``"kvfuse": {"mode": "dense"}`` to measure fidelity)."""
    gen.check_model(state, body.model)
    segments = await run_in_threadpool(chat_segments, state, body)
    ids = await run_in_threadpool(gen.continuation_ids, state, body.continuation)
    result = await gen.prefill(request, state, segments, tenant_name, body.kvfuse)
    tokens = await run_in_threadpool(gen.score, state, result, ids, body.top_logprobs)
    background.add_task(state.writeback_task(result, request.state.requested_mode))
    return LogprobsResponse(
        model=state.model_name,
        tokens=tokens,
        usage=gen.usage(result, len(tokens)),
        kvfuse=gen.kvfuse_info(result, request.state.requested_mode),
    )


@router.get("/v1/models")
async def models(_: TenantDep, state: StateDep) -> dict[str, Any]:
    """The one served model."""
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "owned_by": "kvfuse"}]}
