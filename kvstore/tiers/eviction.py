"""Eviction policies: which resident key a tier gives up next. Pluggable by name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator

from kvstore.keys import ChunkKey


class EvictionPolicy(ABC):
    """Orders the resident keys of one tier.

    Contract: the tier calls :meth:`insert` when a key becomes resident (again), :meth:`touch` on every hit,
    :meth:`remove` when it leaves for any reason; :meth:`victim` names the next key to evict without removing
    it (``None`` when empty). Policies are not thread-safe: the tier calls them under its lock. Every call is
    O(1) (amortised).
    """

    @abstractmethod
    def insert(self, key: ChunkKey, nbytes: int) -> None: ...

    @abstractmethod
    def touch(self, key: ChunkKey) -> None: ...

    @abstractmethod
    def remove(self, key: ChunkKey) -> None: ...

    @abstractmethod
    def victim(self) -> ChunkKey | None: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __iter__(self) -> Iterator[ChunkKey]:
        """Keys from the next victim to the most protected one."""


class LRUPolicy(EvictionPolicy):
    """Least recently used first."""

    def __init__(self) -> None:
        self._order: OrderedDict[ChunkKey, None] = OrderedDict()

    def insert(self, key: ChunkKey, nbytes: int) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: ChunkKey) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: ChunkKey) -> None:
        self._order.pop(key, None)

    def victim(self) -> ChunkKey | None:
        return next(iter(self._order), None)

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[ChunkKey]:
        return iter(list(self._order))


class FIFOPolicy(LRUPolicy):
    """First inserted first; hits do not protect a key."""

    def touch(self, key: ChunkKey) -> None:
        return None


class LFUPolicy(EvictionPolicy):
    """Least frequently used first, least recently used among equals (O(1) frequency buckets).

    A re-inserted key keeps its count, so popular chunks that are rewritten stay protected.
    """

    def __init__(self) -> None:
        self._freq: dict[ChunkKey, int] = {}
        self._buckets: dict[int, OrderedDict[ChunkKey, None]] = {}
        self._min = 0

    def _bump(self, key: ChunkKey, old: int) -> None:
        bucket = self._buckets[old]
        del bucket[key]
        if not bucket:
            del self._buckets[old]
            if self._min == old:
                self._min = old + 1
        self._freq[key] = old + 1
        self._buckets.setdefault(old + 1, OrderedDict())[key] = None

    def insert(self, key: ChunkKey, nbytes: int) -> None:
        if key in self._freq:
            self._bump(key, self._freq[key])
            return
        self._freq[key] = 1
        self._buckets.setdefault(1, OrderedDict())[key] = None
        self._min = 1

    def touch(self, key: ChunkKey) -> None:
        if key in self._freq:
            self._bump(key, self._freq[key])

    def remove(self, key: ChunkKey) -> None:
        freq = self._freq.pop(key, None)
        if freq is None:
            return
        bucket = self._buckets[freq]
        del bucket[key]
        if not bucket:
            del self._buckets[freq]
            if self._min == freq:
                self._min = min(self._buckets, default=0)

    def victim(self) -> ChunkKey | None:
        if not self._freq:
            return None
        if self._min not in self._buckets:
            self._min = min(self._buckets)
        return next(iter(self._buckets[self._min]))

    def __len__(self) -> int:
        return len(self._freq)

    def __iter__(self) -> Iterator[ChunkKey]:
        return iter([k for f in sorted(self._buckets) for k in self._buckets[f]])


EVICTION_POLICIES: dict[str, type[EvictionPolicy]] = {
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "fifo": FIFOPolicy,
}


def register_policy(name: str) -> Callable[[type[EvictionPolicy]], type[EvictionPolicy]]:
    """Class decorator: make a policy available to :func:`make_policy` under ``name``."""

    def deco(cls: type[EvictionPolicy]) -> type[EvictionPolicy]:
        EVICTION_POLICIES[name] = cls
        return cls

    return deco


def make_policy(name: str) -> EvictionPolicy:
    """A fresh policy instance by registry name (``"lru"``, ``"lfu"``, ``"fifo"``, or registered)."""
    try:
        return EVICTION_POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; known: {sorted(EVICTION_POLICIES)}") from None
