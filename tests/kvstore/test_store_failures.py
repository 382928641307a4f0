from __future__ import annotations

import errno
import os
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from kvstore import KVChunk, MemoryTier, RedisTier, SSDTier, TieredStore
from kvstore.keys import ChunkKey
from kvstore.redis_local import LocalRedis
from tests.kvstore.conftest import assert_same, key, make_chunk

ONE = make_chunk(16).nbytes


def _wait_until(cond, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_redis_killed_and_restarted(tmp_path: Path, redis_server: LocalRedis, redis_url: str) -> None:
    cpu = MemoryTier(2 * ONE + 10)
    ssd = SSDTier(tmp_path, 1 << 30)
    rds = RedisTier(redis_url, 1 << 30, connect_timeout_s=0.2, timeout_s=1.0, stripe_bytes=4096)
    with TieredStore([cpu, ssd, rds], retry_backoff_s=0.1, max_backoff_s=0.2) as store:
        for i in range(4):
            store.put(key(i), make_chunk(16, seed=i))
        assert rds.contains_many([key(i) for i in range(4)]) == [True] * 4

        redis_server.kill()
        start = time.monotonic()
        got = store.get_many([key(i) for i in range(5)])
        for i in range(4):
            assert_same(got[i], make_chunk(16, seed=i))  # served by cpu and ssd
        assert got[4] is None  # the miss reached redis, which failed: still just a miss
        store.put(key(10), make_chunk(16, seed=10))
        assert_same(store.get(key(10)), make_chunk(16, seed=10))
        for _ in range(20):  # while backing off, redis is skipped without waiting on it
            store.get(key(99))
        assert time.monotonic() - start < 3.0
        report = store.stats().tier("redis")
        assert not report.available and report.stats.errors >= 1 and report.skipped >= 1
        assert "redis" in report.last_error.lower() or "connection" in report.last_error.lower()

        redis_server.restart()

        def rejoined() -> bool:
            store.put(key(20), make_chunk(16, seed=20))
            return store.stats().tier("redis").available and rds.contains(key(20))

        assert _wait_until(rejoined)
        ssd.delete(key(20))
        cpu.delete(key(20))
        assert_same(store.get(key(20)), make_chunk(16, seed=20))  # served by redis again


def test_disk_full_keeps_store_serving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with TieredStore([MemoryTier(1 << 20), SSDTier(tmp_path, 1 << 30)]) as store:
        store.put(key(1), make_chunk(16))

        def full(fd: int, buffers: object) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "writev", full)
        store.put(key(2), make_chunk(16, seed=2))  # does not raise
        monkeypatch.undo()
        assert_same(store.get(key(2)), make_chunk(16, seed=2))  # from cpu
        report = store.stats().tier("ssd")
        assert report.stats.errors == 1 and report.available  # a failed write does not take the tier out
        assert "ENOSPC" in report.last_error
        store.put(key(3), make_chunk(16, seed=3))
        assert store.tiers[1].contains(key(3))


def test_corrupt_lower_tier_is_a_counted_miss(tmp_path: Path) -> None:
    ssd = SSDTier(tmp_path, 1 << 30)
    with TieredStore([MemoryTier(1 << 20), ssd]) as store:
        store.put(key(1), make_chunk(16))
        store.tiers[0].delete(key(1))
        path = Path(ssd.path_of(key(1)))
        path.write_bytes(path.read_bytes()[:-1] + b"\x00")
        assert store.get(key(1)) is None
        assert store.stats().as_dict()["totals"]["corrupt"] == 1


class _BrokenTier(MemoryTier):
    """A tier with a bug: every read raises something unexpected."""

    def get_many(self, keys: Sequence[ChunkKey]) -> list[KVChunk | None]:
        raise RuntimeError("boom")


def test_unexpected_exception_isolated(tmp_path: Path) -> None:
    broken = _BrokenTier(1 << 20, name="broken")
    with TieredStore([broken, SSDTier(tmp_path, 1 << 30)], retry_backoff_s=0.05) as store:
        store.put(key(1), make_chunk(16))
        assert_same(store.get(key(1)), make_chunk(16))
        report = store.stats().tier("broken")
        assert report.stats.errors == 1 and not report.available
        assert "RuntimeError" in report.last_error


def test_redis_down_at_start(tmp_path: Path) -> None:
    server = LocalRedis()
    server.port = 1  # nothing listens there (privileged port on loopback)
    rds = RedisTier(server.url, 1 << 30, connect_timeout_s=0.1, timeout_s=0.2)
    with TieredStore([MemoryTier(1 << 20), rds], retry_backoff_s=10) as store:
        start = time.monotonic()
        store.put(key(1), make_chunk(16))
        assert store.get(key(1)) is not None and store.get(key(2)) is None
        assert time.monotonic() - start < 2.0
        assert not store.stats().tier("redis").available


class _WriteBrokenTier(MemoryTier):
    def put_many(self, items, *, owned=False):  # type: ignore[no-untyped-def]
        raise RuntimeError("cannot write")


def test_top_tier_write_failure_falls_back_to_write_back_tier(tmp_path: Path) -> None:
    top = _WriteBrokenTier(1 << 20, name="top")
    ssd = SSDTier(tmp_path, 1 << 30)
    with TieredStore([top, ssd], write_modes=["write-through", "write-back"]) as store:
        store.put(key(1), make_chunk(16))
        assert ssd.contains(key(1))
        assert_same(store.get(key(1)), make_chunk(16))
