"""KVCOMM-style anchor pool: estimate how a shared segment's KV shifts under a receiving context.

An anchor records, for a segment seen under a real context (an agent's prefix and slot), a summary of
the segment's base KV (its per-layer, per-head mean over tokens) and the observed deviation (real minus
base). Both are kept in the position-free frame (keys de-rotated to position 0), so an anchor helps at
other offsets too. A new occurrence is corrected by a similarity-weighted mix of the deviations of the
context's ``top_k`` closest anchors (softmax over negative relative distance of base summaries, per
layer, keys and values separately); when no anchor is close enough or the weights are too flat, the
caller falls back to a dense prefill and records a new anchor. Matching reads only the summaries, so
its cost does not grow with the anchors' lengths.

Everything is per tenant (namespace): anchors, their contexts and persisted slots, and the registry of base
origins. One tenant's traffic never reads, adds to or replaces another's anchors; the shared bounds (bytes,
remembered origins) evict from the tenant holding the most, so a tenant keeps at least an equal share.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from blending.rope import rerotate
from kvstore.chunk import KVChunk
from kvstore.keys import ChunkKey, KeySpace
from kvstore.store import TieredStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnchorConfig:
    """``temperature``: softmax temperature over relative distances; ``max_entropy``: normalized entropy of
    the weights above which they count as too flat; ``max_distance``: relative distance of the closest
    anchor above which none counts as close."""

    max_per_context: int = 20
    max_bytes: int = 1 << 30  # all tenants together
    max_tenant_bytes: int | None = None  # one tenant's cap inside max_bytes (None: max_bytes)
    temperature: float = 0.05
    max_entropy: float = 0.9
    max_distance: float = 1.0
    min_overlap: float = 0.5  # an anchor must cover this share of the segment's tokens
    top_k: int = 4  # deviations mixed per estimate (the closest anchors)
    apply_deviation: bool = True  # False: reuse the re-rotated base as is (an ablation for the benchmark)
    max_origins: int = 1 << 16  # remembered base origins (and probed contexts), all tenants together


@dataclass(eq=False)  # identity semantics: anchors hold tensors
class Anchor:
    summary: torch.Tensor  # [L, 2, H, 1, D]: the base KV's mean over tokens, keys at position 0
    deviation: torch.Tensor  # [L, 2, H, T, D]: real minus base, keys at position 0
    slot: int = -1  # its place among the context's max_per_context persisted entries
    uses: int = 0
    added: float = field(default_factory=time.monotonic)

    @property
    def num_tokens(self) -> int:
        return int(self.deviation.shape[3])

    @property
    def nbytes(self) -> int:
        summary, dev = self.summary, self.deviation
        return summary.numel() * summary.element_size() + dev.numel() * dev.element_size()


@dataclass(frozen=True)
class Estimate:
    chunk: KVChunk | None  # corrected KV at the new positions, or None with a reason
    reason: str | None
    anchors: int
    entropy: float
    distance: float


def _fit(t: torch.Tensor, n: int, tail: int = 16) -> torch.Tensor:
    """``t`` ``[L, 2, H, T, D]`` cut or extended to ``n`` tokens; extension repeats the mean of its last
    tokens (past the segment start the deviation is mostly a steady shift from the receiving context)."""
    have = t.shape[3]
    if have >= n:
        return t[:, :, :, :n]
    fill = t[:, :, :, max(0, have - tail) :].mean(dim=3, keepdim=True)
    return torch.cat([t, fill.expand(-1, -1, -1, n - have, -1)], dim=3)


def _frame0(kv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    out = kv.clone()
    out[:, 0] = rerotate(kv[:, 0], positions, torch.zeros_like(positions), inv_freq)
    return out


def summarize(kv0: torch.Tensor) -> torch.Tensor:
    """The matching signature of a position-free KV ``[L, 2, H, T, D]``: its mean over tokens."""
    return kv0.float().mean(dim=3, keepdim=True)


class AnchorStore:
    """Persists anchors in a TieredStore: tenant ``ns``'s context ``c``'s slot ``i`` holds two chunks (base
    summary and deviation, position-free: their positions are all 0) under keys derived from (ns, c, i), in the
    tenant's key space. No index is needed: a pool probes a context's slots the first time it sees the context,
    so instances sharing a tier share anchors (each tenant only its own)."""

    def __init__(self, store: TieredStore, fingerprint: str, layout: str) -> None:
        self.store, self.fingerprint, self.layout = store, fingerprint, layout

    def _keys(self, namespace: str, context: str, slot: int) -> tuple[ChunkKey, ChunkKey]:
        space = KeySpace(self.fingerprint, f"{self.layout}:anchor:{context}", namespace)
        return space.chunk_key([slot, 0]), space.chunk_key([slot, 1])

    def save(self, namespace: str, context: str, anchor: Anchor) -> None:
        summary_key, dev_key = self._keys(namespace, context, anchor.slot)
        zeros = torch.zeros(anchor.num_tokens, dtype=torch.int64)
        # The summary stays float32 so that a reloaded anchor matches (and deduplicates) exactly.
        self.store.put_many([(dev_key, KVChunk(anchor.deviation, zeros, self.fingerprint)),
                             (summary_key, KVChunk(anchor.summary.float(), zeros[:1], self.fingerprint))])

    def load(self, namespace: str, context: str, slots: int) -> list[Anchor]:
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


class _TenantRecent:
    """Per-tenant maps, least recent first, with one bound over all tenants: past it, the tenant holding the
    most entries (the writer on a tie) forgets its least recent one. Not thread-safe (the pool's lock)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._maps: dict[str, OrderedDict[str, str]] = {}
        self._size = 0

    def get(self, namespace: str, key: str) -> str | None:
        entries = self._maps.get(namespace)
        return None if entries is None else entries.get(key)

    def setdefault(self, namespace: str, key: str, value: str) -> str:
        entries = self._maps.setdefault(namespace, OrderedDict())
        if key not in entries:
            entries[key] = value
            self._size += 1
        entries.move_to_end(key)
        while self._size > self.limit:
            victim = max(self._maps, key=lambda t: (len(self._maps[t]), t == namespace))
            self._maps[victim].popitem(last=False)
            self._size -= 1
            if not self._maps[victim]:
                del self._maps[victim]
        return entries.get(key, value)

    def pop(self, namespace: str, key: str) -> None:
        entries = self._maps.get(namespace)
        if entries is not None and entries.pop(key, None) is not None:
            self._size -= 1
            if not entries:
                del self._maps[namespace]

    def __len__(self) -> int:
        return self._size


class AnchorPool:
    """Bounded (entries per context, bytes per tenant and overall), updated online, safe under concurrent
    requests; persisted through an optional :class:`AnchorStore`. Every method takes the tenant's
    ``namespace``: contexts, pair ids, origins and persisted slots are the tenant's own."""

    def __init__(
        self, inv_freq: torch.Tensor, config: AnchorConfig | None = None, persist: AnchorStore | None = None
    ) -> None:
        self.config = config or AnchorConfig()
        self.inv_freq = inv_freq
        self.persist = persist
        self._anchors: dict[tuple[str, str], list[Anchor]] = {}  # (namespace, context) -> anchors
        self._bytes: dict[str, int] = {}  # namespace -> bytes of its anchors
        self._loaded = _TenantRecent(self.config.max_origins)  # (namespace, context) probed in the store
        self._origins = _TenantRecent(self.config.max_origins)  # (namespace, base key) -> context of the base
        self._lock = threading.Lock()
        self.used_bytes = 0
        self.counters = {"estimates": 0, "fallbacks": 0, "added": 0, "evicted": 0, "same_context": 0}

    @property
    def tenant_cap(self) -> int:
        cap = self.config.max_tenant_bytes
        return self.config.max_bytes if cap is None else min(cap, self.config.max_bytes)

    def note_origin(self, namespace: str, base_key: str, context: str) -> None:
        """Remember which of the tenant's contexts computed a segment's base (the first one wins; bounded,
        least recent forgotten). Kept in memory: another instance sees the origin as unknown."""
        with self._lock:
            self._origins.setdefault(namespace, base_key, context)

    def origin(self, namespace: str, base_key: str) -> str | None:
        with self._lock:
            return self._origins.get(namespace, base_key)

    def forget_origin(self, namespace: str, base_key: str, context: str) -> None:
        """Drop ``context`` as the origin of a base it did not get to publish (another writer won: the
        stored base came from elsewhere, so its origin is unknown here)."""
        with self._lock:
            if self._origins.get(namespace, base_key) == context:
                self._origins.pop(namespace, base_key)

    def count_same_context(self) -> None:
        with self._lock:
            self.counters["same_context"] += 1

    def __len__(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._anchors.values())

    def contexts(self, namespace: str | None = None) -> dict[tuple[str, str], int]:
        """Anchors per (namespace, context), of one tenant or of all."""
        with self._lock:
            return {k: len(v) for k, v in self._anchors.items() if namespace is None or k[0] == namespace}

    def tenant_bytes(self, namespace: str) -> int:
        with self._lock:
            return self._bytes.get(namespace, 0)

    def add(self, namespace: str, context: str, base: KVChunk, real_kv: torch.Tensor,
            real_positions: torch.Tensor) -> None:
        """Record the deviation of ``base`` observed as ``real_kv`` (at ``real_positions``) in the tenant's
        ``context``."""
        if real_kv.shape != base.kv.shape:
            raise ValueError(f"real KV {tuple(real_kv.shape)} does not match base {tuple(base.kv.shape)}")
        base0 = _frame0(base.kv.float(), base.positions, self.inv_freq)
        real0 = _frame0(real_kv.float(), real_positions, self.inv_freq)
        anchor = Anchor(summarize(base0), (real0 - base0).to(base.kv.dtype))
        if anchor.nbytes > self.tenant_cap:
            log.warning("anchor of %d bytes over the tenant's anchor budget; not kept", anchor.nbytes)
            return
        key = (namespace, context)
        self._ensure_loaded(namespace, context)
        with self._lock:
            entries = self._anchors.setdefault(key, [])
            same = next((a for a in entries if a.num_tokens == anchor.num_tokens
                         and torch.equal(a.summary, anchor.summary)), None)
            if same is not None:  # the same segment seen again in this context: refresh, do not duplicate
                same.deviation = anchor.deviation
                anchor = same
            else:
                entries.append(anchor)
                self._account(namespace, anchor.nbytes)
                self.counters["added"] += 1
                while len(entries) > self.config.max_per_context:
                    self._evict_from(key, anchor)
                self._enforce(namespace, anchor)
                # An evicted anchor's slot is reused: a context never persists more than max_per_context.
                taken = {a.slot for a in self._anchors.get(key, []) if a is not anchor}
                anchor.slot = next(i for i in range(self.config.max_per_context) if i not in taken)
        self._save(namespace, context, anchor)

    def _account(self, namespace: str, nbytes: int) -> None:
        self.used_bytes += nbytes
        left = self._bytes.get(namespace, 0) + nbytes
        if left:
            self._bytes[namespace] = left
        else:
            self._bytes.pop(namespace, None)

    def _enforce(self, namespace: str, protect: Anchor | None) -> None:
        """The writer's cap first (it evicts its own anchors), then the global bound (the tenant holding the
        most bytes evicts; the writer on a tie)."""
        while self._bytes.get(namespace, 0) > self.tenant_cap and self._evict_tenant(namespace, protect):
            pass
        while self.used_bytes > self.config.max_bytes:
            order = sorted(self._bytes, key=lambda t: (self._bytes[t], t == namespace), reverse=True)
            if not any(self._evict_tenant(t, protect) for t in order):
                break

    def _save(self, namespace: str, context: str, anchor: Anchor) -> None:
        if self.persist is None:
            return
        try:
            self.persist.save(namespace, context, anchor)
        except Exception as exc:  # a store failure must not fail the request
            log.warning("anchor persistence failed: %s", exc)

    def _ensure_loaded(self, namespace: str, context: str) -> None:
        if self.persist is None:
            return
        with self._lock:
            if self._loaded.get(namespace, context) is not None:
                return
        try:
            found = self.persist.load(namespace, context, self.config.max_per_context)
        except Exception as exc:
            log.warning("anchor load failed: %s", exc)
            return
        key = (namespace, context)
        with self._lock:
            if self._loaded.get(namespace, context) is not None:
                return
            self._loaded.setdefault(namespace, context, "")
            entries = self._anchors.setdefault(key, [])
            taken = {a.slot for a in entries}
            for anchor in found:
                if anchor.slot not in taken and len(entries) < self.config.max_per_context:
                    entries.append(anchor)
                    self._account(namespace, anchor.nbytes)
            if not entries:
                del self._anchors[key]
            self._enforce(namespace, None)

    def _evict_from(self, key: tuple[str, str], protect: Anchor | None) -> bool:
        entries = [a for a in self._anchors.get(key, []) if a is not protect]
        if not entries:
            return False
        victim = min(entries, key=lambda a: (a.uses, a.added))
        self._anchors[key].remove(victim)
        if not self._anchors[key]:
            del self._anchors[key]
        self._account(key[0], -victim.nbytes)
        self.counters["evicted"] += 1
        return True

    def _evict_tenant(self, namespace: str, protect: Anchor | None) -> bool:
        """Evict the tenant's least used (then oldest) anchor."""
        candidates = [(a.uses, a.added, k) for k, v in self._anchors.items() if k[0] == namespace
                      for a in v if a is not protect]
        if not candidates:
            return False
        return self._evict_from(min(candidates)[2], protect)

    def estimate(self, namespace: str, context: str, base: KVChunk, new_positions: torch.Tensor) -> Estimate:
        """Corrected KV of ``base`` placed at ``new_positions`` in the tenant's ``context``, or a reason to
        fall back."""
        n = base.num_tokens
        self._ensure_loaded(namespace, context)
        with self._lock:
            anchors = [a for a in self._anchors.get((namespace, context), [])
                       if a.num_tokens >= self.config.min_overlap * n]
        if not anchors:
            return self._miss("no anchor for this context and length", 0, 0.0, math.inf)
        base0 = _frame0(base.kv.float(), base.positions, self.inv_freq)  # [L, 2, H, T, D]
        query = summarize(base0)
        norm = query.pow(2).sum(dim=(2, 3, 4)).sqrt().clamp_min(1e-6)  # [L, 2]
        rel = torch.stack([(a.summary - query).pow(2).sum(dim=(2, 3, 4)).sqrt() / norm for a in anchors])
        closest = float(rel.min(dim=0).values.mean())
        weights = torch.softmax(-rel / self.config.temperature, dim=0)  # per layer, K and V separately
        entropy = 0.0
        if len(anchors) > 1:
            ent = -(weights * weights.clamp_min(1e-12).log()).sum(dim=0) / math.log(len(anchors))
            entropy = float(ent.mean())
        if closest > self.config.max_distance:
            return self._miss("no anchor close enough", len(anchors), entropy, closest)
        if entropy > self.config.max_entropy:
            return self._miss("anchor weights too flat", len(anchors), entropy, closest)
        order = weights.mean(dim=(1, 2)).argsort(descending=True)[: self.config.top_k].tolist()
        top = weights[order] / weights[order].sum(dim=0, keepdim=True)  # [k, L, 2]
        corrected = base0
        for w, i in zip(top, order, strict=True) if self.config.apply_deviation else ():
            corrected += w[:, :, None, None, None] * _fit(anchors[i].deviation.float(), n)
        corrected[:, 0] = rerotate(corrected[:, 0], torch.zeros_like(new_positions), new_positions, self.inv_freq)
        with self._lock:
            anchors[order[0]].uses += 1
            self.counters["estimates"] += 1
        chunk = KVChunk(corrected.to(base.kv.dtype), new_positions.clone(), base.fingerprint)
        return Estimate(chunk, None, len(anchors), entropy, closest)

    def _miss(self, reason: str, count: int, entropy: float, distance: float) -> Estimate:
        with self._lock:
            self.counters["fallbacks"] += 1
        return Estimate(None, reason, count, entropy, distance)

    def stats(self) -> dict[str, object]:
        with self._lock:
            return {
                "anchors": sum(len(v) for v in self._anchors.values()),
                "contexts": len(self._anchors),
                "tenants": len(self._bytes),
                "origins": len(self._origins),
                "used_bytes": self.used_bytes,
                "budget_bytes": self.config.max_bytes,
                **self.counters,
            }
