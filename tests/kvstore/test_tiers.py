"""The Tier contract, checked against every implementation."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from kvstore import MemoryTier, RedisTier, SSDTier, Tier
from tests.kvstore.conftest import assert_same, key, make_chunk

TierFactory = Callable[..., Tier]
CHUNK_BYTES = make_chunk(16).nbytes


@pytest.fixture(params=["cpu", "ssd", "redis", "redis-striped"])
def make_tier(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TierFactory]:
    made: list[Tier] = []

    def factory(budget: int = 1 << 30, policy: str = "lru") -> Tier:
        kind = request.param
        tier: Tier
        if kind == "cpu":
            tier = MemoryTier(budget, policy=policy)
        elif kind == "ssd":
            tier = SSDTier(tmp_path / f"ssd{len(made)}", budget, policy=policy)
        else:
            url = request.getfixturevalue("redis_url")
            stripe = 4096 if kind == "redis-striped" else 1 << 20
            tier = RedisTier(url, budget, policy=policy, stripe_bytes=stripe, namespace=f"t{len(made)}")
        made.append(tier)
        return tier

    yield factory
    for tier in made:
        tier.close()


def test_round_trip_each_dtype(make_tier: TierFactory, dtype: torch.dtype) -> None:
    tier = make_tier()
    chunks = {key(i): make_chunk(40 + i, dtype, seed=i, start=7 * i) for i in range(3)}
    for k, c in chunks.items():
        assert tier.put(k, c) == []
    for k, c in chunks.items():
        assert_same(tier.get(k), c)
    assert tier.get(key(99)) is None
    stats = tier.stats.snapshot()
    assert (stats.hits, stats.misses, stats.puts) == (3, 1, 3)
    assert stats.bytes_read > 0 and stats.bytes_written > 0


def test_get_many_is_independent_per_key(make_tier: TierFactory) -> None:
    tier = make_tier()
    for i in (1, 3):
        tier.put(key(i), make_chunk(8, seed=i))
    got = tier.get_many([key(0), key(1), key(2), key(3), key(1)])
    assert [g is not None for g in got] == [False, True, False, True, True]
    assert tier.contains_many([key(0), key(1), key(3)]) == [False, True, True]
    assert tier.get_many([]) == []


def test_delete_contains_keys(make_tier: TierFactory) -> None:
    tier = make_tier()
    tier.put(key(1), make_chunk(8))
    tier.put(key(2), make_chunk(8))
    assert set(tier.keys()) == {key(1), key(2)}
    assert tier.delete(key(1)) is True
    assert tier.delete(key(1)) is False
    assert not tier.contains(key(1)) and tier.contains(key(2))
    assert tier.get(key(1)) is None


def test_replace_keeps_accounting(make_tier: TierFactory) -> None:
    tier = make_tier()
    tier.put(key(1), make_chunk(8, seed=1))
    used = tier.used_bytes
    newer = make_chunk(8, seed=2, start=100)
    tier.put(key(1), newer)
    assert tier.used_bytes == used
    assert_same(tier.get(key(1)), newer)


def test_budget_and_lru_order(make_tier: TierFactory) -> None:
    probe = make_tier(1 << 30)
    probe.put(key(0), make_chunk(16))
    one = probe.used_bytes  # tier-specific size of one chunk (blob size on SSD / Redis)
    tier = make_tier(3 * one + one // 2)
    for i in range(3):
        tier.put(key(i), make_chunk(16, seed=i))
    assert tier.get(key(0)) is not None  # key 0 is now most recently used
    evicted = tier.put(key(3), make_chunk(16, seed=3))
    assert tier.used_bytes <= tier.budget_bytes
    assert not tier.contains(key(1))
    assert all(tier.contains(key(i)) for i in (0, 2, 3))
    assert tier.stats.snapshot().evictions == 1
    assert evicted == []  # evicted chunks are handed back only to a store that demotes them (collect_evicted)


def test_lfu_policy(make_tier: TierFactory) -> None:
    probe = make_tier(1 << 30)
    probe.put(key(0), make_chunk(16))
    one = probe.used_bytes
    tier = make_tier(3 * one + one // 2, policy="lfu")
    for i in range(3):
        tier.put(key(i), make_chunk(16, seed=i))
    for _ in range(3):
        tier.get(key(0))
        tier.get(key(2))
    tier.put(key(3), make_chunk(16, seed=3))
    assert not tier.contains(key(1)) and tier.contains(key(0)) and tier.contains(key(2))


def test_oversized_chunk_comes_back_evicted(make_tier: TierFactory) -> None:
    tier = make_tier(100)
    big = make_chunk(16)
    evicted = tier.put(key(1), big)
    assert [k for k, _ in evicted] == [key(1)] and evicted[0][1] is big
    assert tier.used_bytes == 0 and not tier.contains(key(1))


def test_collect_evicted(make_tier: TierFactory) -> None:
    probe = make_tier(1 << 30)
    probe.put(key(0), make_chunk(16))
    tier = make_tier(probe.used_bytes + 10)
    tier.collect_evicted = True
    first = make_chunk(16, seed=1)
    tier.put(key(1), first)
    evicted = tier.put(key(2), make_chunk(16, seed=2))
    assert [k for k, _ in evicted] == [key(1)]
    assert_same(evicted[0][1], first)


def test_get_blob(make_tier: TierFactory) -> None:
    from kvstore import decode

    tier = make_tier()
    chunk = make_chunk(12, torch.bfloat16)
    tier.put(key(1), chunk)
    blob = tier.get_blob(key(1))
    assert blob is not None
    assert_same(decode(blob), chunk)
    assert tier.get_blob(key(2)) is None


def test_memory_tier_copies_on_put_and_not_on_get() -> None:
    tier = MemoryTier(1 << 20)
    chunk = make_chunk(8)
    tier.put(key(1), chunk)
    chunk.kv.add_(1)  # caller keeps using its tensor: the cache is unaffected
    stored = tier.get(key(1))
    assert stored is not None and not torch.equal(stored.kv, chunk.kv)
    again = tier.get(key(1))
    assert again is not None and again.kv.data_ptr() == stored.kv.data_ptr()  # zero-copy get
    owned = make_chunk(8, seed=5)
    tier.put(key(2), owned, owned=True)
    got = tier.get(key(2))  # host chunks always live in the tier's arena (one copy), owned or not
    assert got is not None and tier.arena is not None and tier.arena.owns(got.kv) and tier.arena.owns(got.positions)
    assert_same(got, owned)
    assert tier.name == "cpu" and "MemoryTier" in repr(tier)


def test_empty_and_noncontiguous_chunks(make_tier: TierFactory) -> None:
    from kvstore import KVChunk

    tier = make_tier()
    empty = KVChunk(torch.zeros(1, 2, 1, 0, 4, dtype=torch.bfloat16), torch.zeros(0, dtype=torch.int64), "fp")
    strided = KVChunk(torch.randn(2, 2, 2, 8, 6)[..., :4], torch.arange(8), "fp")
    for i, chunk in enumerate((empty, strided)):
        tier.put(key(i), chunk)
        assert_same(tier.get(key(i)), chunk)
