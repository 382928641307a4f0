"""TieredStore: one chunk cache over device, CPU, SSD and Redis tiers."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar

import torch

from kvstore.chunk import KVChunk
from kvstore.codec import decode
from kvstore.config import WRITE_MODES, StoreConfig, WriteMode
from kvstore.errors import TierError, TierUnavailableError
from kvstore.health import TierHealth
from kvstore.keys import ChunkKey
from kvstore.store_stats import StoreStats, TierReport
from kvstore.tiers.base import Evicted, Tier

__all__ = ["StoreConfig", "TieredStore", "WriteMode"]

log = logging.getLogger("kvstore.store")
T = TypeVar("T")
Items = Sequence[tuple[ChunkKey, KVChunk]]


class TieredStore:
    """A content-addressed chunk cache over ordered tiers (fastest first).

    - Reads ask tier 0 for every key, then each next tier only for the keys still missing; a hit below the
      top is promoted into the top tier (and into the write-through tiers above where it was found).
      Returned chunks are on the CPU unless ``device`` is given, and are read-only (clone to modify).
    - Writes go to the top tier and every write-through tier; a write-back tier receives what the tier
      above it evicts.
    - A tier that fails is skipped with a logged reason and counted; an unreachable one is retried after a
      backoff and rejoins by itself. The store never fails a read because of a tier: it degrades to a miss.
    - Thread-safe: each tier locks itself; the store holds no lock across I/O.
    """

    def __init__(
        self,
        tiers: list[Tier],
        *,
        write_modes: Sequence[WriteMode] | None = None,
        retry_backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        prefetch_workers: int = 2,
    ) -> None:
        if not tiers:
            raise ValueError("a TieredStore needs at least one tier")
        modes: list[WriteMode] = list(write_modes or ["write-through"] * len(tiers))
        if len(modes) != len(tiers) or any(m not in WRITE_MODES for m in modes):
            raise ValueError(f"write_modes must give one of {WRITE_MODES} per tier")
        self._tiers = list(tiers)
        self._modes = modes
        self._modes[0] = "write-through"
        for i, tier in enumerate(self._tiers):
            tier.collect_evicted = i + 1 < len(tiers) and self._modes[i + 1] == "write-back"
        self._health = [TierHealth(t.name, retry_backoff_s, max_backoff_s) for t in self._tiers]
        self._prefetcher = ThreadPoolExecutor(prefetch_workers, thread_name_prefix="kvstore-prefetch")
        self._writers = ThreadPoolExecutor(4 * max(1, len(tiers) - 1), thread_name_prefix="kvstore-write")
        self._counter_lock = threading.Lock()
        self._gets = self._hits = self._puts = 0

    @classmethod
    def from_config(cls, cfg: StoreConfig) -> TieredStore:
        tiers, modes = cfg.build_tiers()
        return cls(
            tiers,
            write_modes=modes,
            retry_backoff_s=cfg.retry_backoff_s,
            max_backoff_s=cfg.max_backoff_s,
            prefetch_workers=cfg.prefetch_workers,
        )

    @property
    def tiers(self) -> list[Tier]:
        return list(self._tiers)

    @property
    def write_modes(self) -> list[WriteMode]:
        return list(self._modes)

    # -- failure isolation ----------------------------------------------------------------------------
    def _call(
        self, i: int, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any
    ) -> tuple[bool, T | None]:
        """Run ``fn`` on tier ``i`` unless it is backing off; (ok, result), never raises tier failures."""
        health, tier = self._health[i], self._tiers[i]
        if not health.usable():
            return False, None
        try:
            result = fn(*args, **kwargs)
        except TierUnavailableError as exc:
            health.failed(f"{what}: {exc}", unavailable=True)
            return False, None
        except TierError as exc:
            health.failed(f"{what}: {exc}", unavailable=False)
            return False, None
        except Exception as exc:  # a bug or an unexpected library error: isolate the tier, keep serving
            log.exception("tier %s: unexpected error in %s", tier.name, what)
            tier.stats.add(errors=1)
            health.failed(f"{what}: {type(exc).__name__}: {exc}", unavailable=True)
            return False, None
        health.succeeded()
        return True, result

    # -- reads ----------------------------------------------------------------------------------------
    def _lookup(self, keys: Sequence[ChunkKey]) -> list[KVChunk | None]:
        found: list[KVChunk | None] = [None] * len(keys)
        where = [-1] * len(keys)
        remaining = list(range(len(keys)))
        for i, tier in enumerate(self._tiers):
            if not remaining:
                break
            ok, got = self._call(i, "get", tier.get_many, [keys[j] for j in remaining])
            if not ok or got is None:
                continue
            still = []
            for j, chunk in zip(remaining, got, strict=True):
                if chunk is None:
                    still.append(j)
                else:
                    found[j], where[j] = chunk, i
            remaining = still
        self._promote(keys, found, where)
        with self._counter_lock:
            self._gets += len(keys)
            self._hits += len(keys) - len(remaining)
        return found

    def _promote(self, keys: Sequence[ChunkKey], found: list[KVChunk | None], where: list[int]) -> None:
        by_tier: dict[int, dict[ChunkKey, KVChunk]] = {}
        for key, chunk, i in zip(keys, found, where, strict=True):
            if chunk is not None and i > 0:
                by_tier.setdefault(i, {})[key] = chunk
        for i, items in sorted(by_tier.items()):
            batch = list(items.items())
            self._write(0, batch, owned=True)
            for j in range(1, i):  # keep write-through tiers inclusive, off the read path
                if self._modes[j] == "write-through":
                    self._writers.submit(self._write, j, batch, True)

    def get(self, key: ChunkKey, device: torch.device | str | None = None) -> KVChunk | None:
        return self.get_many([key], device=device)[0]

    def get_many(
        self, keys: Sequence[ChunkKey], device: torch.device | str | None = None
    ) -> list[KVChunk | None]:
        """One result per key (misses are ``None``), each key looked up independently."""
        target = torch.device(device) if device is not None else torch.device("cpu")
        out = self._lookup(keys)
        return [c if c is None or c.kv.device == target else c.to(target) for c in out]

    def contains(self, key: ChunkKey) -> bool:
        return self.contains_many([key])[0]

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        out = [False] * len(keys)
        remaining = list(range(len(keys)))
        for i, tier in enumerate(self._tiers):
            if not remaining:
                break
            ok, got = self._call(i, "contains", tier.contains_many, [keys[j] for j in remaining])
            if ok and got is not None:
                for j, present in zip(remaining, got, strict=True):
                    out[j] = out[j] or present
                remaining = [j for j in remaining if not out[j]]
        return out

    def get_blob(self, key: ChunkKey) -> bytes | None:
        """The validated codec blob of ``key`` from the first tier that has it (no promotion)."""
        for i, tier in enumerate(self._tiers):
            ok, blob = self._call(i, "get_blob", tier.get_blob, key)
            if ok and blob is not None:
                with self._counter_lock:
                    self._gets += 1
                    self._hits += 1
                return blob
        with self._counter_lock:
            self._gets += 1
        return None

    def prefetch(self, keys: Sequence[ChunkKey]) -> Future[int]:
        """Promote ``keys`` into the top tier in the background; the future gives how many were found."""
        keys = list(keys)
        return self._prefetcher.submit(lambda: sum(c is not None for c in self._lookup(keys)))

    # -- writes ---------------------------------------------------------------------------------------
    def _write(
        self, i: int, items: list[tuple[ChunkKey, KVChunk]], owned: bool, fallback: bool = False
    ) -> None:
        """Write into tier ``i`` and push its evictions down to write-back tiers below.

        ``fallback``: if the write fails, hand the items to the write-back tier below instead.
        """
        ok, evicted = self._call(i, "put", self._tiers[i].put_many, items, owned=owned)
        if not ok:
            evicted = list(items) if fallback else []
        self._demote(i, evicted or [])

    def _demote(self, i: int, evicted: list[Evicted]) -> None:
        while evicted and i + 1 < len(self._tiers) and self._modes[i + 1] == "write-back":
            i += 1
            ok, more = self._call(i, "demote", self._tiers[i].put_many, evicted, owned=True)
            evicted = (more or []) if ok else []

    def put(self, key: ChunkKey, chunk: KVChunk) -> None:
        self.put_many([(key, chunk)])

    def put_many(self, items: Items) -> None:
        """Store chunks in the top tier and every write-through tier (lower tiers written in parallel)."""
        self._put_items(list(items), owned=False)

    def _put_items(self, items: list[tuple[ChunkKey, KVChunk]], owned: bool) -> None:
        if not items:
            return
        lower = [j for j in range(1, len(self._tiers)) if self._modes[j] == "write-through"]
        futures = [self._writers.submit(self._write, j, items, False) for j in lower]
        self._write(0, items, owned, fallback=True)
        for f in futures:
            f.result()
        with self._counter_lock:
            self._puts += len(items)

    def put_if_absent(self, key: ChunkKey, chunk: KVChunk) -> bool:
        """Store ``chunk`` unless ``key`` is held anywhere; ``True`` when this call stored it."""
        return self.put_many_if_absent([(key, chunk)])[0]

    def put_many_if_absent(self, items: Items) -> list[bool]:
        """First-writer-wins publication: per item, ``True`` when this call stored it.

        A key that any tier already holds is not written (``False``). Otherwise the lowest tier, the one
        shared most widely (Redis if configured, else SSD, else memory), decides atomically which of all
        concurrent writers, in this process or any other store on the same medium, stores it; only the
        winner then writes its chunk to the top tier and the write-through tiers above. If that tier cannot
        be reached, the next one up decides (logged: first-writer-wins then holds only among the writers
        sharing that tier). A key repeated in ``items`` is stored at most once (its first item).
        """
        items = list(items)
        stored = [False] * len(items)
        first: dict[ChunkKey, int] = {}
        for j, (key, _) in enumerate(items):
            first.setdefault(key, j)
        todo = sorted(first.values())
        held = self.contains_many([items[j][0] for j in todo])
        todo = [j for j, h in zip(todo, held, strict=True) if not h]
        if not todo:
            return stored
        batch = [items[j] for j in todo]
        for i in reversed(range(len(self._tiers))):
            tier = self._tiers[i]
            ok, result = self._call(i, "put_if_absent", tier.put_many_if_absent, batch)
            if ok and result is not None:
                break
            log.warning("put_if_absent: tier %s cannot decide (%s); asking the tier above", tier.name,
                        self._health[i].last_error or "backing off")
        else:
            return stored
        won, evicted = result
        self._demote(i, evicted)
        winners = [item for item, w in zip(batch, won, strict=True) if w]
        if winners:
            between = [j for j in range(1, i) if self._modes[j] == "write-through"]
            futures = [self._writers.submit(self._write, j, winners, False) for j in between]
            if i != 0:
                self._write(0, winners, False)
            for f in futures:
                f.result()
        for j, w in zip(todo, won, strict=True):
            stored[j] = w
        with self._counter_lock:
            self._puts += len(winners)
        return stored

    def put_blob(
        self, key: ChunkKey, blob: bytes | bytearray | memoryview, expected_fingerprint: str | None = None
    ) -> KVChunk:
        """Validate ``blob`` by decoding it (raises :class:`CodecError`, storing nothing) and store it."""
        chunk = decode(blob, expected_fingerprint, copy=True)
        self._put_items([(key, chunk)], owned=True)
        return chunk

    def delete(self, key: ChunkKey) -> bool:
        """Remove ``key`` from every tier; ``True`` if any tier had it."""
        removed = False
        for i, tier in enumerate(self._tiers):
            ok, had = self._call(i, "delete", tier.delete, key)
            removed = removed or bool(ok and had)
        return removed

    # -- reporting / lifecycle ------------------------------------------------------------------------
    def stats(self) -> StoreStats:
        reports = tuple(
            TierReport(
                name=t.name,
                kind=type(t).__name__,
                available=h.available,
                used_bytes=t.used_bytes,
                budget_bytes=t.budget_bytes,
                skipped=h.skipped,
                last_error=h.last_error,
                stats=t.stats.snapshot(),
            )
            for t, h in zip(self._tiers, self._health, strict=True)
        )
        with self._counter_lock:
            return StoreStats(reports, self._gets, self._hits, self._puts)

    def close(self) -> None:
        self._prefetcher.shutdown(wait=True)
        self._writers.shutdown(wait=True)
        for tier in self._tiers:
            try:
                tier.close()
            except Exception:
                log.exception("closing tier %s failed", tier.name)

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
