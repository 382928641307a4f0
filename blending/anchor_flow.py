"""Anchor and hybrid modes of the engine: correct shared segments with the anchor pool, or fall back
to a dense prefill and learn new anchors from it.

A shared segment's *base* KV is its KV from the first real context that computed it (KVCOMM takes it
from the producing agent); it is stored once under the segment's base key and read by every later
receiver. A segment without a base yet is computed in place (as ordinary prompt text) and its KV becomes
the base, so no token is ever computed twice for the pool's sake.

Everything the pool learns or reads is the requesting tenant's own: contexts, pair ids and origins are
kept per namespace (bases are too: their keys are in the tenant's key space).

The flow reads a plan only through :func:`anchor_inputs` (it never changes it) and returns what it
computed; publishing the new bases and recording their origins is the caller's (see
:func:`blending.writeback.publish_computed`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from blending.adapter import ModelAdapter
from blending.anchor_origins import OriginRegistry
from blending.anchors import AnchorPool
from blending.cacheblend import BlendConfig, blend
from blending.fused import FusedKV, Reuse, SegmentInput
from blending.planner import Plan
from kvstore.chunk import KVChunk
from kvstore.keys import ChunkKey

NO_CHECK = BlendConfig(recompute_ratio=0.0, check_layers=())


@dataclass(frozen=True)
class SharedChunk:
    """A shared segment of the prompt (a chunk keyed by its anchor base), as the anchor modes see it."""

    index: int  # its place among the prompt's segments (and blend inputs)
    key: ChunkKey  # its anchor base key
    context: str  # its receiving context within the tenant: the exact prefix and the chunk's slot
    span: slice  # its tokens in the prompt
    base: KVChunk | None  # its stored base; None for a segment seen for the first time (computed in place)

    @property
    def positions(self) -> torch.Tensor:
        return torch.arange(self.span.start, self.span.stop)


@dataclass(frozen=True)
class AnchorInputs:
    """What an anchor-mode prefill reads: the prompt's tokens, its blend inputs (each shared chunk with its
    base as cached KV, or fresh), its shared chunks, and the key under which to store the exact prefix
    after the pass (None when it is cached or there is none)."""

    token_ids: torch.Tensor
    segments: list[SegmentInput]
    shared: list[SharedChunk]
    missing_prefix: ChunkKey | None


class Computed(NamedTuple):
    """KV a prefill computed for the store: a missing exact prefix (``origin`` None) or a new base, with
    the context that computed it (its origin, should its publication win)."""

    key: ChunkKey
    chunk: KVChunk
    origin: str | None


@dataclass(frozen=True)
class AnchorOutcome:
    """``reason``: why anchors did not apply and ``fused`` is a dense prefill's, None when they did.
    ``computed``: what to publish first-writer-wins (the missing exact prefix and the new bases)."""

    fused: FusedKV
    reason: str | None
    computed: list[Computed]


def shared_chunks(plan: Plan) -> list[SharedChunk]:
    """Each keyed chunk of ``plan`` with its receiving context (the exact prefix and the chunk's slot), its
    span and its cached KV. The context names a place within one tenant; the pool keeps it under the
    tenant's namespace."""
    head = plan.segments[0]
    prefix_tag = head.key.hex if head.kind == "prefix" and head.key is not None else "no-prefix"
    out, start, slot = [], 0, 0
    for i, seg in enumerate(plan.segments):
        n = len(seg.token_ids)
        if seg.kind == "chunk" and seg.key is not None:
            out.append(SharedChunk(i, seg.key, f"{prefix_tag}:{slot}", slice(start, start + n), seg.cached))
            slot += 1
        start += n
    return out


def anchor_inputs(plan: Plan) -> AnchorInputs:
    """The inputs of :func:`anchor_prefill` for an anchor plan (chunks keyed by their base) as looked up."""
    head = plan.segments[0]
    missing = head.key if head.kind == "prefix" and head.cached is None else None
    return AnchorInputs(plan.token_ids, plan.inputs(), shared_chunks(plan), missing)


def _computed(fused: FusedKV, request: AnchorInputs, new: list[SharedChunk], fingerprint: str) -> list[Computed]:
    """What to store after the pass: the exact prefix if it was missing, and the new segments' bases."""
    out = []
    if request.missing_prefix is not None:
        n = len(request.segments[0].token_ids)
        out.append(Computed(request.missing_prefix,
                            KVChunk(fused.kv[:, :, :, :n].clone(), torch.arange(n), fingerprint), None))
    for chunk in new:
        kv = fused.kv[:, :, :, chunk.span].clone()
        out.append(Computed(chunk.key, KVChunk(kv, chunk.positions, fingerprint), chunk.context))
    return out


def _pair(origins: OriginRegistry, namespace: str, chunk: SharedChunk) -> str:
    """Anchors are learned per (base origin, receiving context) of one tenant: a deviation says how KV
    computed in one context shifts in another. An unknown origin (a base computed by another instance) is
    ``?``."""
    return f"{origins.get(namespace, chunk.key.hex) or '?'}>{chunk.context}"


def anchor_prefill(
    adapter: ModelAdapter,
    pool: AnchorPool,
    origins: OriginRegistry,
    request: AnchorInputs,
    hybrid: BlendConfig | None,
    dense: Callable[[torch.Tensor], FusedKV],
    fingerprint: str,
    *,
    namespace: str,
) -> AnchorOutcome:
    """Fuse with anchor-corrected chunk KV: no forward pass for reused tokens, then selective recompute
    when ``hybrid`` is given. ``origins`` is only read: a new base's origin is recorded by its publication
    (:func:`blending.writeback.publish_computed`). A base computed in this very context is reused as is
    (re-rotated); the others are corrected by anchors of their (origin, context) pair. When no chunk has a
    base, or one has no close anchor, runs ``dense`` and learns an anchor for every corrected chunk.
    ``namespace``: the requesting tenant, whose anchors and origins alone are read and learned. Raises
    what blending raises on bad cached KV (ValueError, RuntimeError)."""
    known = [c for c in request.shared if c.base is not None]
    new = [c for c in request.shared if c.base is None]  # their origins are recorded if they win publication
    reason: str | None = None
    if not request.shared:
        reason = "anchor: no shared segments"
    elif not known:
        reason = "anchor: no base KV yet for the shared segments (computed now)"
    inputs = list(request.segments)
    for chunk in known if reason is None else []:
        assert chunk.base is not None
        if origins.get(namespace, chunk.key.hex) == chunk.context:  # computed here: anchors would only add noise
            pool.count_same_context()
            continue  # its input holds the base: blend re-rotates it from its stored positions
        est = pool.estimate(namespace, _pair(origins, namespace, chunk), chunk.base, chunk.positions)
        if est.chunk is None:
            reason = f"anchor: {est.reason}"
            break
        inputs[chunk.index] = SegmentInput(inputs[chunk.index].token_ids, Reuse.CACHED, est.chunk)
    if reason is None:
        fused = blend(adapter, inputs, hybrid or NO_CHECK)
        return AnchorOutcome(fused, None, _computed(fused, request, new, fingerprint))
    fused = dense(request.token_ids)
    learn = [c for c in known if origins.get(namespace, c.key.hex) != c.context]
    for chunk in learn:
        assert chunk.base is not None
        real = fused.kv[:, :, :, chunk.span]
        pool.add(namespace, _pair(origins, namespace, chunk), chunk.base.to(real.device), real, chunk.positions)
    return AnchorOutcome(fused, reason, _computed(fused, request, new, fingerprint))
