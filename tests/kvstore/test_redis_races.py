"""Races between a Redis reader's cleanup and a concurrent writer (issue #11, item 5).

A reader that finds a blob unusable (a lost part, a corrupt value) cleans it up. If another writer stored a
new value under the same key between the read and the cleanup, the cleanup must leave that acknowledged
write alone: only the value that was read may be deleted. The rewrite is injected deterministically between
the reader's fetch and its cleanup.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis
import torch

from kvstore import RedisTier
from kvstore.redis_local import LocalRedisCluster
from kvstore.tiers import redis_tier
from tests.kvstore.conftest import assert_same, key, make_chunk


def _raw(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def _drop_one_part(url: str, tier: RedisTier) -> None:
    r = _raw(url)
    part = sorted(n for n in r.keys("*") if n != tier.main_key(key(1)))[1]
    r.delete(part)


def _once(action: Callable[[], None], inner: Callable[..., Any]) -> Callable[..., Any]:
    done: list[bool] = []

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not done:
            done.append(True)
            action()
        return inner(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("same_content", [False, True], ids=["other-content", "same-content"])
def test_lost_part_cleanup_keeps_a_concurrent_rewrite(redis_url: str, same_content: bool) -> None:
    reader = RedisTier(redis_url, 1 << 30, stripe_bytes=4096)
    writer = RedisTier(redis_url, 1 << 30, stripe_bytes=4096)
    old = make_chunk(64, seed=1)
    new = old if same_content else make_chunk(64, seed=2)
    writer.put(key(1), old)
    _drop_one_part(redis_url, writer)  # Redis evicted a part: the reader will see a clean miss
    # the reader has read the manifest and fetched the parts; before it cleans up, the writer rewrites
    reader._parts_wrong_size = _once(lambda: writer.put(key(1), new), reader._parts_wrong_size)  # type: ignore[method-assign]
    assert reader.get(key(1)) is None
    assert_same(writer.get(key(1)), new)  # the acknowledged rewrite survived the stale cleanup
    assert_same(reader.get(key(1)), new)
    reader.close()
    writer.close()


def test_corrupt_cleanup_keeps_a_concurrent_rewrite(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    reader = RedisTier(redis_url, 1 << 30)
    writer = RedisTier(redis_url, 1 << 30)
    writer.put(key(1), make_chunk(4, seed=1))
    r = _raw(redis_url)
    blob = bytearray(r.get(reader.main_key(key(1))))  # type: ignore[arg-type]
    blob[-1] ^= 1
    r.set(reader.main_key(key(1)), bytes(blob))
    good = make_chunk(4, seed=2)
    # the reader fetched the corrupt value; the writer stores a good one before the reader drops it
    monkeypatch.setattr(redis_tier, "decode", _once(lambda: writer.put(key(1), good), redis_tier.decode))
    assert reader.get(key(1)) is None
    assert reader.stats.snapshot().corrupt == 1
    assert_same(writer.get(key(1)), good)
    reader.close()
    writer.close()


def test_stale_cleanup_deletes_what_was_read(redis_url: str) -> None:
    """Without a concurrent writer the cleanup still removes the orphaned manifest and its parts."""
    tier = RedisTier(redis_url, 1 << 30, stripe_bytes=4096)
    tier.put(key(1), make_chunk(64, torch.float32))
    _drop_one_part(redis_url, tier)
    assert tier.get(key(1)) is None
    assert _raw(redis_url).keys("*") == []
    tier.close()


def test_cleanup_on_a_cluster(redis_cluster: LocalRedisCluster) -> None:
    """The compare-and-delete script runs on the blob's slot (all its keys share the hash tag)."""
    tier = RedisTier(redis_cluster.url, 1 << 30, cluster=True, stripe_bytes=4096, namespace="races")
    writer = RedisTier(redis_cluster.url, 1 << 30, cluster=True, stripe_bytes=4096, namespace="races")
    writer.put(key(1), make_chunk(64, seed=1))
    main = tier.main_key(key(1))
    node = tier.client.get_node_from_key(main)
    raw = redis.Redis(host=node.host, port=node.port)
    raw.delete(sorted(n for n in raw.keys(b"*") if n.startswith(main + b":"))[0])
    tier._parts_wrong_size = _once(lambda: writer.put(key(1), make_chunk(64, seed=2)), tier._parts_wrong_size)  # type: ignore[method-assign]
    assert tier.get(key(1)) is None
    assert_same(tier.get(key(1)), make_chunk(64, seed=2))
    assert tier.put_if_absent(key(2), make_chunk(64, seed=3)) == (True, [])
    assert writer.put_if_absent(key(2), make_chunk(64, seed=4)) == (False, [])
    assert_same(writer.get(key(2)), make_chunk(64, seed=3))
    for k in (key(1), key(2)):
        tier.delete(k)
    tier.close()
    writer.close()
