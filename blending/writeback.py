"""The write paths of the engine: the hot prompt cache at once, the store in the background.

One place decides what a request's computed KV becomes: its exact leading part goes to the hot prompt
cache before the request returns (immediate reuse); :func:`write_back` later stores the missing exact
prefix and chunks (a chunk inside the exact part as computed there, in its real context, at no extra
compute; another computed in its canonical context after the prefix); anchor bases are published
first-writer-wins by :func:`publish_computed`, which records the origins of the bases it won."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch

from blending.adapter import ModelAdapter
from blending.anchor_flow import Computed, shared_chunks
from blending.anchor_origins import OriginRegistry
from blending.fused import FusedKV
from blending.planner import KeySpaces, Plan
from blending.precompute import chunk_kv
from blending.prompt_cache import HotPrompt, HotPromptCache, token_digest
from kvstore.chunk import KVChunk
from kvstore.keys import ChunkKey
from kvstore.store import TieredStore


def segment_starts(plan: Plan) -> list[int]:
    """Token offset of each of the plan's segments."""
    out, start = [], 0
    for seg in plan.segments:
        out.append(start)
        start += len(seg.token_ids)
    return out


def remember(cache: HotPromptCache, plan: Plan, fused: FusedKV, n: int, namespace: str, fingerprint: str) -> None:
    """Keep the first ``n`` (exact) tokens' KV in the hot prompt cache, with the spans of its chunks."""
    if n == 0:
        return
    kv = fused.kv if n == fused.kv.shape[3] else fused.kv[:, :, :, :n].clone()
    spans: dict[str, tuple[int, int, str]] = {}
    before = ""
    for seg, start in zip(plan.segments, segment_starts(plan), strict=True):
        stop = start + len(seg.token_ids)
        digest = token_digest(seg.token_ids)
        if seg.kind == "chunk" and stop <= n:
            spans[digest] = (start, stop, before)
        before = digest
    cache.put(namespace, HotPrompt(fused.token_ids[:n].clone(), kv, fingerprint, spans))


def publish_first(store: TieredStore, items: list[tuple[ChunkKey, KVChunk]]) -> list[bool]:
    """Store anchor bases (and a missing exact prefix) first-writer-wins, atomically in every tier: a
    base that other requests' anchors were learned against is never replaced."""
    return store.put_many_if_absent(items)


def publish_computed(store: TieredStore, origins: OriginRegistry, items: list[Computed], namespace: str) -> None:
    """Publish ``items`` first-writer-wins; the context of each new base whose publication wins becomes its
    origin. A base another writer (another instance over the same tier) stored first came from elsewhere:
    no origin is recorded for it, nor for anything not published."""
    for item, won in zip(items, publish_first(store, [(i.key, i.chunk) for i in items]), strict=True):
        if won and item.origin is not None:
            origins.note(namespace, item.key.hex, item.origin)


def publish_bases(store: TieredStore, origins: OriginRegistry, anchor_plan: Plan, fused: FusedKV, exact: int,
                  namespace: str, fingerprint: str) -> None:
    """Publish, from a request that computed its prompt exactly up to ``exact``, the anchor bases of its
    shared segments that have none yet (see :func:`publish_computed`)."""
    items = [Computed(c.key, KVChunk(fused.kv[:, :, :, c.span].clone(), c.positions, fingerprint), c.context)
             for c in shared_chunks(anchor_plan) if c.base is None and c.span.stop <= exact]
    publish_computed(store, origins, items, namespace)


def write_back(
    store: TieredStore,
    adapter: ModelAdapter,
    fingerprint: str,
    model_lock: AbstractContextManager[Any],
    plan: Plan,
    fused: FusedKV,
    exact: int,
) -> list[ChunkKey]:
    """Store the plan's missing exact prefix and chunks; returns the keys written."""
    missing = [s for s in plan.misses if s.key is not None]
    present = store.contains_many([s.key for s in missing if s.key is not None])
    todo = {id(s) for s, here in zip(missing, present, strict=True) if not here}
    items: list[tuple[ChunkKey, KVChunk]] = []
    prefix: KVChunk | None = None
    if plan.prefix_ids is not None and len(plan.prefix_ids):
        n = len(plan.prefix_ids)
        prefix = KVChunk(fused.kv[:, :, :, :n].contiguous().cpu(), torch.arange(n), fingerprint)
        head = plan.segments[0]
        if id(head) in todo and head.key is not None and n <= exact:
            items.append((head.key, prefix))
    shared = prefix if plan.shared_prefix else None
    for seg, start in zip(plan.segments, segment_starts(plan), strict=True):
        if id(seg) not in todo or seg.kind != "chunk" or seg.key is None or plan.anchored:
            continue  # anchor bases are published by the prefill itself
        stop = start + len(seg.token_ids)
        if stop <= exact:
            kv = fused.kv[:, :, :, start:stop].contiguous().cpu()
            items.append((seg.key, KVChunk(kv, torch.arange(start, stop), fingerprint)))
            continue
        with model_lock:
            items.append((seg.key, chunk_kv(adapter, fingerprint, seg.token_ids, shared)))
    if items:
        store.put_many(items)
    return [k for k, _ in items]


def warm_chunks(store: TieredStore, adapter: ModelAdapter, fingerprint: str, model_lock: AbstractContextManager[Any],
                spaces: KeySpaces, chunks: list[torch.Tensor], prefix_ids: torch.Tensor | None) -> list[ChunkKey]:
    """Precompute and store the KV of ``chunks`` (token ids), after ``prefix_ids`` when given (the
    prefix's own exact KV is stored too); chunks already stored are skipped. Returns their keys."""
    prefix: KVChunk | None = None
    if prefix_ids is not None and len(prefix_ids):
        pkey = spaces.prefix_key(prefix_ids)
        prefix = store.get(pkey)
        if prefix is None:
            with model_lock:
                prefix = chunk_kv(adapter, fingerprint, prefix_ids)
            store.put(pkey, prefix)
    keys: list[ChunkKey] = []
    for ids in chunks:
        key = spaces.chunk_key(ids, prefix_ids if prefix is not None else None)
        if not store.contains(key):
            with model_lock:
                chunk = chunk_kv(adapter, fingerprint, ids, prefix)
            store.put(key, chunk)
        keys.append(key)
    return keys
