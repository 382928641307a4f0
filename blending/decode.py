"""Decoding from a fused KV cache with the model's own forward and a transformers ``DynamicCache``, and the
dense prefill, both in pieces that let the engine's fair model lock hand the model to other tenants."""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from blending.adapter import ModelAdapter
from blending.fused import BlendStats, FusedKV


@functools.cache
def _cache_arg(forward: Callable[..., Any]) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cache_kwargs(model: PreTrainedModel, cache: DynamicCache) -> dict[str, DynamicCache]:
    """``{name: cache}`` for the forward's cache argument: ``cache`` where the model takes it (recent
    transformers 5.x, which deprecates ``past_key_values`` with a FutureWarning), else ``past_key_values``.
    The name is looked up once per model class, not on every decode step."""
    return {_cache_arg(type(model).forward): cache}


def to_dynamic_cache(model: PreTrainedModel, kv: torch.Tensor) -> DynamicCache:
    """Wrap ``[layers, 2, kv_heads, N, d]`` as a ``DynamicCache`` (views, no copy)."""
    cache = DynamicCache(config=model.config)
    for layer in range(kv.shape[0]):
        cache.update(kv[layer, 0][None], kv[layer, 1][None], layer)
    return cache


def dense_prefill(
    adapter: ModelAdapter | None,
    model: PreTrainedModel,
    ids: torch.Tensor,
    chunk_tokens: int,
    between: Callable[[], object] | None = None,
) -> FusedKV:
    """Dense prefill of ``ids`` in pieces of ``chunk_tokens`` tokens, each piece attending to the KV of the
    ones before it in one pre-allocated buffer (``adapter.prefill_into``; HF's own forward with a
    ``DynamicCache`` for an architecture the adapter does not support), calling ``between()`` between two
    pieces. Only the last token's logits are computed."""
    step = max(1, chunk_tokens)
    t0 = time.perf_counter()
    stats = BlendStats(total_tokens=len(ids), computed_tokens=len(ids))
    starts = range(0, len(ids), step)
    if adapter is not None:
        kv = adapter.empty_kv(len(ids))  # one buffer: no piece copies the KV of the ones before it
        for start in starts:
            if start and between is not None:
                between()
            last = adapter.prefill_into(kv, start, ids[start : start + step])
    else:
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            for start in starts:
                if start and between is not None:
                    between()
                out = model(input_ids=ids[start : start + step][None].to(model.device), use_cache=True,
                            **cache_kwargs(model, cache))  # fmt: skip
        layers: Any = cache.layers
        kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in layers])
        last = out.logits[0, -1].float()
    stats.times["compute"] = time.perf_counter() - t0
    return FusedKV(kv, ids, torch.arange(len(ids)), last, stats)


@torch.inference_mode()
def teacher_forced_logits(
    model: PreTrainedModel,
    fused: FusedKV,
    continuation: torch.Tensor,
    chunk_tokens: int | None = None,
    between: Callable[[], object] | None = None,
) -> torch.Tensor:
    """Float32 next-token logits ``[len(continuation), vocab]``: row i predicts ``continuation[i]``
    given the prompt and ``continuation[:i]``, decoding from the fused cache (no second prefill).

    ``chunk_tokens``: feed the continuation in pieces of that many tokens (one cache, the same logits up
    to float rounding), calling ``between()`` between two pieces (the engine offers the model to a waiting
    request there: :meth:`blending.scheduler.FairLock.yield_turn`)."""
    rows = [fused.last_logits[None].float()]
    if len(continuation) > 1:
        cache = to_dynamic_cache(model, fused.kv.clone())
        n = fused.kv.shape[3]
        ids = continuation[:-1].to(model.device)
        step = chunk_tokens if chunk_tokens and chunk_tokens > 0 else len(ids)
        for start in range(0, len(ids), step):
            if start and between is not None:
                between()
            piece = ids[start : start + step][None]
            pos = torch.arange(n + start, n + start + piece.shape[1], device=model.device)[None]
            out = model(input_ids=piece, position_ids=pos, use_cache=True, **cache_kwargs(model, cache))
            rows.append(out.logits[0].float())
    return torch.cat(rows)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    @classmethod
    def greedy(cls, tokenizer: Any, max_tokens: int) -> SamplingParams:
        """Greedy decoding of up to ``max_tokens`` tokens that stops at the tokenizer's end-of-sequence token."""
        eos = tokenizer.eos_token_id
        return cls(max_tokens=max_tokens, stop_token_ids=(eos,) if eos is not None else ())


def _pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    if params.temperature <= 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cut = torch.cumsum(sorted_p, dim=-1) - sorted_p > params.top_p
        sorted_p[cut] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


@torch.inference_mode()
def generate_tokens(
    model: PreTrainedModel, fused: FusedKV, params: SamplingParams
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (token id, float32 logits it was drawn from) until a stop token or ``max_tokens``.

    The first token comes from the fused prefill's logits; each later one is one decode step on the
    model's own forward over a ``DynamicCache`` seeded with the fused KV.
    """
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(params.seed)
    cache = to_dynamic_cache(model, fused.kv)
    position = fused.kv.shape[3]
    logits = fused.last_logits.float()
    for _ in range(params.max_tokens):
        token = _pick(logits.cpu(), params, generator)
        yield token, logits
        if token in params.stop_token_ids:
            return
        ids = torch.tensor([[token]], device=model.device)
        pos = torch.tensor([[position]], device=model.device)
        out = model(input_ids=ids, position_ids=pos, use_cache=True, **cache_kwargs(model, cache))
        logits = out.logits[0, -1].float()
        position += 1


def follows(steps: Iterable[tuple[int, torch.Tensor]], expected: Sequence[int], stop_token_ids: Sequence[int]) -> bool:
    """Whether the decoded ``steps`` say ``expected`` (stop token excluded) token for token and end where
    it ends; consumes ``steps`` only up to the first difference."""
    said = 0
    for token, _ in steps:
        if token in stop_token_ids:
            break
        if said >= len(expected) or token != expected[said]:
            return False
        said += 1
    return said == len(expected)
