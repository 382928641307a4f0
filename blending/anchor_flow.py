"""Anchor and hybrid modes of the engine: correct shared segments with the anchor pool, or fall back
to a dense prefill and learn new anchors from it.

A shared segment's *base* KV is its KV from the first real context that computed it (KVCOMM takes it
from the producing agent); it is stored once under the segment's base key and read by every later
receiver. A segment without a base yet is computed in place (as ordinary prompt text) and its KV becomes
the base, so no token is ever computed twice for the pool's sake.

Everything the pool learns or reads is the requesting tenant's own: contexts, pair ids and origins are
kept per namespace (bases are too: their keys are in the tenant's key space).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from blending.adapter import ModelAdapter
from blending.anchors import AnchorPool
from blending.cacheblend import BlendConfig, blend
from blending.fused import FusedKV
from blending.planner import Plan, PlannedSegment
from kvstore.chunk import KVChunk
from kvstore.keys import ChunkKey

NO_CHECK = BlendConfig(recompute_ratio=0.0, check_layers=())


def chunk_contexts(plan: Plan) -> list[tuple[PlannedSegment, str, slice]]:
    """Each chunk with its receiving context (the exact prefix and the chunk's slot) and its span. The
    context names a place within one tenant; the pool keeps it under the tenant's namespace."""
    head = plan.segments[0]
    prefix_tag = head.key.hex if head.kind == "prefix" and head.key is not None else "no-prefix"
    out, start, slot = [], 0, 0
    for seg in plan.segments:
        n = len(seg.token_ids)
        if seg.kind == "chunk" and seg.key is not None:
            out.append((seg, f"{prefix_tag}:{slot}", slice(start, start + n)))
            slot += 1
        start += n
    return out


def _computed(fused: FusedKV, plan: Plan, spans: list[tuple[PlannedSegment, str, slice]],
              fingerprint: str) -> list[tuple[ChunkKey, KVChunk]]:
    """What to store after the pass: the exact prefix if it was missing, and the new segments' bases."""
    out = []
    head = plan.segments[0]
    if head.kind == "prefix" and head.cached is None and head.key is not None:
        n = len(head.token_ids)
        out.append((head.key, KVChunk(fused.kv[:, :, :, :n].clone(), torch.arange(n), fingerprint)))
    for seg, _, span in spans:
        assert seg.key is not None
        positions = torch.arange(span.start, span.stop)
        out.append((seg.key, KVChunk(fused.kv[:, :, :, span].clone(), positions, fingerprint)))
    return out


def _pair(pool: AnchorPool, namespace: str, seg: PlannedSegment, context: str) -> str:
    """Anchors are learned per (base origin, receiving context) of one tenant: a deviation says how KV
    computed in one context shifts in another. An unknown origin (a base computed by another instance) is
    ``?``."""
    assert seg.key is not None
    return f"{pool.origin(namespace, seg.key.hex) or '?'}>{context}"


def anchor_prefill(
    adapter: ModelAdapter,
    pool: AnchorPool,
    plan: Plan,
    hybrid: BlendConfig | None,
    dense: Callable[[torch.Tensor], FusedKV],
    fingerprint: str,
    *,
    namespace: str,
) -> tuple[FusedKV, str | None, list[tuple[ChunkKey, KVChunk]]]:
    """Fuse with anchor-corrected chunk KV: no forward pass for reused tokens, then selective recompute
    when ``hybrid`` is given. A chunk's ``cached`` KV on entry is its base, or None for a segment seen
    for the first time (computed in place). A base computed in this very context is reused as is
    (re-rotated); the others are corrected by anchors of their (origin, context) pair. When no chunk has a
    base, or one has no close anchor, runs ``dense`` and learns an anchor for every corrected chunk.
    ``namespace``: the requesting tenant, whose anchors and origins alone are read and learned.
    Returns (fused KV, fallback reason or None, KV to store: a missing prefix and new bases)."""
    spans = chunk_contexts(plan)
    known = [(seg, ctx, span) for seg, ctx, span in spans if seg.cached is not None]
    new = [(seg, ctx, span) for seg, ctx, span in spans if seg.cached is None]
    for seg, ctx, _ in new:
        assert seg.key is not None
        pool.note_origin(namespace, seg.key.hex, ctx)
    reason: str | None = None
    if not spans:
        reason = "anchor: no shared segments"
    elif not known:
        reason = "anchor: no base KV yet for the shared segments (computed now)"
    estimates: list[KVChunk] = []
    for seg, context, span in known if reason is None else []:
        assert seg.cached is not None and seg.key is not None
        positions = torch.arange(span.start, span.stop)
        if pool.origin(namespace, seg.key.hex) == context:  # computed here before: anchors would only add noise
            pool.count_same_context()
            estimates.append(seg.cached)  # blend re-rotates it from its stored positions
            continue
        est = pool.estimate(namespace, _pair(pool, namespace, seg, context), seg.cached, positions)
        if est.chunk is None:
            reason = f"anchor: {est.reason}"
            break
        estimates.append(est.chunk)
    if reason is None:
        bases = [seg.cached for seg, _, _ in known]
        for (seg, _, _), est_chunk in zip(known, estimates, strict=True):
            seg.cached = est_chunk
        try:
            fused = blend(adapter, plan.inputs(), hybrid or NO_CHECK)
        finally:
            for (seg, _, _), base in zip(known, bases, strict=True):
                seg.cached = base
        return fused, None, _computed(fused, plan, new, fingerprint)
    fused = dense(plan.token_ids)
    learn = [(seg, ctx, span) for seg, ctx, span in known
             if seg.key is not None and pool.origin(namespace, seg.key.hex) != ctx]
    for seg, context, span in learn:
        assert seg.cached is not None
        real = fused.kv[:, :, :, span]
        pool.add(namespace, _pair(pool, namespace, seg, context), seg.cached.to(real.device), real,
                 torch.arange(span.start, span.stop))
    return fused, reason, _computed(fused, plan, new, fingerprint)

