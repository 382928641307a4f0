"""Persistence of anchors in the tiered store, so that instances sharing a tier share anchors."""

from __future__ import annotations

import torch

from blending.anchor_estimate import Anchor
from kvstore.chunk import KVChunk
from kvstore.keys import ChunkKey, KeySpace
from kvstore.store import TieredStore


class AnchorStore:
    """Persists anchors in a TieredStore: tenant ``ns``'s context ``c``'s slot ``i`` holds two chunks (base
    summary and deviation, position-free: their positions are all 0) under keys derived from (ns, c, i), in the
    tenant's key space. No index is needed: a pool probes a context's slots the first time it sees the context,
    so instances sharing a tier share anchors (each tenant only its own).

    ``save`` and ``load`` raise what the store raises; the pool logs and carries on."""

    def __init__(self, store: TieredStore, fingerprint: str, layout: str) -> None:
        self.store, self.fingerprint, self.layout = store, fingerprint, layout

    def _keys(self, namespace: str, context: str, slot: int) -> tuple[ChunkKey, ChunkKey]:
        space = KeySpace(self.fingerprint, f"{self.layout}:anchor:{context}", namespace)
        return space.chunk_key([slot, 0]), space.chunk_key([slot, 1])

    def save(self, namespace: str, context: str, anchor: Anchor) -> None:
        """Write ``anchor`` to its slot (replacing what the slot held)."""
        summary_key, dev_key = self._keys(namespace, context, anchor.slot)
        zeros = torch.zeros(anchor.num_tokens, dtype=torch.int64)
        # The summary stays float32 so that a reloaded anchor matches (and deduplicates) exactly.
        self.store.put_many([(dev_key, KVChunk(anchor.deviation, zeros, self.fingerprint)),
                             (summary_key, KVChunk(anchor.summary.float(), zeros[:1], self.fingerprint))])

    def load(self, namespace: str, context: str, slots: int) -> list[Anchor]:
        """The anchors found in the context's first ``slots`` slots; a slot missing a part, with parts of
        mismatched shapes or of another model is skipped."""
        keys = [k for slot in range(slots) for k in self._keys(namespace, context, slot)]
        found = self.store.get_many(keys)
        out = []
        for slot in range(slots):
            summary, dev = found[2 * slot], found[2 * slot + 1]
            if summary is None or dev is None or summary.kv.shape[3] != 1:
                continue
            if summary.kv.shape[:3] + summary.kv.shape[4:] != dev.kv.shape[:3] + dev.kv.shape[4:]:
                continue
            if summary.fingerprint != self.fingerprint or dev.fingerprint != self.fingerprint:
                continue
            out.append(Anchor(summary.kv.float(), dev.kv.clone(), slot=slot))
        return out
