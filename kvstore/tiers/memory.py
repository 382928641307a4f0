"""Device (GPU) and host (CPU) tiers: chunks kept as tensors, no encoding."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import torch

from kvstore.chunk import KVChunk
from kvstore.hostmem import clone_to_host, cuda_available
from kvstore.keys import ChunkKey
from kvstore.tiers.base import Evicted, Tier
from kvstore.tiers.eviction import EvictionPolicy, make_policy
from kvstore.tiers.stats import TierStats


class MemoryTier(Tier):
    """Chunks in device or host memory under a byte budget.

    ``device="cpu"``: host memory, page-locked when ``pin_memory`` (default: when CUDA is available) so
    transfers to the GPU are fast. ``device="cuda[:i]"``: GPU memory; positions stay on the host.
    ``put`` copies the tensors into the tier's memory unless ``owned=True`` and they already live there;
    ``get`` returns the stored tensors without a copy (read-only for the caller).
    """

    def __init__(
        self,
        budget_bytes: int,
        *,
        device: str | torch.device = "cpu",
        policy: str | EvictionPolicy = "lru",
        pin_memory: bool | None = None,
        name: str | None = None,
    ) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.name = name or ("cpu" if self.device.type == "cpu" else "device")
        self._pin = self.device.type == "cpu" and (cuda_available() if pin_memory is None else pin_memory)
        self._budget = int(budget_bytes)
        self._policy = make_policy(policy) if isinstance(policy, str) else policy
        self._entries: dict[ChunkKey, KVChunk] = {}
        self._used = 0
        self._lock = threading.Lock()
        self.stats = TierStats()

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def budget_bytes(self) -> int:
        return self._budget

    def _resident(self, t: torch.Tensor) -> bool:
        if t.device != self.device or not t.is_contiguous():
            return False
        return not self._pin or t.is_pinned()

    def _adopt(self, chunk: KVChunk, owned: bool) -> KVChunk:
        """The chunk in this tier's memory, copied unless handed over and already resident."""
        positions = chunk.positions
        if not owned or positions.device.type != "cpu":
            positions = positions.to("cpu", copy=True)
        if owned and self._resident(chunk.kv):
            kv = chunk.kv
        elif self.device.type == "cpu":
            kv = clone_to_host(chunk.kv, self._pin)
        else:
            kv = torch.empty(chunk.kv.shape, dtype=chunk.kv.dtype, device=self.device)
            kv.copy_(chunk.kv)
        return KVChunk(kv, positions, chunk.fingerprint)

    def get(self, key: ChunkKey) -> KVChunk | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[ChunkKey]) -> list[KVChunk | None]:
        start = time.perf_counter()
        with self._lock:
            out = [self._entries.get(k) for k in keys]
            for k, c in zip(keys, out, strict=True):
                if c is not None:
                    self._policy.touch(k)
        hits = [c for c in out if c is not None]
        self.stats.record_get(
            len(hits), len(out) - len(hits), sum(c.nbytes for c in hits), time.perf_counter() - start
        )
        return out

    def _insert_locked(self, key: ChunkKey, stored: KVChunk) -> list[Evicted]:
        """Put ``stored`` under ``key`` (replacing), evicting to fit; the caller holds ``_lock``."""
        size = stored.nbytes
        evicted: list[Evicted] = []
        old = self._entries.pop(key, None)
        if old is not None:
            self._used -= old.nbytes
            self._policy.remove(key)
        while self._used + size > self._budget:
            victim = self._policy.victim()
            if victim is None:  # pragma: no cover - accounting invariant
                break
            self._policy.remove(victim)
            gone = self._entries.pop(victim)
            self._used -= gone.nbytes
            evicted.append((victim, gone))
        self._entries[key] = stored
        self._used += size
        self._policy.insert(key, size)
        return evicted

    def put(self, key: ChunkKey, chunk: KVChunk, *, owned: bool = False) -> list[Evicted]:
        start = time.perf_counter()
        size = chunk.nbytes
        if size > self._budget:
            self.stats.add(evictions=1)
            return [(key, chunk)]
        stored = self._adopt(chunk, owned)
        with self._lock:
            evicted = self._insert_locked(key, stored)
        self.stats.add(evictions=len(evicted))
        self.stats.record_put(1, size, time.perf_counter() - start)
        return evicted

    def put_many_if_absent(
        self, items: Sequence[tuple[ChunkKey, KVChunk]], *, owned: bool = False
    ) -> tuple[list[bool], list[Evicted]]:
        """Atomic per key under the tier's lock: of concurrent callers, exactly one stores a key."""
        start = time.perf_counter()
        stored: list[bool] = []
        evicted: list[Evicted] = []
        nbytes = 0
        for key, chunk in items:
            if chunk.nbytes > self._budget:
                self.stats.add(evictions=1)
                evicted.append((key, chunk))
                stored.append(False)
                continue
            with self._lock:
                present = key in self._entries
            # copy outside the lock (as put does); the decision is taken again under it
            copy = None if present else self._adopt(chunk, owned)
            won = False
            with self._lock:
                if copy is not None and key not in self._entries:
                    gone = self._insert_locked(key, copy)
                    evicted.extend(gone)
                    self.stats.add(evictions=len(gone))
                    won = True
            stored.append(won)
            nbytes += chunk.nbytes if won else 0
        self.stats.record_put(sum(stored), nbytes, time.perf_counter() - start)
        return stored, evicted

    def contains(self, key: ChunkKey) -> bool:
        with self._lock:
            return key in self._entries

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            return [k in self._entries for k in keys]

    def delete(self, key: ChunkKey) -> bool:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is None:
                return False
            self._used -= old.nbytes
            self._policy.remove(key)
            return True

    def keys(self) -> list[ChunkKey]:
        with self._lock:
            return list(self._entries)

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._used = 0
            for k in list(self._policy):
                self._policy.remove(k)
