"""Running the engine for a request: prefill, decoding with stop strings, logprobs, accounting."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from blending import scheduler
from blending.decode import SamplingParams, generate_tokens
from blending.engine import PrefillRequest, PrefillResult, PromptTooLongError
from blending.planner import PromptSegment
from server.errors import APIError
from server.schemas import KVFuseInfo, KVFuseOptions, PromptTokensDetails, TokenLogprob, TopLogprob, Usage
from server.state import ServerState

log = logging.getLogger("kvfuse.server")
GREEDY_BELOW = 1e-4


def token_logprob(tokenizer: Any, logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """Log-probability of ``token`` and the ``top`` most likely tokens under ``logits``."""
    logp = torch.log_softmax(logits.float(), dim=-1)

    def entry(i: int, cls: type[TopLogprob] = TopLogprob) -> Any:
        text = tokenizer.decode([i])
        return cls(token=text, logprob=float(logp[i]), bytes=list(text.encode()), id=i)

    out: TokenLogprob = entry(token, TokenLogprob)
    if top:
        out.top_logprobs = [entry(int(i)) for i in torch.topk(logp, top).indices]
    return out


class TextAssembler:
    """Incremental detokenization with stop strings: ``add`` returns the text that is safe to emit
    (held back while it could still become a stop string or ends in a partial UTF-8 character)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, token: int) -> str:
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            return self._emit(len(self.text))
        safe = len(self.text)
        if self.text.endswith("\ufffd"):
            safe -= 1
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    safe = min(safe, len(self.text) - k)
                    break
        return self._emit(safe)

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out, self.emitted = self.text[self.emitted : upto], upto
        return out


def decode_steps(
    state: ServerState, result: PrefillResult, params: SamplingParams
) -> Iterator[tuple[int, torch.Tensor]]:
    """``Engine.generate`` with the first token yielded without taking the model lock: it is sampled
    from the prefill's logits (no forward pass), so a finished prefill answers at once even while
    other requests' prefills queue on the lock. Later steps take one turn of the fair model lock each, as
    the request's tenant (a started request: no deadline)."""
    engine = state.engine
    steps = generate_tokens(engine.model, result.fused, params)
    step = next(steps, None)
    while step is not None:
        yield step
        with scheduler.tenant(result.namespace), engine.model_lock:
            step = next(steps, None)


@dataclass
class Generated:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    logprobs: list[TokenLogprob] | None = None


def resolve_mode(state: ServerState, options: KVFuseOptions | None) -> tuple[str, float | None]:
    """The request's mode and recompute ratio, else the service defaults."""
    opts = options or KVFuseOptions()
    ratio = opts.recompute_ratio if opts.recompute_ratio is not None else state.settings.recompute_ratio
    return opts.mode or state.settings.mode, ratio


def check_model(state: ServerState, model: str) -> None:
    if model not in ("default", state.model_name):
        raise APIError(
            404,
            f"model {model!r} is not served here; use {state.model_name!r} or 'default'",
            "model",
            "model_not_found",
        )


def _check_tokens(state: ServerState, segments: Sequence[PromptSegment], param: str) -> None:
    limit = state.settings.limits.max_prompt_tokens
    if limit >= state.engine.config.max_prompt_tokens:
        return  # the engine refuses longer prompts itself
    n = sum(len(state.engine.tokenize(s.text)) for s in segments)
    if n > limit:
        raise APIError(400, f"prompt has {n} tokens; the limit is {limit}", param, "prompt_too_long")


def arrival(request: Request) -> float:
    """When the request arrived (``time.monotonic``; set by the service middleware)."""
    value = getattr(request.state, "arrival", None)
    return float(value) if value is not None else time.monotonic()


def run_prefill(state: ServerState, req: PrefillRequest, arrived: float) -> PrefillResult:
    """The engine's prefill as one request of the fair scheduler (blocking; run it in the threadpool): it
    waits at most ``request_deadline_s`` from arrival for its first turn (else ``QueueTimeout``: 503), its
    queue time is reported apart, and its TTFT runs from arrival, queue included."""
    ctx = scheduler.RequestContext(req.namespace, state.settings.request_deadline_s, arrival=arrived)
    with ctx.active():
        result = state.engine.prefill(req)
    result.queue_s = ctx.queue_s or 0.0
    result.ttft_s = time.monotonic() - arrived
    return result


async def prefill(
    request: Request,
    state: ServerState,
    segments: list[PromptSegment],
    tenant: str,
    options: KVFuseOptions | None,
    param: str = "messages",
) -> PrefillResult:
    """Run the engine's prefill in the threadpool; limit and engine errors become 4xx (``param`` names
    the request field holding the prompt), a request that cannot get the model in time a 503."""
    mode, ratio = resolve_mode(state, options)
    request.state.requested_mode = mode
    await run_in_threadpool(_check_tokens, state, segments, param)
    target = options.fidelity_target if options is not None else None
    req = PrefillRequest(tuple(segments), namespace=tenant, mode=mode, recompute_ratio=ratio,  # type: ignore[arg-type]
                         fidelity_target=target)
    try:
        result = await run_in_threadpool(run_prefill, state, req, arrival(request))
    except PromptTooLongError as exc:
        raise APIError(400, str(exc), param, "prompt_too_long") from exc
    except ValueError as exc:
        raise APIError(400, str(exc), param) from exc
    summary = result.summary()
    state.metrics.observe_prefill(summary, mode, tenant)
    for k in ("mode", "cached_tokens", "prompt_tokens", "ttft_ms", "queue_ms", "fallback_reason"):
        setattr(request.state, k, summary[k])
    return result


def sampling(
    state: ServerState, max_tokens: int | None, temperature: float, top_p: float, seed: int | None
) -> SamplingParams:
    """Sampling parameters within the service limits. A temperature below :data:`GREEDY_BELOW` is greedy
    (dividing logits by it would overflow to inf/NaN probabilities); any integer seed is accepted and
    reduced to the 64 bits a torch generator takes."""
    limit = state.settings.limits.max_completion_tokens
    if max_tokens is not None and max_tokens > limit:
        raise APIError(400, f"max_tokens {max_tokens} exceeds the limit of {limit}", "max_tokens")
    return SamplingParams(
        max_tokens=max_tokens or limit,
        temperature=0.0 if temperature < GREEDY_BELOW else temperature,
        top_p=top_p,
        seed=None if seed is None else seed % (1 << 64),
        stop_token_ids=state.eos_ids,
    )


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > 4:
        raise APIError(400, "at most 4 stop sequences", "stop")
    return stops


def generate_all(
    state: ServerState, result: PrefillResult, params: SamplingParams, stop: list[str], top: int | None
) -> Generated:
    """Decode to the end (blocking; run it in the threadpool)."""
    out = Generated(logprobs=[] if top is not None else None)
    text = TextAssembler(state.engine.tokenizer, stop)
    for token, logits in decode_steps(state, result, params):
        if token in params.stop_token_ids:
            out.finish_reason = "stop"
            break
        out.token_ids.append(token)
        if out.logprobs is not None:
            out.logprobs.append(token_logprob(state.engine.tokenizer, logits, token, top or 0))
        text.add(token)
        if text.stopped:
            out.finish_reason = "stop"
            break
    out.text = text.text
    return out


def continuation_ids(state: ServerState, continuation: str) -> torch.Tensor:
    """The continuation's token ids, within ``limits.max_prompt_tokens`` (checked before any prefill)."""
    ids = state.engine.tokenize(continuation)
    if len(ids) == 0:
        raise APIError(400, "continuation has no tokens", "continuation")
    limit = state.settings.limits.max_prompt_tokens
    if len(ids) > limit:
        raise APIError(400, f"continuation has {len(ids)} tokens; the limit is {limit}", "continuation",
                       "prompt_too_long")  # fmt: skip
    return ids


def score(state: ServerState, result: PrefillResult, ids: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Teacher-forced logprobs of the continuation ``ids`` after the prompt (blocking; the engine runs it in
    chunks between which other tenants' requests get the model)."""
    with scheduler.tenant(result.namespace):
        logits = state.engine.score(result, ids)
    return [token_logprob(state.engine.tokenizer, row, int(t), top) for row, t in zip(logits, ids, strict=True)]


def usage(result: PrefillResult, completion_tokens: int) -> Usage:
    report = result.report()
    return Usage(
        prompt_tokens=report.prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=report.prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=report.cached_tokens),
    )


def kvfuse_info(result: PrefillResult, requested: str) -> KVFuseInfo:
    return KVFuseInfo(**{**result.report().model_dump(), "requested_mode": requested})


def stream_error(exc: Exception, namespace: str) -> dict[str, Any]:
    """The OpenAI-style error object that ends a stream failing after it started (its status line is long
    gone): an :class:`APIError` as it would have been answered, anything else as a server error naming only
    the exception's type. The reason, with its traceback, goes to the log, never to the client."""
    if isinstance(exc, APIError):
        log.warning("stream for tenant %s ended by an error: %s", namespace, exc.message)
        return {"error": {"message": exc.message, "type": exc.type, "param": exc.param}}
    log.error("stream for tenant %s failed mid-response: %s: %s", namespace, type(exc).__name__, exc, exc_info=exc)
    return {"error": {"message": f"internal error during generation: {type(exc).__name__}", "type": "server_error",
                      "param": None}}


def new_id(prefix: str) -> tuple[str, int]:
    """A response id and its creation time (unix seconds)."""
    return f"{prefix}-{secrets.token_hex(12)}", int(time.time())
