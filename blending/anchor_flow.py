"""Anchor and hybrid modes of the engine: correct shared segments with the anchor pool, or fall back
to a dense prefill and learn new anchors from it."""

from __future__ import annotations

from collections.abc import Callable

import torch

from blending.adapter import ModelAdapter
from blending.anchors import AnchorPool
from blending.cacheblend import BlendConfig, blend
from blending.fused import FusedKV
from blending.planner import Plan, PlannedSegment
from blending.precompute import chunk_kv
from kvstore.chunk import KVChunk
from kvstore.keys import ChunkKey

NO_CHECK = BlendConfig(recompute_ratio=0.0, check_layers=())


def chunk_contexts(plan: Plan) -> list[tuple[PlannedSegment, str, slice]]:
    """Each chunk with its receiving context (the exact prefix and the chunk's slot) and its span."""
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


def anchor_prefill(
    adapter: ModelAdapter,
    pool: AnchorPool,
    plan: Plan,
    hybrid: BlendConfig | None,
    dense: Callable[[torch.Tensor], FusedKV],
    fingerprint: str,
) -> tuple[FusedKV, str | None, list[tuple[ChunkKey, KVChunk]]]:
    """Fuse with anchor-corrected chunk KV: no forward pass for reused tokens, then selective recompute
    when ``hybrid`` is given. Chunks' ``cached`` KV on entry is their standalone base KV; a segment seen
    for the first time gets its base computed once (standalone), to be shared by every later receiver.
    When a chunk has no close anchor, runs ``dense`` and learns an anchor for every chunk.
    Returns (fused KV, fallback reason or None, base KV computed on the way)."""
    spans = chunk_contexts(plan)
    bases: dict[ChunkKey, KVChunk] = {}
    computed: list[tuple[ChunkKey, KVChunk]] = []
    for seg, _, _ in spans:
        assert seg.key is not None
        if seg.cached is None:
            seg.cached = chunk_kv(adapter, fingerprint, seg.token_ids)
            computed.append((seg.key, seg.cached))
        bases[seg.key] = seg.cached
    reason: str | None = None if spans else "anchor: no shared segments"
    for seg, context, span in spans:
        assert seg.key is not None
        base = bases[seg.key]
        est = pool.estimate(context, base, torch.arange(span.start, span.stop))
        if est.chunk is None:
            reason = reason or f"anchor: {est.reason}"
        seg.cached = est.chunk
    if reason is None:
        return blend(adapter, plan.inputs(), hybrid or NO_CHECK), None, computed
    for seg, _, _ in spans:
        seg.cached = None
    fused = dense(plan.token_ids)
    for seg, context, span in spans:
        assert seg.key is not None
        base = bases[seg.key]
        real = fused.kv[:, :, :, span]
        pool.add(context, base.to(real.device), real, torch.arange(span.start, span.stop))
    return fused, reason, computed
