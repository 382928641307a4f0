"""KVCOMM-style anchor pool: the bounded, online-updated set of anchors, per tenant and context.

The pool keeps :class:`~blending.anchor_estimate.Anchor` records per (tenant, context), bounds them (entries
per context, bytes per tenant and overall), persists them through an optional
:class:`~blending.anchor_store.AnchorStore` and answers :meth:`AnchorPool.estimate` with the context's anchors
(the mixing itself is :func:`blending.anchor_estimate.estimate`). When no anchor is close enough the caller
falls back to a dense prefill and records a new anchor with :meth:`AnchorPool.add`.

Everything is per tenant (namespace): anchors, their contexts and persisted slots. One tenant's traffic never
reads, adds to or replaces another's anchors; the shared byte bound evicts from the tenant holding the most,
so a tenant keeps at least an equal share. Where a base came from is not the pool's business
(:mod:`blending.anchor_origins`).
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass

import torch

from blending.anchor_estimate import Anchor, Estimate, estimate, observe
from blending.anchor_origins import TenantRecent
from blending.anchor_store import AnchorStore
from kvstore.chunk import KVChunk

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


class AnchorPool:
    """Bounded (entries per context, bytes per tenant and overall), updated online, safe under concurrent
    requests; persisted through an optional :class:`AnchorStore` (a store failure is logged, never raised).
    Every method takes the tenant's ``namespace``: contexts and persisted slots are the tenant's own."""

    def __init__(
        self, inv_freq: torch.Tensor, config: AnchorConfig | None = None, persist: AnchorStore | None = None
    ) -> None:
        self.config = config or AnchorConfig()
        self.inv_freq = inv_freq
        self.persist = persist
        self._anchors: dict[tuple[str, str], list[Anchor]] = {}  # (namespace, context) -> anchors
        self._bytes: dict[str, int] = {}  # namespace -> bytes of its anchors
        self._loaded = TenantRecent(self.config.max_origins)  # (namespace, context) probed in the store
        self._lock = threading.Lock()
        self.used_bytes = 0
        self.counters = {"estimates": 0, "fallbacks": 0, "added": 0, "evicted": 0, "same_context": 0}

    @property
    def tenant_cap(self) -> int:
        cap = self.config.max_tenant_bytes
        return self.config.max_bytes if cap is None else min(cap, self.config.max_bytes)

    def count_same_context(self) -> None:
        """Count a base reused as is in the context that computed it (no estimate needed)."""
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
        ``context``; the same segment seen again refreshes its anchor. Raises ValueError on mismatched shapes."""
        anchor = observe(base, real_kv, real_positions, self.inv_freq)
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

    def estimate(self, namespace: str, context: str, base: KVChunk, new_positions: torch.Tensor) -> Estimate:
        """Corrected KV of ``base`` placed at ``new_positions`` in the tenant's ``context``, or a reason to
        fall back."""
        self._ensure_loaded(namespace, context)
        with self._lock:
            anchors = [a for a in self._anchors.get((namespace, context), [])
                       if a.num_tokens >= self.config.min_overlap * base.num_tokens]
        if not anchors:
            result, top = Estimate(None, "no anchor for this context and length", 0, 0.0, math.inf), None
        else:
            result, top = estimate(anchors, base, new_positions, self.inv_freq, self.config)
        with self._lock:
            if top is None:
                self.counters["fallbacks"] += 1
            else:
                anchors[top].uses += 1
                self.counters["estimates"] += 1
        return result

    def stats(self) -> dict[str, object]:
        with self._lock:
            return {
                "anchors": sum(len(v) for v in self._anchors.values()),
                "contexts": len(self._anchors),
                "tenants": len(self._bytes),
                "used_bytes": self.used_bytes,
                "budget_bytes": self.config.max_bytes,
                **self.counters,
            }

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
