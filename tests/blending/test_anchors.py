"""The anchor pool: exact offset estimation, fallbacks, bounds and concurrency."""

from __future__ import annotations

import threading

import torch

from blending.adapter import ModelAdapter
from blending.anchor_origins import OriginRegistry
from blending.anchors import AnchorConfig, AnchorPool
from blending.precompute import chunk_kv
from kvstore.chunk import KVChunk
from tests.blending.conftest import tiny_model


def _setup(seed: int = 0) -> tuple[ModelAdapter, torch.Tensor, torch.Tensor]:
    adapter = ModelAdapter(tiny_model("llama"))
    g = torch.Generator().manual_seed(seed)
    return adapter, torch.randint(0, 256, (9,), generator=g), torch.randint(0, 256, (14,), generator=g)


def _real(adapter: ModelAdapter, prefix: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    kv, _ = adapter.prefill(torch.cat([prefix, segment]))
    return kv[:, :, :, len(prefix) :]


def test_identical_anchor_reproduces_real_kv() -> None:
    adapter, prefix, segment = _setup()
    base = chunk_kv(adapter, "fp", segment)
    real = _real(adapter, prefix, segment)
    positions = torch.arange(len(prefix), len(prefix) + len(segment))
    pool = AnchorPool(adapter.inv_freq)
    pool.add("t", "agent-a:0", base, real, positions)
    est = pool.estimate("t", "agent-a:0", base, positions)
    assert est.chunk is not None and est.reason is None and est.distance == 0.0
    torch.testing.assert_close(est.chunk.kv, real, atol=1e-4, rtol=1e-4)
    # Position-free: the same anchor corrects the segment at another offset (keys re-rotated there).
    moved = torch.arange(40, 40 + len(segment))
    est2 = pool.estimate("t", "agent-a:0", base, moved)
    assert est2.chunk is not None
    torch.testing.assert_close(est2.chunk.kv[:, 1], real[:, 1], atol=1e-4, rtol=1e-4)
    from blending.rope import rerotate

    torch.testing.assert_close(
        est2.chunk.kv[:, 0], rerotate(real[:, 0], positions, moved, adapter.inv_freq), atol=1e-4, rtol=1e-4
    )
    # The ablation without the deviation reuses the base as is, re-rotated to the new positions.
    plain = AnchorPool(adapter.inv_freq, AnchorConfig(apply_deviation=False))
    plain.add("t", "agent-a:0", base, real, positions)
    est3 = plain.estimate("t", "agent-a:0", base, moved)
    assert est3.chunk is not None
    torch.testing.assert_close(est3.chunk.kv[:, 1], base.kv[:, 1])
    torch.testing.assert_close(est3.chunk.kv[:, 0], rerotate(base.kv[:, 0], base.positions, moved, adapter.inv_freq),
                               atol=1e-4, rtol=1e-4)


def test_fallbacks_for_unknown_context_unrelated_segment_and_flat_weights() -> None:
    adapter, prefix, segment = _setup()
    positions = torch.arange(len(prefix), len(prefix) + len(segment))
    pool = AnchorPool(adapter.inv_freq, AnchorConfig(max_distance=0.35))
    pool.add("t", "a:0", chunk_kv(adapter, "fp", segment), _real(adapter, prefix, segment), positions)
    base = chunk_kv(adapter, "fp", segment)
    assert pool.estimate("t", "b:0", base, positions).reason == "no anchor for this context and length"
    longer = chunk_kv(adapter, "fp", torch.randint(0, 256, (30,)))  # the anchor covers < half of it
    assert pool.estimate("t", "a:0", longer, torch.arange(30)).reason == "no anchor for this context and length"
    unrelated = chunk_kv(adapter, "fp", torch.randint(0, 256, (14,), generator=torch.Generator().manual_seed(5)))
    assert pool.estimate("t", "a:0", unrelated, positions).reason == "no anchor close enough"
    # Several unrelated anchors and a high temperature: weights are flat, the entropy test refuses.
    flat = AnchorPool(adapter.inv_freq, AnchorConfig(max_distance=float("inf"), temperature=10.0))
    for s in range(4):
        seg = torch.randint(0, 256, (14,), generator=torch.Generator().manual_seed(100 + s))
        flat.add("t", "a:0", chunk_kv(adapter, "fp", seg), _real(adapter, prefix, seg), positions)
    est = flat.estimate("t", "a:0", unrelated, positions)
    assert est.chunk is None and est.reason == "anchor weights too flat" and est.entropy > 0.9
    assert flat.stats()["fallbacks"] == 1


def _fake_anchor(n: int = 4) -> tuple[KVChunk, torch.Tensor, torch.Tensor]:
    kv = torch.randn(2, 2, 1, n, 8)
    return KVChunk(kv, torch.arange(n), "fp"), kv + 0.1, torch.arange(n)


ANCHOR_BYTES = (2 * 2 * 1 * 4 * 8 + 2 * 2 * 1 * 1 * 8) * 4  # fp32 deviation [2, 2, 1, 4, 8] + summary


def test_pool_bounds_and_least_used_eviction() -> None:
    inv = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    pool = AnchorPool(inv, AnchorConfig(max_per_context=3, max_distance=float("inf")))
    first = _fake_anchor()
    pool.add("t", "c", *first)
    assert pool.estimate("t", "c", first[0], first[2]).chunk is not None  # used once: protected from eviction
    for _ in range(5):
        pool.add("t", "c", *_fake_anchor())
    assert pool.contexts() == {("t", "c"): 3}
    assert pool.estimate("t", "c", first[0], first[2]).distance == 0.0  # the used anchor survived
    one = ANCHOR_BYTES
    capped = AnchorPool(inv, AnchorConfig(max_bytes=5 * one))
    for i in range(12):
        capped.add("t", f"ctx{i % 4}", *_fake_anchor())
        assert capped.used_bytes <= 5 * one
    assert len(capped) == 5 and capped.stats()["evicted"] == 7


def test_concurrent_updates_keep_pool_consistent() -> None:
    inv = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    pool = AnchorPool(inv, AnchorConfig(max_per_context=4, max_bytes=10 * ANCHOR_BYTES))
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(30):
                chunk, real, pos = _fake_anchor()
                pool.add("t", f"ctx{(t + i) % 3}", chunk, real, pos)
                pool.estimate("t", f"ctx{i % 3}", chunk, pos)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(n <= 4 for n in pool.contexts().values())
    assert pool.used_bytes == len(pool) * ANCHOR_BYTES
    assert pool.used_bytes <= pool.config.max_bytes


def test_persistence_round_trip_through_kvstore() -> None:
    """Anchors written by one pool are found by another sharing the store (as instances sharing Redis)."""
    from blending.anchor_store import AnchorStore
    from kvstore import StoreConfig, TieredStore

    adapter, prefix, segment = _setup()
    positions = torch.arange(len(prefix), len(prefix) + len(segment))
    store = TieredStore.from_config(StoreConfig(cpu_bytes=16 << 20))
    writer = AnchorPool(adapter.inv_freq, AnchorConfig(max_per_context=2), AnchorStore(store, "fp", "tiny"))
    others = [torch.randint(0, 256, (14,), generator=torch.Generator().manual_seed(s)) for s in (7, 8)]
    for seg in [*others, segment]:  # the third reuses an evicted slot: at most 2 persisted per context
        writer.add("t", "agent-a:0", chunk_kv(adapter, "fp", seg), _real(adapter, prefix, seg), positions)
    writer.add("t", "agent-a:0", chunk_kv(adapter, "fp", segment), _real(adapter, prefix, segment), positions)
    assert len(writer) == 2  # seen again: refreshed, not duplicated
    reader = AnchorPool(adapter.inv_freq, AnchorConfig(max_per_context=2), AnchorStore(store, "fp", "tiny"))
    base = chunk_kv(adapter, "fp", segment)
    est = reader.estimate("t", "agent-a:0", base, positions)
    assert est.chunk is not None and est.anchors == 2
    torch.testing.assert_close(est.chunk.kv, _real(adapter, prefix, segment), atol=1e-4, rtol=1e-4)
    other_model = AnchorPool(adapter.inv_freq, persist=AnchorStore(store, "other-fp", "tiny"))
    assert other_model.estimate("t", "agent-a:0", base, positions).reason == "no anchor for this context and length"
    store.close()


def test_bfloat16_anchor_reloaded_is_refreshed_not_duplicated() -> None:
    """A bf16 model's anchors: the byte count covers the float32 summary, and an anchor reloaded from the
    store is recognised when its segment is observed again."""
    from blending.anchor_store import AnchorStore
    from kvstore import StoreConfig, TieredStore

    inv = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    kv = torch.randn(2, 2, 1, 4, 8).to(torch.bfloat16)
    base, real, pos = KVChunk(kv, torch.arange(4), "fp"), (kv.float() + 0.1).to(torch.bfloat16), torch.arange(4)
    store = TieredStore.from_config(StoreConfig(cpu_bytes=1 << 20))
    first = AnchorPool(inv, persist=AnchorStore(store, "fp", "tiny"))
    first.add("t", "c", base, real, pos)
    assert first.used_bytes == 2 * 2 * 1 * 4 * 8 * 2 + 2 * 2 * 1 * 1 * 8 * 4  # bf16 deviation + fp32 summary
    second = AnchorPool(inv, persist=AnchorStore(store, "fp", "tiny"))
    second.add("t", "c", base, real, pos)
    assert len(second) == 1 and second.used_bytes == first.used_bytes
    store.close()


def test_tenants_have_their_own_anchors_origins_and_persisted_slots() -> None:
    """A tenant's anchors, origins and persisted anchors are invisible to another tenant using the same
    context and pair names (issue #11: contexts like ``no-prefix:0`` carried no tenant)."""
    from blending.anchor_store import AnchorStore
    from kvstore import StoreConfig, TieredStore

    adapter, prefix, segment = _setup()
    positions = torch.arange(len(prefix), len(prefix) + len(segment))
    base, real = chunk_kv(adapter, "fp", segment), _real(adapter, prefix, segment)
    store = TieredStore.from_config(StoreConfig(cpu_bytes=16 << 20))
    pair = "no-prefix:0>no-prefix:1"
    pool = AnchorPool(adapter.inv_freq, persist=AnchorStore(store, "fp", "tiny"))
    pool.add("alice", pair, base, real, positions)
    assert pool.estimate("bob", pair, base, positions).reason == "no anchor for this context and length"
    assert pool.estimate("alice", pair, base, positions).chunk is not None
    origins = OriginRegistry(16)
    origins.note("alice", "base-key", "no-prefix:0")
    assert origins.get("bob", "base-key") is None and origins.get("alice", "base-key") == "no-prefix:0"
    origins.note("bob", "base-key", "no-prefix:3")  # bob's own origin for the same key
    assert (origins.get("alice", "base-key"), origins.get("bob", "base-key")) == ("no-prefix:0", "no-prefix:3")
    # Another instance sharing the store finds the persisted anchor for alice only.
    other = AnchorPool(adapter.inv_freq, persist=AnchorStore(store, "fp", "tiny"))
    assert other.estimate("bob", pair, base, positions).reason == "no anchor for this context and length"
    assert other.estimate("alice", pair, base, positions).chunk is not None
    assert other.contexts() == {("alice", pair): 1}
    store.close()


def test_one_tenant_cannot_evict_another_below_an_equal_share() -> None:
    inv = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    # Per-tenant cap: a flooding tenant evicts its own anchors; the other's stay untouched.
    capped = AnchorPool(inv, AnchorConfig(max_bytes=6 * ANCHOR_BYTES, max_tenant_bytes=4 * ANCHOR_BYTES))
    for i in range(3):
        capped.add("bob", f"ctx{i}", *_fake_anchor())
    kept = capped.contexts("bob")
    for i in range(40):
        capped.add("alice", f"ctx{i % 7}", *_fake_anchor())
        assert capped.tenant_bytes("alice") <= 4 * ANCHOR_BYTES and capped.used_bytes <= 6 * ANCHOR_BYTES
    assert capped.contexts("bob") == kept and capped.tenant_bytes("bob") == 3 * ANCHOR_BYTES
    # Global bound only: a tenant holding more than the other is evicted down to an equal share, no further.
    shared = AnchorPool(inv, AnchorConfig(max_bytes=6 * ANCHOR_BYTES))
    for i in range(5):
        shared.add("bob", f"ctx{i}", *_fake_anchor())
    for i in range(40):
        shared.add("alice", f"ctx{i % 7}", *_fake_anchor())
        assert shared.used_bytes <= 6 * ANCHOR_BYTES
        assert shared.tenant_bytes("bob") >= 3 * ANCHOR_BYTES
    assert shared.tenant_bytes("bob") == shared.tenant_bytes("alice") == 3 * ANCHOR_BYTES
    assert shared.used_bytes == sum(shared.tenant_bytes(t) for t in ("alice", "bob"))
    # An anchor larger than a tenant's budget is not kept at all.
    tiny = AnchorPool(inv, AnchorConfig(max_bytes=ANCHOR_BYTES // 2))
    tiny.add("bob", "c", *_fake_anchor())
    assert len(tiny) == 0 and tiny.used_bytes == 0


def test_origin_registry_is_bounded_fairly_across_tenants() -> None:
    origins = OriginRegistry(10)
    for i in range(4):
        origins.note("bob", f"k{i}", "no-prefix:0")
    for i in range(100):
        origins.note("alice", f"k{i}", "no-prefix:1")
        assert len(origins) <= 10
    assert [origins.get("bob", f"k{i}") for i in range(4)] == ["no-prefix:0"] * 4
    assert origins.get("alice", "k99") == "no-prefix:1" and origins.get("alice", "k0") is None
