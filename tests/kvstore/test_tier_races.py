"""Review of the BudgetedTier refactor (53ce7d4, e0735d7): accounting against the real medium, under threads,
at start-up and around Redis's index.

The tests under a ``# FIXED`` comment reproduced defects (failing before their fix; "pre-existing" ones
failed the same way on 53ce7d4^); the others pin down behaviour the refactor had to preserve.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from pathlib import Path

import pytest
import redis

from kvstore import ChunkKey, MemoryTier, RedisTier, SSDTier
from kvstore.codec import encode
from kvstore.tiers.base import BudgetedTier
from kvstore.tiers.eviction import LRUPolicy
from tests.kvstore.conftest import assert_same, key, make_chunk


def _blob_files(root: Path) -> dict[str, int]:
    """key hex -> size of every published blob file (temp/aside files excluded)."""
    return {p.name[: -len(".kvf")]: p.stat().st_size for p in root.rglob("*.kvf") if not p.name.startswith(".")}


def _index_consistent(tier: BudgetedTier) -> None:
    with tier._lock:
        assert tier._used == sum(tier._sizes.values()) <= tier._budget
        assert set(tier._policy) == set(tier._sizes)


def _hammer(tier: BudgetedTier, chunks: list, *, threads: int = 4, ops: int = 150, seed: int = 0) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        rng = random.Random(seed * 100 + n)
        try:
            for _ in range(ops):
                i = rng.randrange(len(chunks))
                op = rng.random()
                if op < 0.35:
                    tier.put(key(i), chunks[i])
                elif op < 0.55:
                    tier.put_if_absent(key(i), chunks[i])
                elif op < 0.65:
                    js = [rng.randrange(len(chunks)) for _ in range(3)]
                    tier.put_many_if_absent([(key(j), chunks[j]) for j in js])
                elif op < 0.75:
                    tier.delete(key(i))
                else:
                    got = tier.get(key(i))
                    if got is not None:
                        assert_same(got, chunks[i])
        except BaseException as exc:  # reported below
            errors.append(exc)

    ts = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors[0]


# -- SSD ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_ssd_threads_on_the_same_keys_index_matches_disk(tmp_path: Path, policy: str) -> None:
    """Puts, put-if-absent (link), deletes, reads and evictions of a few keys from several threads: afterwards
    the index is exactly the files on disk and ``used_bytes`` their total size, within budget."""
    chunks = [make_chunk(4 + 6 * i, seed=i) for i in range(8)]
    budget = 3 * len(encode(chunks[-1]))
    tier = SSDTier(tmp_path, budget, fsync="never", policy=policy, io_threads=3)
    tier.collect_evicted = True
    try:
        _hammer(tier, chunks)
        _index_consistent(tier)
        files = _blob_files(tmp_path)
        held = tier.keys()
        assert {k.hex for k in held} == set(files)
        assert tier.used_bytes == sum(files.values()) <= budget
        assert not [p for p in tmp_path.rglob("*.tmp")]  # every victim moved aside was drained
    finally:
        tier.close()
    again = SSDTier(tmp_path, budget)  # the start-up scan agrees with what the last instance believed
    try:
        held = again.keys()
        assert again.used_bytes == sum(files.values()) and {k.hex for k in held} == set(files)
    finally:
        again.close()


def test_ssd_start_scan_evicts_by_age_and_counts(tmp_path: Path) -> None:
    """Restart with a smaller budget: oldest files go first (their files removed), the count is in stats, and a
    later put evicts by the same order (the scan's insert order is the policy order)."""
    chunks = [make_chunk(8, seed=i) for i in range(5)]
    one = len(encode(chunks[0]))
    tier = SSDTier(tmp_path, 1 << 20)
    for i, c in enumerate(chunks):
        tier.put(key(i), c)
        os.utime(tier.path_of(key(i)), ns=(time.time_ns(), 1_000_000_000 * (2000 - i)))  # key(4) oldest
    tier.close()

    small = SSDTier(tmp_path, 3 * one)
    try:
        assert set(small.keys()) == {key(0), key(1), key(2)}
        assert small.stats.snapshot().evictions == 2 and small.used_bytes == 3 * one
        assert set(_blob_files(tmp_path)) == {key(i).hex for i in range(3)}
        small.collect_evicted = True
        evicted = small.put(key(9), make_chunk(8, seed=9))
        assert [k for k, _ in evicted] == [key(2)]  # the oldest remaining file
        assert not Path(small.path_of(key(2))).exists()
        _index_consistent(small)
    finally:
        small.close()


def test_ssd_over_budget_put_if_absent_of_a_present_key_counts_nothing(tmp_path: Path) -> None:
    """SSD checks presence before size (as before the refactor): an over-budget chunk for a key it holds is
    simply not stored, no eviction is counted, and nothing comes back."""
    small = make_chunk(4)
    tier = SSDTier(tmp_path, len(encode(small)))
    try:
        assert tier.put_if_absent(key(1), small) == (True, [])
        big = make_chunk(64)
        assert tier.put_if_absent(key(1), big) == (False, [])
        assert tier.stats.snapshot().evictions == 0
        stored, evicted = tier.put_if_absent(key(2), big)
        assert not stored and [k for k, _ in evicted] == [key(2)] and tier.stats.snapshot().evictions == 1
    finally:
        tier.close()


# -- memory ------------------------------------------------------------------------------------------------
def test_memory_threads_on_the_same_keys_keep_the_index(tmp_path: Path) -> None:
    chunks = [make_chunk(4 + 6 * i, seed=i) for i in range(8)]
    tier = MemoryTier(4 * chunks[-1].nbytes)
    tier.collect_evicted = True
    try:
        _hammer(tier, chunks, seed=1)
        _index_consistent(tier)
        with tier._lock:
            assert set(tier._entries) == set(tier._sizes)
            assert all(tier._sizes[k] == tier._size_of(c) for k, c in tier._entries.items())
        assert tier.used_bytes <= tier.arena.allocated_bytes <= tier.budget_bytes
    finally:
        tier.close()


# -- Redis -------------------------------------------------------------------------------------------------
def _server_keys(url: str, tier: RedisTier) -> set[ChunkKey]:
    client = redis.Redis.from_url(url)
    return {k for n in client.scan_iter(match=tier.layout.scan_pattern) if (k := tier.layout.key_of(n)) is not None}


def test_redis_threads_index_is_what_the_server_holds(redis_url: str) -> None:
    chunks = [make_chunk(4 + 6 * i, seed=i) for i in range(8)]
    tier = RedisTier(redis_url, 3 * len(encode(chunks[-1])), stripe_bytes=4096, io_threads=2)
    try:
        _hammer(tier, chunks, threads=3, ops=80, seed=2)
        _index_consistent(tier)
        # contains/keys ask the server, not the index
        assert set(tier.keys()) == _server_keys(redis_url, tier)
    finally:
        tier.close()


def test_redis_contains_asks_the_server(redis_url: str) -> None:
    """Another client's blob is present for contains/contains_many/keys and blocks put-if-absent, though this
    tier never accounted it."""
    a = RedisTier(redis_url, 1 << 20, namespace="shared")
    b = RedisTier(redis_url, 1 << 20, namespace="shared")
    try:
        a.put(key(1), make_chunk(8, seed=1))
        assert b.contains(key(1)) and b.contains_many([key(1), key(2)]) == [True, False] and b.keys() == [key(1)]
        assert b.used_bytes == 0
        assert b.put_if_absent(key(1), make_chunk(8, seed=2)) == (False, [])
        assert b.used_bytes == 0 and b.stats.snapshot().puts == 0
        assert_same(b.get(key(1)), make_chunk(8, seed=1))
    finally:
        a.close()
        b.close()


# FIXED (pre-existing: Redis eviction collection is counted as reads (hits))
def test_redis_collecting_victims_is_not_counted_as_hits(redis_url: str) -> None:
    """The memory and SSD tiers hand victims over without touching hits/misses/bytes_read; the Redis tier reads
    them back with get_many, so every demotion shows up as a cache hit in its stats."""
    chunk = make_chunk(8)
    tier = RedisTier(redis_url, 2 * len(encode(chunk)))
    tier.collect_evicted = True
    try:
        for i in range(5):
            tier.put(key(i), make_chunk(8, seed=i))
        s = tier.stats.snapshot()
        assert s.evictions == 3
        assert (s.hits, s.misses, s.bytes_read) == (0, 0, 0)
    finally:
        tier.close()


# FIXED (pre-existing: a miss's _forget races a concurrent put of the key)
def test_redis_miss_racing_a_put_does_not_unaccount_the_new_blob(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """get_many reads ``None`` for a key, a put of that key (SET, then accounted) lands, and only then does
    the miss call ``_forget``: the fresh blob is dropped from the index though it is on the server. It is then
    never evicted by this tier and ``used_bytes`` under-reports, so the server exceeds the budget for good."""
    chunk = make_chunk(8)
    size = len(encode(chunk))
    tier = RedisTier(redis_url, 2 * size)
    real_mget = tier._mget
    raced = []

    def mget_then_put(names: list[bytes]) -> list[bytes | None]:
        values = real_mget(names)
        if not raced:
            raced.append(True)
            tier.put(key(1), chunk)  # lands between the read and the miss handling
        return values

    monkeypatch.setattr(tier, "_mget", mget_then_put)
    try:
        assert tier.get(key(1)) is None
        assert tier.contains(key(1))  # the server has it
        assert tier.used_bytes == size  # was 0: the index forgot it
    finally:
        tier.close()


# FIXED (pre-existing: eviction's GETDEL races a concurrent rewrite of the victim)
def test_redis_eviction_does_not_delete_a_concurrent_rewrite(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A victim leaves the index under the lock, but its server copy is deleted later with an unconditional
    GETDEL. A put of that key in between (accounted, success returned) is deleted by the eviction: the index
    then holds a key the server does not (used_bytes over-reports) and the put's data is gone."""
    chunk = make_chunk(8)
    size = len(encode(chunk))
    tier = RedisTier(redis_url, 2 * size)
    real_evict = tier._evict
    raced = []

    def rewrite_then_evict(victims: list[ChunkKey]) -> list:
        if victims and not raced:
            raced.append(True)
            t = threading.Thread(target=tier.put, args=(victims[0], make_chunk(8, seed=42)))
            t.start()
            t.join()
        return real_evict(victims)

    monkeypatch.setattr(tier, "_evict", rewrite_then_evict)
    try:
        for i in range(3):
            tier.put(key(i), make_chunk(8, seed=i))
        assert raced
        assert key(0) in tier._sizes  # the rewrite was accounted ...
        assert tier.contains(key(0))  # was gone: the eviction's GETDEL removed it
    finally:
        tier.close()


# -- an index/policy mismatch -------------------------------------------------------------------------------
class _CountingLRU(LRUPolicy):
    """LRU that stops naming victims after ``limit`` calls in a row (so a spinning eviction loop ends)."""

    def __init__(self, limit: int = 1000) -> None:
        super().__init__()
        self.calls = 0
        self.limit = limit
        self.spun = False

    def victim(self) -> ChunkKey | None:
        self.calls += 1
        if self.calls > self.limit:
            self.spun = True
            return None
        return super().victim()


# FIXED (regression of 53ce7d4: the parent raised KeyError at once, the base now spins under the lock)
def test_policy_key_missing_from_the_index_does_not_spin(tmp_path: Path) -> None:
    """``policy=`` accepts an instance; handed to two tiers, one tier's policy names a key the other never
    stored. ``_evict_locked`` drops it with ``_unaccount_locked``, which leaves the policy alone for a key not
    in ``_sizes``: ``victim()`` names the same key forever, an endless loop holding ``_lock`` (the parent
    commit's ``self._index.pop(victim)`` raised KeyError instead). The counting policy ends the loop here."""
    shared = _CountingLRU()
    chunk = make_chunk(8)
    size = len(encode(chunk))
    a = SSDTier(tmp_path / "a", 4 * size, policy=shared, fsync="never")
    b = SSDTier(tmp_path / "b", size, policy=shared, fsync="never")
    try:
        a.put(key(1), chunk)  # now b's policy names key(1), which b does not hold
        b.put(key(2), chunk)
        shared.calls = 0
        with contextlib.suppress(KeyError):
            b.put(key(3), chunk)  # must evict: the first victim is a's key(1)
        assert not shared.spun, f"eviction loop called victim() {shared.calls} times without progress"
    finally:
        a.close()
        b.close()
