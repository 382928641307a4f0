"""The bookkeeping contract of :class:`BudgetedTier`, on a minimal tier that keeps chunks in a dict."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kvstore import ChunkKey, KVChunk, MemoryTier, SSDTier
from kvstore.tiers.base import BudgetedTier, Evicted, first_items
from tests.kvstore.conftest import key, make_chunk


class DictTier(BudgetedTier):
    """Only what differs: where the data lives and what a victim's removal means."""

    def __init__(self, budget_bytes: int, policy: str = "lru") -> None:
        super().__init__(budget_bytes, policy)
        self.data: dict[ChunkKey, KVChunk] = {}

    def get(self, key: ChunkKey) -> KVChunk | None:
        with self._lock:
            if key in self._sizes:
                self._policy.touch(key)
            return self.data.get(key)

    def put(self, key: ChunkKey, chunk: KVChunk, *, owned: bool = False) -> list[Evicted]:
        if self._over_budget(chunk.nbytes):
            return [(key, chunk)]
        with self._lock:
            victims = self._account_locked(key, chunk.nbytes)
            self.data[key] = chunk
            return [(v, self.data.pop(v)) for v in victims]

    def delete(self, key: ChunkKey) -> bool:
        with self._lock:
            self.data.pop(key, None)
            return self._unaccount_locked(key) is not None


def _invariants(tier: BudgetedTier) -> None:
    assert tier.used_bytes == sum(tier._sizes.values()) <= tier.budget_bytes
    assert set(tier._policy) == set(tier._sizes) == set(tier.keys())


def test_negative_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="budget_bytes"):
        DictTier(-1)


def test_accounting_evicts_by_policy_and_replaces() -> None:
    one = make_chunk(8).nbytes
    tier = DictTier(3 * one)
    for i in range(3):
        assert tier.put(key(i), make_chunk(8, seed=i)) == []
    assert tier.get(key(0)) is not None  # now key(1) is the least recently used
    evicted = tier.put(key(3), make_chunk(8, seed=3))
    assert [k for k, _ in evicted] == [key(1)]
    assert tier.put(key(0), make_chunk(8, seed=9)) == []  # a replacement frees its own bytes first
    assert tier.used_bytes == 3 * one and tier.contains_many([key(0), key(1), key(2)]) == [True, False, True]
    _invariants(tier)
    assert tier.delete(key(2)) and not tier.delete(key(2)) and not tier.contains(key(2))
    assert tier.used_bytes == 2 * one
    _invariants(tier)


def test_over_budget_is_refused_and_counted() -> None:
    chunk = make_chunk(8)
    tier = DictTier(chunk.nbytes - 1)
    assert tier.put(key(0), chunk) == [(key(0), chunk)]
    assert tier.stats.snapshot().evictions == 1 and tier.used_bytes == 0 and tier.keys() == []


def test_account_without_eviction_then_evict_down() -> None:
    tier = DictTier(10)
    with tier._lock:
        for i in range(4):
            assert tier._account_locked(key(i), 4, evict=False) == []
        assert tier.used_bytes == 16
        assert tier._evict_locked() == [key(0), key(1)]  # oldest first, until within budget
    assert tier.used_bytes == 8
    _invariants(tier)
    with tier._lock:
        tier._clear_locked()
    assert tier.used_bytes == 0 and len(tier._policy) == 0 and tier.keys() == []


def test_random_operations_keep_the_invariants() -> None:
    rng = random.Random(5)
    chunks = [make_chunk(rng.randrange(1, 20), seed=i) for i in range(6)]
    tier = DictTier(3 * make_chunk(10).nbytes, policy="lfu")
    for _ in range(300):
        i = rng.randrange(len(chunks))
        op = rng.random()
        if op < 0.6:
            tier.put(key(i), chunks[i])
        elif op < 0.8:
            tier.get(key(i))
        else:
            tier.delete(key(i))
        _invariants(tier)


def test_first_items() -> None:
    c = make_chunk(4)
    assert first_items([(key(1), c), (key(2), c), (key(1), c), (key(3), c)]) == {key(1): 0, key(2): 1, key(3): 3}


def test_builtin_tiers_share_the_bookkeeping(tmp_path: Path) -> None:
    for tier in (MemoryTier(1 << 20), SSDTier(tmp_path, 1 << 20)):
        with tier:
            assert isinstance(tier, BudgetedTier)
            for i in range(3):
                tier.put(key(i), make_chunk(8, seed=i))
            tier.delete(key(1))
            _invariants(tier)
            assert tier.contains_many([key(0), key(1)]) == [True, False]
