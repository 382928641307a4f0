"""The tier contract shared by device, host, SSD and Redis tiers."""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from types import TracebackType

from kvstore.chunk import KVChunk
from kvstore.codec import encode
from kvstore.keys import ChunkKey
from kvstore.tiers.eviction import EvictionPolicy, make_policy
from kvstore.tiers.stats import TierStats

Evicted = tuple[ChunkKey, KVChunk]


class Tier(ABC):
    """A byte-bounded map ``ChunkKey -> KVChunk`` on one medium.

    Contracts (every implementation):

    - Thread-safe: any method may be called from many threads at once; no global lock is held across I/O.
    - ``get``/``get_many`` return ``None`` for a miss. A corrupt entry is removed, counted in
      ``stats.corrupt`` and reported as a miss, never returned. Returned chunks are read-only: callers clone
      before modifying them in place.
    - ``put``/``put_many`` store (replacing any previous value of the key) and return what was evicted to stay
      within ``budget_bytes``, only when ``collect_evicted`` is set (the store sets it when the tier below
      takes demotions; the device tier returns them always), ``[]`` otherwise. A chunk larger than the whole
      budget, or one a full host arena cannot place, is not stored and comes back as evicted itself.
      ``owned=True`` says the caller hands the tensors over (nobody else writes them), so a device tier may
      keep them without a copy.
    - Failures: :class:`~kvstore.errors.TierUnavailableError` when the medium cannot be reached (the store
      backs off), :class:`~kvstore.errors.TierError` for other failures of one operation (e.g. disk full);
      both are counted in ``stats.errors``. Reads keep working after a failed write.
    - ``put_if_absent``/``put_many_if_absent`` store only keys the tier does not hold and say which they
      stored; a chunk larger than the whole budget is not stored (``False``) and comes back as evicted.
    - ``used_bytes <= budget_bytes`` after every operation returns.
    """

    name: str = "tier"
    collect_evicted: bool = False
    stats: TierStats

    @property
    @abstractmethod
    def used_bytes(self) -> int:
        """Bytes currently accounted to this tier."""

    @property
    @abstractmethod
    def budget_bytes(self) -> int:
        """The byte budget this tier never exceeds."""

    @abstractmethod
    def get(self, key: ChunkKey) -> KVChunk | None:
        """The chunk under ``key`` or ``None``."""

    def get_many(self, keys: Sequence[ChunkKey]) -> list[KVChunk | None]:
        """One result per key, in order; each key independent of the others."""
        return [self.get(k) for k in keys]

    @abstractmethod
    def put(self, key: ChunkKey, chunk: KVChunk, *, owned: bool = False) -> list[Evicted]:
        """Store ``chunk`` under ``key``; returns evicted entries (see class contract)."""

    def put_many(self, items: Sequence[tuple[ChunkKey, KVChunk]], *, owned: bool = False) -> list[Evicted]:
        """Store several chunks; returns everything evicted on the way."""
        evicted: list[Evicted] = []
        for key, chunk in items:
            evicted.extend(self.put(key, chunk, owned=owned))
        return evicted

    def put_if_absent(self, key: ChunkKey, chunk: KVChunk, *, owned: bool = False) -> tuple[bool, list[Evicted]]:
        """Store ``chunk`` only if ``key`` is absent: (whether this call stored it, evicted entries).

        The built-in tiers decide atomically against every concurrent writer they share the medium with
        (memory: other threads; SSD: other processes on the directory; Redis: every client of the server).
        This default is check-then-put, atomic against nothing: override it in a tier that can do better.
        """
        stored, evicted = self.put_many_if_absent([(key, chunk)], owned=owned)
        return stored[0], evicted

    def put_many_if_absent(
        self, items: Sequence[tuple[ChunkKey, KVChunk]], *, owned: bool = False
    ) -> tuple[list[bool], list[Evicted]]:
        """:meth:`put_if_absent` per item; a key repeated in ``items`` is stored at most once (first item)."""
        stored: list[bool] = []
        evicted: list[Evicted] = []
        seen: set[ChunkKey] = set()
        for key, chunk in items:
            if key in seen or self.contains(key):
                stored.append(False)
                continue
            seen.add(key)
            evicted.extend(self.put(key, chunk, owned=owned))
            stored.append(True)
        return stored, evicted

    @abstractmethod
    def contains(self, key: ChunkKey) -> bool:
        """Whether ``key`` is (believed to be) present; cheap, may not validate contents."""

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return [self.contains(k) for k in keys]

    @abstractmethod
    def delete(self, key: ChunkKey) -> bool:
        """Remove ``key``; ``True`` if it was present."""

    @abstractmethod
    def keys(self) -> list[ChunkKey]:
        """The keys this tier holds (for administration; may be slow on remote tiers)."""

    def get_blob(self, key: ChunkKey) -> bytes | None:
        """The codec blob of ``key`` (validated) or ``None``; tiers storing blobs override this."""
        chunk = self.get(key)
        return None if chunk is None else encode(chunk)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; the tier is unusable afterwards."""

    def __enter__(self) -> Tier:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, used={self.used_bytes}, budget={self.budget_bytes})"
        )


class BudgetedTier(Tier):
    """A :class:`Tier` that accounts its entries itself: the byte bookkeeping the built-in tiers share.

    Contract (subclasses supply the medium: reads, writes, deleting a victim's data):

    - ``__init__(budget_bytes, policy)`` refuses a negative budget (``ValueError``) and sets up an empty
      index, ``stats`` and ``_lock``; a subclass validates its own arguments first, then calls it.
    - The index: ``_sizes`` maps every key the tier holds to the bytes accounted to it, ``_used`` is their
      sum, and ``_policy`` orders exactly those keys for eviction. Only the ``_*_locked`` methods below change
      them, always with ``_lock`` held (the subclass may guard its own state with the same lock).
    - ``used_bytes``/``budget_bytes`` report ``_used``/``_budget`` (a subclass may lower ``_budget`` in its
      ``__init__``, e.g. to an arena's capacity). ``contains``/``contains_many``/``keys`` answer from the index;
      a tier whose medium other clients write (Redis) overrides them to ask the medium.
    - :meth:`_account_locked` (re)places one key and evicts by policy until it fits; the victims it returns are
      already gone from the index, and the subclass removes their data. Keeping ``used_bytes <= budget_bytes``
      is therefore the subclass's only duty: account every stored entry through it.
    - :meth:`_over_budget` is the one test for "larger than the whole budget": such a chunk is never stored
      and counts as one eviction.
    """

    _budget: int
    _used: int
    _sizes: dict[ChunkKey, int]
    _policy: EvictionPolicy
    _lock: threading.Lock

    def __init__(self, budget_bytes: int, policy: str | EvictionPolicy = "lru") -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self._budget = int(budget_bytes)
        self._policy = make_policy(policy) if isinstance(policy, str) else policy
        self._sizes = {}
        self._used = 0
        self._lock = threading.Lock()
        self.stats = TierStats()

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def budget_bytes(self) -> int:
        return self._budget

    def contains(self, key: ChunkKey) -> bool:
        with self._lock:
            return key in self._sizes

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            return [k in self._sizes for k in keys]

    def keys(self) -> list[ChunkKey]:
        with self._lock:
            return list(self._sizes)

    def _over_budget(self, nbytes: int) -> bool:
        """Whether an entry of ``nbytes`` can never fit (then it is counted as evicted and must not be stored)."""
        if nbytes <= self._budget:
            return False
        self.stats.add(evictions=1)
        return True

    def _unaccount_locked(self, key: ChunkKey) -> int | None:
        """Drop ``key`` from the index; its accounted size, ``None`` if it was not there."""
        size = self._sizes.pop(key, None)
        if size is not None:
            self._used -= size
        self._policy.remove(key)  # always: a key the policy names but the index lacks must not be named again
        return size

    def _evict_locked(self, room: int = 0) -> list[ChunkKey]:
        """Drop keys by policy until ``room`` more bytes fit within the budget (or none is left); returns them."""
        victims: list[ChunkKey] = []
        while self._used + room > self._budget and (victim := self._policy.victim()) is not None:
            self._unaccount_locked(victim)
            victims.append(victim)
        return victims

    def _account_locked(self, key: ChunkKey, size: int, *, evict: bool = True) -> list[ChunkKey]:
        """Account ``size`` bytes to ``key`` (replacing its previous entry), first evicting what must go to make
        room (unless ``evict`` is false: the caller already made room); returns the victims."""
        self._unaccount_locked(key)
        victims = self._evict_locked(size) if evict else []
        self._sizes[key] = size
        self._used += size
        self._policy.insert(key, size)
        return victims

    def _clear_locked(self) -> None:
        """Forget every entry."""
        self._sizes.clear()
        self._used = 0
        for k in list(self._policy):
            self._policy.remove(k)


def first_items(items: Sequence[tuple[ChunkKey, KVChunk]]) -> dict[ChunkKey, int]:
    """The index of each key's first item in ``items`` (the one a put-if-absent of them may store)."""
    first: dict[ChunkKey, int] = {}
    for j, (key, _) in enumerate(items):
        first.setdefault(key, j)
    return first


class Timer:
    """``with Timer() as t: ...; t.seconds``: wall time of a block."""

    seconds: float = 0.0

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start
