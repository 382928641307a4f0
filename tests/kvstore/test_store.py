from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvstore import (
    ChecksumError,
    FingerprintMismatchError,
    MemoryTier,
    RedisTier,
    SSDTier,
    StoreConfig,
    TieredStore,
    encode,
)
from tests.kvstore.conftest import FP, assert_same, key, make_chunk

ONE = make_chunk(16).nbytes


def _store(tmp_path: Path, cpu_chunks: int = 2, ssd_write: str = "write-through") -> TieredStore:
    cpu = MemoryTier(cpu_chunks * ONE + ONE // 2)
    ssd = SSDTier(tmp_path / "ssd", 1 << 30)
    return TieredStore([cpu, ssd], write_modes=["write-through", ssd_write])  # type: ignore[list-item]


def test_put_get_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    with _store(tmp_path) as store:
        chunk = make_chunk(16, dtype)
        store.put(key(1), chunk)
        assert_same(store.get(key(1)), chunk)
        assert store.get(key(2)) is None
        assert store.contains(key(1)) and not store.contains(key(2))


def test_get_many_never_stops_at_first_miss(tmp_path: Path) -> None:
    with _store(tmp_path, cpu_chunks=10) as store:
        store.put_many([(key(i), make_chunk(16, seed=i)) for i in (1, 3, 4)])
        got = store.get_many([key(0), key(1), key(2), key(3), key(4), key(5)])
        assert [g is not None for g in got] == [False, True, False, True, True, False]
        assert store.contains_many([key(0), key(1), key(5), key(4)]) == [False, True, False, True]


def test_batched_per_tier(tmp_path: Path) -> None:
    with _store(tmp_path, cpu_chunks=2) as store:
        store.put_many([(key(i), make_chunk(16, seed=i)) for i in range(4)])  # cpu keeps 2, 3
        ssd = store.tiers[1]
        before = ssd.stats.snapshot()
        got = store.get_many([key(0), key(3), key(1), key(9)])
        assert [g is not None for g in got] == [True, True, True, False]
        after = ssd.stats.snapshot()
        # the ssd tier was asked only for the cpu misses, in one call
        assert after.get_latency.count - before.get_latency.count == 1
        assert (after.hits - before.hits, after.misses - before.misses) == (2, 1)


def test_promotion_into_top_tier(tmp_path: Path) -> None:
    with _store(tmp_path, cpu_chunks=2) as store:
        cpu, ssd = store.tiers
        for i in range(3):
            store.put(key(i), make_chunk(16, seed=i))
        assert not cpu.contains(key(0)) and ssd.contains(key(0))
        assert_same(store.get(key(0)), make_chunk(16, seed=0))
        assert cpu.contains(key(0)) and not cpu.contains(key(1))  # promoted, LRU made room
        assert cpu.stats.snapshot().hits == 0
        store.get(key(0))
        assert cpu.stats.snapshot().hits == 1


def test_write_back_demotion(tmp_path: Path) -> None:
    with _store(tmp_path, cpu_chunks=2, ssd_write="write-back") as store:
        cpu, ssd = store.tiers
        store.put(key(0), make_chunk(16, seed=0))
        store.put(key(1), make_chunk(16, seed=1))
        assert ssd.keys() == []  # write-back: nothing written below yet
        store.put(key(2), make_chunk(16, seed=2))  # evicts key 0 from cpu -> demoted to ssd
        assert ssd.keys() == [key(0)]
        assert_same(store.get(key(0)), make_chunk(16, seed=0))
        assert cpu.contains(key(0))


def test_demotion_cascades_through_write_back_tiers(tmp_path: Path) -> None:
    top = MemoryTier(ONE + 10)
    mid = MemoryTier(ONE + 10, name="cpu2")
    ssd = SSDTier(tmp_path, 1 << 30)
    with TieredStore([top, mid, ssd], write_modes=["write-through", "write-back", "write-back"]) as store:
        assert mid.collect_evicted and ssd.collect_evicted is False
        for i in range(3):
            store.put(key(i), make_chunk(16, seed=i))
        assert top.keys() == [key(2)] and mid.keys() == [key(1)] and ssd.keys() == [key(0)]
        for i in range(3):
            assert_same(store.get(key(i)), make_chunk(16, seed=i))


def test_oversized_chunk_goes_below(tmp_path: Path) -> None:
    with _store(tmp_path, cpu_chunks=1, ssd_write="write-back") as store:
        big = make_chunk(64)
        store.put(key(1), big)
        assert not store.tiers[0].contains(key(1)) and store.tiers[1].contains(key(1))
        assert_same(store.get(key(1)), big)


def test_delete_everywhere(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        store.put(key(1), make_chunk(16))
        assert store.delete(key(1)) is True
        assert store.delete(key(1)) is False
        assert all(not t.contains(key(1)) for t in store.tiers)


def test_blobs(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        chunk = make_chunk(16, torch.bfloat16)
        stored = store.put_blob(key(1), encode(chunk), expected_fingerprint=FP)
        assert_same(stored, chunk)
        assert_same(store.get(key(1)), chunk)
        blob = store.get_blob(key(1))
        assert blob is not None and blob == encode(chunk)
        assert store.get_blob(key(2)) is None
        bad = bytearray(encode(chunk))
        bad[-1] ^= 1
        with pytest.raises(ChecksumError):
            store.put_blob(key(3), bytes(bad))
        with pytest.raises(FingerprintMismatchError):
            store.put_blob(key(3), encode(chunk), expected_fingerprint="another-model")
        assert not store.contains(key(3))


def test_prefetch(tmp_path: Path) -> None:
    with _store(tmp_path, cpu_chunks=4) as store:
        for i in range(4):
            store.put(key(i), make_chunk(16, seed=i))
        for i in range(4):
            store.tiers[0].delete(key(i))
        fut = store.prefetch([key(0), key(1), key(7)])
        assert fut.result(timeout=10) == 2
        assert store.tiers[0].contains(key(0)) and store.tiers[0].contains(key(1))


def test_stats_as_dict(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        store.put(key(1), make_chunk(16))
        store.get_many([key(1), key(2)])
        stats = store.stats()
        assert (stats.gets, stats.hits, stats.misses, stats.puts) == (2, 1, 1, 1)
        d = stats.as_dict()
        json.dumps(d)
        names = [t["name"] for t in d["tiers"]]
        assert names == ["cpu", "ssd"]
        cpu = d["tiers"][0]
        for field in ("used_bytes", "budget_bytes", "hits", "misses", "evictions", "errors", "corrupt"):
            assert field in cpu
        assert {"p50_ms", "p99_ms"} <= set(cpu["get_latency"])
        assert d["totals"]["hit_rate"] == 0.5
        assert stats.tier("ssd").stats.puts == 1


def test_device_argument_and_cpu_default(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        store.put(key(1), make_chunk(16))
        got = store.get(key(1), device="cpu")
        assert got is not None and got.kv.device.type == "cpu"


def test_from_config(tmp_path: Path, redis_url: str) -> None:
    cfg = StoreConfig(
        cpu_bytes=1 << 20,
        ssd_dir=str(tmp_path / "ssd"),
        ssd_bytes=1 << 22,
        ssd_fsync="never",
        redis_url=redis_url,
        redis_bytes=1 << 22,
        redis_write="write-back",
        eviction="lfu",
    )
    with TieredStore.from_config(cfg) as store:
        assert [t.name for t in store.tiers] == ["cpu", "ssd", "redis"]
        assert isinstance(store.tiers[2], RedisTier)
        assert store.write_modes == ["write-through", "write-through", "write-back"]
        store.put(key(1), make_chunk(16))
        assert store.get(key(1)) is not None
    with pytest.raises(ValueError):
        StoreConfig(cpu_write="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        StoreConfig(eviction="random")
    with pytest.raises(ValueError):
        TieredStore.from_config(StoreConfig(cpu_bytes=0))
    if not torch.cuda.is_available():
        assert StoreConfig().device is None
        with pytest.raises(ValueError):
            StoreConfig(device_bytes=1, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_tier_on_cuda(tmp_path: Path) -> None:  # pragma: no cover - GPU machines only
    cfg = StoreConfig(device_bytes=4 * ONE, cpu_bytes=1 << 20, ssd_dir=str(tmp_path))
    with TieredStore.from_config(cfg) as store:
        assert [t.name for t in store.tiers] == ["device", "cpu", "ssd"]
        chunk = make_chunk(16)
        store.put(key(1), chunk)
        assert store.tiers[0].get(key(1)).kv.is_cuda  # type: ignore[union-attr]
        assert_same(store.get(key(1)), chunk)
        assert store.get(key(1), device="cuda").kv.is_cuda  # type: ignore[union-attr]
        store.tiers[0].delete(key(1))
        assert store.get(key(1), device="cuda") is not None and store.tiers[0].contains(key(1))
