"""Device (GPU) and host (CPU) tiers: chunks kept as tensors, no encoding.

The host tier keeps its chunks in a pre-allocated :class:`~kvstore.arena.HostArena` whose size is the
tier's budget: a put is one copy into warm (pinned where CUDA exists) memory, a get returns the stored
tensors without a copy, and the budget is accounted in arena bytes. An evicted chunk's block is reused only
when no tensor still views it (see :mod:`kvstore.arena`). The device tier keeps tensors allocated by torch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from kvstore.arena import HostArena
from kvstore.chunk import KVChunk
from kvstore.hostmem import clone_to_host, copy_bytes, cuda_available
from kvstore.keys import ChunkKey
from kvstore.tiers.base import BudgetedTier, Evicted
from kvstore.tiers.eviction import EvictionPolicy


def _arena_nbytes(chunk: KVChunk) -> tuple[int, int]:
    """(offset of the positions, total bytes) of ``chunk`` laid out in one arena block: KV, then positions."""
    kv_bytes = chunk.kv.numel() * chunk.kv.element_size()
    pos_off = -(-kv_bytes // 8) * 8
    return pos_off, pos_off + chunk.num_tokens * 8


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[...] = src``. Contiguous host tensors: :func:`~kvstore.hostmem.copy_bytes` on their bytes;
    anything else: torch's copy."""
    host = src.device.type == "cpu" and dst.device.type == "cpu"
    if host and src.is_contiguous() and dst.is_contiguous() and src.numel():
        copy_bytes(dst.reshape(-1).view(torch.uint8).numpy(), src.reshape(-1).view(torch.uint8).numpy())
    elif src.numel():
        dst.copy_(src)


class MemoryTier(BudgetedTier):
    """Chunks in device or host memory under a byte budget.

    ``device="cpu"``: an arena of ``budget_bytes`` host memory, page-locked when ``pin_memory`` (default:
    when CUDA is available) so transfers to the GPU are fast; ``prefault=True`` faults it all in at
    construction (otherwise it is faulted in the background, ahead of use). ``device="cuda[:i]"``: GPU memory;
    positions stay on the host, and ``put`` keeps tensors handed over with ``owned=True`` that already live
    there. ``get`` returns the stored tensors without a copy (read-only for the caller).
    """

    def __init__(
        self,
        budget_bytes: int,
        *,
        device: str | torch.device = "cpu",
        policy: str | EvictionPolicy = "lru",
        pin_memory: bool | None = None,
        prefault: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(budget_bytes, policy)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.name = name or ("cpu" if self.device.type == "cpu" else "device")
        self._pin = self.device.type == "cpu" and (cuda_available() if pin_memory is None else pin_memory)
        self.arena: HostArena | None = None
        if self.device.type == "cpu":
            self.arena = HostArena(self._budget, pin=self._pin)
            self._budget = self.arena.capacity
            if prefault:
                self.arena.populate()
        self._entries: dict[ChunkKey, KVChunk] = {}  # same keys as the index (``_sizes``)

    @property
    def retired_bytes(self) -> int:
        """Arena bytes of chunks no longer stored whose memory a caller still views (0 on a device tier)."""
        if self.arena is None:
            return 0
        with self._lock:
            return max(0, self.arena.allocated_bytes - self._used)

    def _size_of(self, chunk: KVChunk) -> int:
        return HostArena.block_size(_arena_nbytes(chunk)[1]) if self.arena is not None else chunk.nbytes

    # -- placing a chunk in this tier's memory --------------------------------------------------------
    def _to_device(self, chunk: KVChunk, owned: bool) -> KVChunk:
        positions = chunk.positions
        if not owned or positions.device.type != "cpu":
            positions = positions.to("cpu", copy=True)
        kv = chunk.kv
        if not (owned and kv.device == self.device and kv.is_contiguous()):
            kv = torch.empty(kv.shape, dtype=kv.dtype, device=self.device)
            kv.copy_(chunk.kv)
        return KVChunk(kv, positions, chunk.fingerprint)

    def _reserve(self, nbytes: int) -> tuple[torch.Tensor | None, list[Evicted]]:
        """An arena lease of ``nbytes``, evicting by policy until one fits; ``None`` if nothing is left to evict
        (the arena is then held by chunks that callers still view)."""
        assert self.arena is not None
        evicted: list[Evicted] = []
        count = 0
        with self._lock:
            while (lease := self.arena.alloc(nbytes)) is None:
                victim = self._policy.victim()
                if victim is None:
                    break
                gone = self._remove_locked(victim)
                count += 1
                if self.collect_evicted:  # the tier below takes it: hand over a copy, free the block now
                    kv, pos = clone_to_host(gone.kv), gone.positions.clone()
                    evicted.append((victim, KVChunk(kv, pos, gone.fingerprint)))
                del gone  # the last reference (unless a caller views it): its block is freed here
        self.stats.add(evictions=count)
        return lease, evicted

    def _fill(self, lease: torch.Tensor, chunk: KVChunk) -> KVChunk:
        pos_off, total = _arena_nbytes(chunk)
        src, pos = chunk.kv.detach(), chunk.positions.detach()
        kv_bytes = src.numel() * src.element_size()
        kv = lease[:kv_bytes].view(src.dtype).view(src.shape)
        positions = lease[pos_off:total].view(torch.int64)
        if src.device.type == "cpu" and src.is_contiguous() and pos.device.type == "cpu" and src.numel():
            raw = lease.numpy()  # the common case, straight on the bytes: each torch call costs µs
            copy_bytes(raw[:kv_bytes], src.view(-1).view(torch.uint8).numpy())
            np.copyto(raw[pos_off:total].view(np.int64), pos.numpy(), casting="unsafe")
        else:
            _copy_into(kv, src)
            _copy_into(positions, pos.to(torch.int64))
        return KVChunk(kv, positions, chunk.fingerprint)

    def _place(self, chunk: KVChunk, owned: bool) -> tuple[KVChunk | None, list[Evicted]]:
        """The chunk in this tier's memory (``None``: no room) and what was evicted to make room."""
        if self.arena is None:
            return self._to_device(chunk, owned), []
        lease, evicted = self._reserve(_arena_nbytes(chunk)[1])
        return (None if lease is None else self._fill(lease, chunk)), evicted

    # -- index ----------------------------------------------------------------------------------------
    def _remove_locked(self, key: ChunkKey) -> KVChunk:
        self._unaccount_locked(key)
        return self._entries.pop(key)

    def _insert_locked(self, key: ChunkKey, stored: KVChunk) -> list[Evicted]:
        """Put ``stored`` under ``key`` (replacing); a device tier evicts to fit (an arena tier made room when it
        reserved the block). The caller holds ``_lock``."""
        self._entries.pop(key, None)
        victims = self._account_locked(key, self._size_of(stored), evict=self.arena is None)
        evicted = [(victim, self._entries.pop(victim)) for victim in victims]
        self._entries[key] = stored
        return evicted

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

    def put(self, key: ChunkKey, chunk: KVChunk, *, owned: bool = False) -> list[Evicted]:
        start = time.perf_counter()
        if self._over_budget(self._size_of(chunk)):
            return [(key, chunk)]
        stored, evicted = self._place(chunk, owned)
        if stored is None:  # the arena is held by views of evicted chunks: not stored
            self.stats.add(evictions=1)
            return [*evicted, (key, chunk)]
        with self._lock:
            gone = self._insert_locked(key, stored)
        self.stats.add(evictions=len(gone))
        self.stats.record_put(1, chunk.nbytes, time.perf_counter() - start)
        return evicted + gone

    def put_many_if_absent(
        self, items: Sequence[tuple[ChunkKey, KVChunk]], *, owned: bool = False
    ) -> tuple[list[bool], list[Evicted]]:
        """Atomic per key under the tier's lock: of concurrent callers, exactly one stores a key."""
        start = time.perf_counter()
        stored: list[bool] = []
        evicted: list[Evicted] = []
        nbytes = 0
        for key, chunk in items:
            if self._over_budget(self._size_of(chunk)):
                evicted.append((key, chunk))
                stored.append(False)
                continue
            with self._lock:
                present = key in self._entries
            # copy outside the lock (as put does); the decision is taken again under it
            copy, more = (None, []) if present else self._place(chunk, owned)
            evicted.extend(more)
            won = False
            with self._lock:
                if copy is not None and key not in self._entries:
                    gone = self._insert_locked(key, copy)
                    evicted.extend(gone)
                    self.stats.add(evictions=len(gone))
                    won = True
            del copy  # a loser's copy: its block goes back to the arena
            stored.append(won)
            nbytes += chunk.nbytes if won else 0
        self.stats.record_put(sum(stored), nbytes, time.perf_counter() - start)
        return stored, evicted

    def delete(self, key: ChunkKey) -> bool:
        with self._lock:
            if key not in self._entries:
                return False
            self._remove_locked(key)
            return True

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._clear_locked()
