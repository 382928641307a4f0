from __future__ import annotations

import pytest

from kvstore import (
    EVICTION_POLICIES,
    EvictionPolicy,
    LatencyHistogram,
    TierStats,
    make_policy,
    register_policy,
)
from kvstore.tiers import FIFOPolicy, LFUPolicy, LRUPolicy
from tests.kvstore.conftest import key


def test_lru_order() -> None:
    p = LRUPolicy()
    for i in range(4):
        p.insert(key(i), 1)
    p.touch(key(0))
    assert list(p) == [key(1), key(2), key(3), key(0)]
    assert p.victim() == key(1)
    p.remove(key(1))
    p.insert(key(2), 1)  # re-insert refreshes
    assert list(p) == [key(3), key(0), key(2)]
    assert len(p) == 3


def test_fifo_ignores_hits() -> None:
    p = FIFOPolicy()
    for i in range(3):
        p.insert(key(i), 1)
    p.touch(key(0))
    assert p.victim() == key(0)


def test_lfu_order_and_ties() -> None:
    p = LFUPolicy()
    for i in range(4):
        p.insert(key(i), 1)
    for _ in range(3):
        p.touch(key(0))
    p.touch(key(1))
    assert p.victim() == key(2)  # freq 1, older than key 3
    p.remove(key(2))
    assert p.victim() == key(3)
    p.remove(key(3))
    assert p.victim() == key(1)
    p.remove(key(1))
    p.remove(key(0))
    assert p.victim() is None and len(p) == 0


def test_registry() -> None:
    assert {"lru", "lfu", "fifo"} <= set(EVICTION_POLICIES)
    assert isinstance(make_policy("lfu"), LFUPolicy)
    with pytest.raises(ValueError, match="unknown eviction policy"):
        make_policy("nope")

    @register_policy("test-mru")
    class MRU(LRUPolicy):
        def victim(self):  # type: ignore[no-untyped-def]
            return next(reversed(list(self)), None)

    try:
        assert isinstance(make_policy("test-mru"), EvictionPolicy)
    finally:
        del EVICTION_POLICIES["test-mru"]


def test_histogram_percentiles() -> None:
    h = LatencyHistogram()
    assert h.percentile(0.5) == 0.0
    for _ in range(90):
        h.observe(0.0002)
    for _ in range(10):
        h.observe(0.2)
    assert 0.0001 <= h.percentile(0.5) <= 0.00025
    assert 0.1 <= h.percentile(0.99) <= 0.2
    d = h.as_dict()
    assert d["count"] == 100 and d["max_ms"] == pytest.approx(200.0)


def test_tier_stats() -> None:
    s = TierStats()
    s.record_get(2, 1, 100, 0.001)
    s.record_put(1, 50, 0.002)
    s.add(errors=1, corrupt=2)
    snap = s.snapshot()
    s.add(errors=5)
    assert (snap.hits, snap.misses, snap.bytes_read) == (2, 1, 100)
    assert (snap.puts, snap.errors, snap.corrupt) == (1, 1, 2)
    with pytest.raises(AttributeError):
        s.add(bogus=1)
    d = s.as_dict()
    assert d["errors"] == 6 and "p99_ms" in d["get_latency"]
