"""Decoding from a fused KV cache with the model's own forward and a transformers ``DynamicCache``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from blending.fused import FusedKV


def to_dynamic_cache(model: PreTrainedModel, kv: torch.Tensor) -> DynamicCache:
    """Wrap ``[layers, 2, kv_heads, N, d]`` as a ``DynamicCache`` (views, no copy)."""
    cache = DynamicCache(config=model.config)
    for layer in range(kv.shape[0]):
        cache.update(kv[layer, 0][None], kv[layer, 1][None], layer)
    return cache


@torch.inference_mode()
def teacher_forced_logits(model: PreTrainedModel, fused: FusedKV, continuation: torch.Tensor) -> torch.Tensor:
    """Float32 next-token logits ``[len(continuation), vocab]``: row i predicts ``continuation[i]``
    given the prompt and ``continuation[:i]``, decoding from the fused cache (no second prefill)."""
    rows = [fused.last_logits[None].float()]
    if len(continuation) > 1:
        cache = to_dynamic_cache(model, fused.kv.clone())
        n = fused.kv.shape[3]
        ids = continuation[:-1].to(model.device)[None]
        pos = torch.arange(n, n + ids.shape[1], device=model.device)[None]
        out = model(input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True)
        rows.append(out.logits[0].float())
    return torch.cat(rows)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()


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
        out = model(input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True)
        logits = out.logits[0, -1].float()
        position += 1
