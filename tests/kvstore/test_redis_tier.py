from __future__ import annotations

import dataclasses
import time

import pytest
import redis
import torch

from kvstore import RedisTier, TierUnavailableError
from kvstore.redis_local import LocalRedis, LocalRedisCluster
from kvstore.tiers.redis_layout import Manifest
from tests.kvstore.conftest import assert_same, key, make_chunk


def _raw(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def test_striped_layout(redis_url: str) -> None:
    tier = RedisTier(redis_url, 1 << 30, stripe_bytes=4096)
    chunk = make_chunk(64, torch.float32)  # 16 KiB payload: 4 parts
    tier.put(key(1), chunk)
    names = sorted(_raw(redis_url).keys("*"))
    assert tier.main_key(key(1)) in names and len(names) == 1 + 4
    assert _raw(redis_url).get(tier.main_key(key(1)))[:4] == b"KVFM"  # type: ignore[index]
    assert_same(tier.get(key(1)), chunk)
    # overwriting with other content replaces the parts (no leak)
    other = make_chunk(64, torch.float32, seed=9)
    tier.put(key(1), other)
    assert len(_raw(redis_url).keys("*")) == 5
    assert_same(tier.get(key(1)), other)
    # overwriting with a small blob removes the parts too
    tier.put(key(1), make_chunk(2))
    assert _raw(redis_url).keys("*") == [tier.main_key(key(1))]
    assert tier.delete(key(1)) and _raw(redis_url).keys("*") == []


def test_corrupt_values_detected(redis_url: str) -> None:
    r = _raw(redis_url)
    tier = RedisTier(redis_url, 1 << 30, stripe_bytes=4096)
    tier.put(key(1), make_chunk(4))  # single blob
    tier.put(key(2), make_chunk(64))  # striped
    tier.put(key(3), make_chunk(64, seed=3))
    blob = bytearray(r.get(tier.main_key(key(1))))  # type: ignore[arg-type]
    blob[-1] ^= 1
    r.set(tier.main_key(key(1)), bytes(blob))
    part = sorted(n for n in r.keys("*") if n.startswith(tier.main_key(key(2)) + b":"))[1]
    r.setrange(part, 10, b"\xff\xfe")
    r.set(tier.main_key(key(4)), b"not a blob at all")
    assert tier.get_many([key(1), key(2), key(3), key(4)])[:2] == [None, None]
    assert tier.get(key(4)) is None
    assert tier.stats.snapshot().corrupt == 3
    assert r.exists(tier.main_key(key(1)), tier.main_key(key(2)), tier.main_key(key(4))) == 0
    assert_same(tier.get(key(3)), make_chunk(64, seed=3))


def test_missing_part_is_clean_miss(redis_url: str) -> None:
    r = _raw(redis_url)
    tier = RedisTier(redis_url, 1 << 30, stripe_bytes=4096)
    tier.put(key(1), make_chunk(64))
    part = next(n for n in r.keys("*") if n != tier.main_key(key(1)))
    r.delete(part)
    assert tier.get(key(1)) is None
    assert tier.stats.snapshot().corrupt == 0 and tier.used_bytes == 0
    assert r.keys("*") == []  # the orphaned manifest and remaining parts are gone


def test_ttl(redis_url: str) -> None:
    tier = RedisTier(redis_url, 1 << 30, ttl_s=0.3, stripe_bytes=4096)
    tier.put(key(1), make_chunk(64))
    assert 0 < _raw(redis_url).pttl(tier.main_key(key(1))) <= 300
    assert tier.get(key(1)) is not None
    time.sleep(0.4)
    assert tier.get(key(1)) is None and tier.used_bytes == 0


def test_namespaces_do_not_collide(redis_url: str) -> None:
    a = RedisTier(redis_url, 1 << 30, namespace="tenant-a")
    b = RedisTier(redis_url, 1 << 30, namespace="tenant-b")
    a.put(key(1), make_chunk(8, seed=1))
    assert b.get(key(1)) is None and not b.contains(key(1))
    b.put(key(1), make_chunk(8, seed=2))
    assert_same(a.get(key(1)), make_chunk(8, seed=1))
    assert_same(b.get(key(1)), make_chunk(8, seed=2))
    assert a.keys() == [key(1)] and b.keys() == [key(1)]
    with pytest.raises(ValueError):
        RedisTier(redis_url, 1, namespace="bad{ns}")


@pytest.mark.parametrize("stripe", [1 << 20, 4096], ids=["whole", "striped"])
def test_server_down_then_back(stripe: int) -> None:
    server = LocalRedis().start()
    try:
        tier = RedisTier(server.url, 1 << 30, connect_timeout_s=0.2, timeout_s=1.0, stripe_bytes=stripe)
        tier.put(key(1), make_chunk(64))
        assert tier.get(key(1)) is not None  # fills the pool with connections that will go stale
        server.kill()
        start = time.monotonic()
        with pytest.raises(TierUnavailableError):
            tier.get(key(1))
        with pytest.raises(TierUnavailableError):
            tier.put(key(2), make_chunk(8))
        assert time.monotonic() - start < 2.0
        server.restart()  # empty again: nothing is persisted
        assert tier.get(key(1)) is None
        tier.put(key(2), make_chunk(64))
        assert_same(tier.get(key(2)), make_chunk(64))
        assert tier.stats.snapshot().errors >= 2
        tier.close()
    finally:
        server.cleanup()


def test_cluster_round_trip(redis_cluster: LocalRedisCluster) -> None:
    tier = RedisTier(redis_cluster.url, 1 << 30, cluster=True, stripe_bytes=4096, namespace="cluster-test")
    chunks = {key(i): make_chunk(16 + 8 * i, torch.bfloat16, seed=i) for i in range(12)}
    for k, c in chunks.items():
        tier.put(k, c)
    got = tier.get_many([*chunks, key(100)])
    for c, g in zip(chunks.values(), got, strict=False):
        assert_same(g, c)
    assert got[-1] is None
    # keys spread over more than one master
    per_node = [redis.Redis(port=p).dbsize() for p in redis_cluster.ports]
    assert sum(1 for n in per_node if n) >= 2
    assert set(tier.keys()) == set(chunks)
    assert tier.delete(key(0)) and tier.get(key(0)) is None
    assert tier.contains_many([key(0), key(1)]) == [False, True]
    for k in chunks:
        tier.delete(k)
    tier.close()


def test_stale_pooled_connections_after_restart() -> None:
    server = LocalRedis().start()
    try:
        tier = RedisTier(server.url, 1 << 30, stripe_bytes=4096, io_threads=4)
        tier.put(key(1), make_chunk(64))
        assert tier.get(key(1)) is not None
        server.restart()  # every pooled connection of `tier` is now dead, and no call noticed yet
        with RedisTier(server.url, 1 << 30, stripe_bytes=4096) as writer:
            writer.put(key(1), make_chunk(64, seed=3))
        assert_same(tier.get(key(1)), make_chunk(64, seed=3))
        assert tier.stats.snapshot().errors == 0
        tier.close()
    finally:
        server.cleanup()


def test_forged_manifest_is_corrupt(redis_url: str) -> None:
    from kvstore.tiers.redis_layout import Manifest

    r = _raw(redis_url)
    tier = RedisTier(redis_url, 1 << 30, stripe_bytes=4096)
    tier.put(key(1), make_chunk(64))
    m = Manifest.parse(r.get(tier.main_key(key(1))))  # type: ignore[arg-type]
    huge = Manifest(m.gen, 1, 1 << 40, 1 << 40, m.head)  # claims a 1 TiB payload
    r.set(tier.main_key(key(1)), huge.to_bytes())
    assert tier.get(key(1)) is None and tier.stats.snapshot().corrupt == 1
    r.set(tier.main_key(key(2)), b"KVFM\xff\xff")
    assert tier.get(key(2)) is None and tier.stats.snapshot().corrupt == 2


def test_part_recreated_by_a_concurrent_rewrite_is_not_corruption(redis_url: str) -> None:
    """A reader can miss a part that a concurrent write is still creating, or that Redis evicted: a miss.
    Only a part present at another size than its slot's is corrupt."""
    from kvstore.tiers.redis_layout import Manifest, StripedRead

    r = _raw(redis_url)
    tier = RedisTier(redis_url, 1 << 30, stripe_bytes=4096)
    tier.put(key(1), make_chunk(64))
    m = Manifest.parse(r.get(tier.main_key(key(1))))
    names = tier.layout.part_names(key(1), m.gen, m.nparts)
    job = StripedRead(0, key(1), names, m.part_size, len(m.head), torch.empty(len(m.head) + m.payload_nbytes,
                                                                          dtype=torch.uint8))
    job.bad_parts.append(1)
    assert not tier._parts_wrong_size(job)  # back at its size: a race, a miss at worst
    r.delete(names[1])
    assert not tier._parts_wrong_size(job)  # absent: evicted
    r.set(names[1], b"x" * 100)
    assert tier._parts_wrong_size(job)  # truncated: corrupt


def test_a_newer_builds_blob_is_left_in_place(redis_url: str) -> None:
    r = _raw(redis_url)
    tier = RedisTier(redis_url, 1 << 30, stripe_bytes=4096)
    tier.put(key(1), make_chunk(4))  # single blob
    tier.put(key(2), make_chunk(64))  # striped: the version is in the manifest's copy of the head
    blob = r.get(tier.main_key(key(1)))
    assert blob is not None
    r.set(tier.main_key(key(1)), blob[:4] + (99).to_bytes(2, "little") + blob[6:])
    manifest = Manifest.parse(r.get(tier.main_key(key(2))))  # type: ignore[arg-type]
    head = manifest.head[:4] + (99).to_bytes(2, "little") + manifest.head[6:]
    r.set(tier.main_key(key(2)), dataclasses.replace(manifest, head=head).to_bytes())
    assert tier.get_many([key(1), key(2)]) == [None, None]
    assert tier.stats.snapshot().corrupt == 0
    assert r.exists(tier.main_key(key(1)), tier.main_key(key(2))) == 2
