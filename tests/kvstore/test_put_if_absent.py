"""Atomic put-if-absent in every tier and in TieredStore (issue #11, item 4).

Anchor bases are published first-writer-wins: exactly one of several concurrent writers (threads of one
store, or two stores over the same Redis / the same SSD directory) stores its chunk, every other one is told
it lost, and every reader then reads the winner's bytes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import torch

from kvstore import ChunkKey, KVChunk, MemoryTier, RedisTier, SSDTier, Tier, TieredStore
from kvstore.redis_local import free_port
from tests.kvstore.conftest import assert_same, key, make_chunk

THREADS = 8


def _chunk(seed: int, tokens: int = 64) -> KVChunk:
    return make_chunk(tokens, torch.float32, seed=seed)


def _race(n: int, put: Callable[[int], bool]) -> list[int]:
    """Run ``put(i)`` for i in 0..n-1 on n threads started together; the indices that returned True."""
    barrier = threading.Barrier(n)
    won: list[int] = []
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            if put(i):
                won.append(i)
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[0]
    return won


def _tier_put(tier: Tier, k: ChunkKey, chunk: KVChunk) -> bool:
    stored, _ = tier.put_if_absent(k, chunk)
    return stored


# -- tiers -------------------------------------------------------------------------------------------------
def test_memory_tier_one_winner() -> None:
    tier = MemoryTier(1 << 30)
    won = _race(THREADS, lambda i: _tier_put(tier, key(1), _chunk(i)))
    assert len(won) == 1
    assert_same(tier.get(key(1)), _chunk(won[0]))
    assert tier.used_bytes == _chunk(0).nbytes
    assert tier.put_if_absent(key(1), _chunk(99)) == (False, [])


def test_ssd_tier_one_winner_across_instances(tmp_path: Path) -> None:
    a, b = SSDTier(tmp_path, 1 << 30, fsync="never"), SSDTier(tmp_path, 1 << 30, fsync="never")
    tiers = [a, b]
    won = _race(THREADS, lambda i: _tier_put(tiers[i % 2], key(1), _chunk(i)))
    assert len(won) == 1
    for tier in tiers:  # the loser's instance adopted the winner's file: it reads the winner's bytes
        assert tier.contains(key(1))
        assert_same(tier.get(key(1)), _chunk(won[0]))
    leftovers = [n for _, _, files in os.walk(tmp_path) for n in files if not n.endswith(".kvf")]
    assert leftovers == []  # losers removed their temp files
    a.close()
    b.close()


@pytest.mark.parametrize("stripe", [1 << 20, 4096], ids=["whole", "striped"])
def test_redis_tier_one_winner_across_instances(redis_url: str, stripe: int) -> None:
    tiers = [RedisTier(redis_url, 1 << 30, stripe_bytes=stripe) for _ in range(2)]
    won = _race(THREADS, lambda i: _tier_put(tiers[i % 2], key(1), _chunk(i)))
    assert len(won) == 1
    for tier in tiers:
        assert_same(tier.get(key(1)), _chunk(won[0]))
    # the losers cleaned up their payload parts: only the winner's manifest and parts remain
    names = redis.Redis.from_url(redis_url).keys("*")
    expected = 1 if stripe > _chunk(0).nbytes else 1 + 4
    assert len(names) == expected
    for tier in tiers:
        tier.close()


def test_redis_loser_leaves_the_winner_alone(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    a, b = RedisTier(redis_url, 1 << 30, stripe_bytes=4096), RedisTier(redis_url, 1 << 30, stripe_bytes=4096)
    assert a.put_if_absent(key(1), _chunk(1)) == (True, [])
    before = sorted(r.keys("*"))
    for chunk in (_chunk(2), _chunk(1)):  # other content, and the same content (same payload checksum)
        assert b.put_if_absent(key(1), chunk) == (False, [])
        assert sorted(r.keys("*")) == before
        assert_same(b.get(key(1)), _chunk(1))
    assert b.used_bytes == 0  # not accounted to the loser
    a.close()
    b.close()


def test_many_if_absent_in_one_call(tmp_path: Path, redis_url: str) -> None:
    for tier in (MemoryTier(1 << 30), SSDTier(tmp_path, 1 << 30, fsync="never"), RedisTier(redis_url, 1 << 30)):
        tier.put(key(2), _chunk(2))
        stored, _ = tier.put_many_if_absent([(key(1), _chunk(1)), (key(2), _chunk(9)), (key(1), _chunk(8))])
        assert stored == [True, False, False]  # a key repeated in one call: its first item wins
        assert_same(tier.get(key(1)), _chunk(1))
        assert_same(tier.get(key(2)), _chunk(2))
        tier.close()


# -- TieredStore -------------------------------------------------------------------------------------------
def _store_race(stores: list[TieredStore]) -> int:
    won = _race(THREADS, lambda i: stores[i % len(stores)].put_if_absent(key(1), _chunk(i)))
    assert len(won) == 1
    for store in stores:
        for _ in range(2):  # the second read comes from the promoted copy
            assert_same(store.get(key(1)), _chunk(won[0]))
    return won[0]


def test_store_threads_memory_only() -> None:
    with TieredStore([MemoryTier(1 << 30)]) as store:
        _store_race([store])
        assert store.stats().puts == 1


def test_store_two_instances_over_one_redis(redis_url: str) -> None:
    stores = [TieredStore([MemoryTier(1 << 30), RedisTier(redis_url, 1 << 30, stripe_bytes=4096)]) for _ in range(2)]
    winner = _store_race(stores)
    for store in stores:
        assert store.put_if_absent(key(1), _chunk(99)) is False
        assert_same(store.get(key(1)), _chunk(winner))
        store.close()


def test_store_two_instances_over_one_ssd_dir(tmp_path: Path) -> None:
    stores = [TieredStore([MemoryTier(1 << 30), SSDTier(tmp_path, 1 << 30, fsync="never")]) for _ in range(2)]
    _store_race(stores)
    for store in stores:
        store.close()


def test_store_present_in_any_tier_writes_nothing(tmp_path: Path, redis_url: str) -> None:
    cpu, ssd, rds = MemoryTier(1 << 30), SSDTier(tmp_path, 1 << 30, fsync="never"), RedisTier(redis_url, 1 << 30)
    with TieredStore([cpu, ssd, rds]) as store:
        cpu.put(key(1), _chunk(1))  # only the top tier holds it
        ssd.put(key(2), _chunk(2))  # only the middle tier holds it
        assert store.put_many_if_absent([(key(1), _chunk(7)), (key(2), _chunk(8)), (key(3), _chunk(3))]) == [
            False,
            False,
            True,
        ]
        assert not ssd.contains(key(1)) and not rds.contains(key(1)) and not rds.contains(key(2))
        assert_same(store.get(key(1)), _chunk(1))
        assert_same(store.get(key(2)), _chunk(2))
        for tier in (cpu, ssd, rds):  # the winner went to every write-through tier
            assert_same(tier.get(key(3)), _chunk(3))


def test_store_arbiter_unreachable_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    dead = RedisTier(f"redis://127.0.0.1:{free_port()}/0", 1 << 30, connect_timeout_s=0.2, timeout_s=0.5)
    with TieredStore([MemoryTier(1 << 30), dead]) as store:
        assert store.put_if_absent(key(1), _chunk(1)) is True  # the memory tier decides, with a logged reason
        assert store.put_if_absent(key(1), _chunk(2)) is False
        assert_same(store.get(key(1)), _chunk(1))
    assert any("put_if_absent" in r.getMessage() for r in caplog.records)
