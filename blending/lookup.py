"""Finding a plan's cached KV: the store (validated against the model), then the hot prompt cache.

Every chunk found is checked against the model fingerprint, dtype, layer/head layout and token count; a
mismatch is ignored with a reason in ``plan.lookup_errors`` (the segment is then computed)."""

from __future__ import annotations

import torch

from blending.fused import FusedKV, Reuse, SegmentInput
from blending.planner import Plan
from blending.prompt_cache import HotPromptCache, PrefixHit, token_digest
from kvstore.chunk import KVChunk
from kvstore.store import TieredStore


class KVValidator:
    """What cached KV must match to be used by one engine."""

    def __init__(self, fingerprint: str, dtype: torch.dtype, layers: int | None) -> None:
        self.fingerprint, self.dtype, self.layers = fingerprint, dtype, layers

    def __call__(self, ids: torch.Tensor, chunk: KVChunk | None, plan: Plan) -> KVChunk | None:
        if chunk is None:
            return None
        if (chunk.fingerprint != self.fingerprint or chunk.num_tokens != len(ids) or chunk.dtype != self.dtype
                or (self.layers is not None and tuple(chunk.kv.shape[:2]) != (self.layers, 2))):
            plan.lookup_errors.append("cached KV does not match the model or the chunk; ignored")
            return None
        return chunk


def lookup_store(store: TieredStore, plan: Plan, valid: KVValidator) -> None:
    """Fill ``seg.cached`` from the store: the primary key first, the fallback key for what missed."""
    keyed = [s for s in plan.segments if s.key is not None]
    found = store.get_many([s.key for s in keyed if s.key is not None])
    for seg, chunk in zip(keyed, found, strict=True):
        seg.cached = valid(seg.token_ids, chunk, plan)
    retry = [s for s in keyed if s.cached is None and s.fallback_key is not None]
    if retry:
        found = store.get_many([s.fallback_key for s in retry if s.fallback_key is not None])
        for seg, chunk in zip(retry, found, strict=True):
            seg.cached = valid(seg.token_ids, chunk, plan)


def lookup_hot(cache: HotPromptCache, plan: Plan, namespace: str, valid: KVValidator) -> PrefixHit | None:
    """The longest exact prefix among this tenant's recent prompts, and recent in-context KV for chunks
    the store missed (preferring a variant computed after the same predecessor)."""
    before = ""
    for seg in plan.segments:
        digest = token_digest(seg.token_ids)
        if seg.kind == "chunk" and seg.key is not None and seg.cached is None:
            seg.cached = valid(seg.token_ids, cache.find_chunk(namespace, digest, before, valid.fingerprint), plan)
        before = digest
    hit = cache.longest_prefix(namespace, plan.token_ids, valid.fingerprint)
    if hit is None:
        return None
    exact = plan.exact_prefix_tokens
    if hit.length <= exact:
        return None
    return hit if valid(hit.chunk.positions, hit.chunk, plan) is not None else None


def exact_inputs(plan: Plan, hit: PrefixHit | None) -> list[SegmentInput]:
    """The plan's blend inputs with the first ``hit.length`` tokens replaced by the exact hot prefix; a
    segment cut by the prefix's end is computed from there."""
    if hit is None:
        return plan.inputs()
    n = min(hit.length, plan.num_tokens - 1)  # the last token always runs: it gives the next logits
    chunk = hit.chunk if n == hit.length else KVChunk(hit.chunk.kv[:, :, :, :n], torch.arange(n), hit.chunk.fingerprint)
    out = [SegmentInput(plan.token_ids[:n], Reuse.EXACT, chunk)]
    start = 0
    for seg in plan.segments:
        stop = start + len(seg.token_ids)
        if stop <= n:
            pass
        elif start >= n:
            out.append(seg.as_input())
        else:
            out.append(SegmentInput(seg.token_ids[n - start :]))
        start = stop
    return out


def exact_length(plan: Plan, fused: FusedKV, mode: str, hot: PrefixHit | None = None) -> int:
    """Leading tokens of ``fused`` whose KV equals a dense prefill's: all of a dense (or exact-prefix)
    prefill; otherwise everything before the first token whose KV came from a moved chunk."""
    if mode in ("dense", "prefix"):
        return int(fused.kv.shape[3])
    start = 0
    for item in exact_inputs(plan, hot):
        if item.reuse is Reuse.CACHED:
            return start
        start += len(item.token_ids)
    return start
