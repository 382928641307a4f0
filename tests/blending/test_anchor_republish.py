"""A base that left the store (evicted, or deleted) and is published again by another context: that
publication wins, so the registry must name the new winner's context. ``OriginRegistry.note`` used to keep
an origin already known, so the registry kept naming the first, long-gone publisher, and a request in that
first context then reused another context's KV "as its own" (no anchor correction). Both tests failed then.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from blending.anchor_flow import Computed, shared_chunks
from blending.anchor_origins import OriginRegistry
from blending.engine import Engine
from blending.model import LoadedModel
from blending.writeback import publish_computed
from kvstore import StoreConfig, TieredStore
from kvstore.chunk import KVChunk
from kvstore.keys import KeySpace
from tests.blending.test_anchor_race import OTHER
from tests.blending.test_engine import request


def _chunk(fill: float) -> KVChunk:
    return KVChunk(torch.full((2, 2, 1, 3, 4), fill), torch.arange(3), "fp")


def test_republished_base_records_the_new_winners_origin() -> None:
    store = TieredStore.from_config(StoreConfig(cpu_bytes=1 << 20))
    try:
        origins = OriginRegistry(16)
        key = KeySpace("fp", "layout:base", "tenant").chunk_key([1, 2, 3])
        publish_computed(store, origins, [Computed(key, _chunk(1.0), "ctx-A:0")], "tenant")
        assert origins.get("tenant", key.hex) == "ctx-A:0"
        assert store.delete(key)  # the base leaves the store (an eviction does the same)
        publish_computed(store, origins, [Computed(key, _chunk(2.0), "ctx-B:0")], "tenant")
        stored = store.get(key)
        assert stored is not None and float(stored.kv.flatten()[0]) == 2.0  # B's publication won
        assert origins.get("tenant", key.hex) == "ctx-B:0"  # fails: still "ctx-A:0"
    finally:
        store.close()


@pytest.fixture()
def engine(smollm2: LoadedModel, tmp_path: Path) -> Iterator[Engine]:
    store = TieredStore.from_config(StoreConfig(cpu_bytes=64 << 20))
    yield Engine(smollm2, store)
    store.close()


def test_engine_does_not_reuse_another_contexts_base_as_its_own(engine: Engine) -> None:
    registry, pool = engine.anchor_origins, engine.anchor_pool
    assert registry is not None and pool is not None
    first = engine.prefill(request((0,), mode="anchor"))  # context A computes and publishes the base
    chunk_a = shared_chunks(first.plan)[0]
    assert registry.get(first.namespace, chunk_a.key.hex) == chunk_a.context
    assert engine.store.delete(chunk_a.key)  # evicted from the store
    second = engine.prefill(request((0,), mode="anchor", system=OTHER))  # context B publishes it again
    chunk_b = shared_chunks(second.plan)[0]
    assert chunk_b.key == chunk_a.key and chunk_b.context != chunk_a.context
    stored = engine.store.get(chunk_b.key)
    assert stored is not None
    assert torch.equal(stored.kv, second.fused.kv[:, :, :, chunk_b.span].to(stored.kv.dtype))  # B's KV is the base
    # The stored base is B's, so B is its origin.
    assert registry.get(second.namespace, chunk_b.key.hex) == chunk_b.context  # fails: A's context kept
    # Symptom: context A now takes B's KV for its own and skips the anchor correction.
    before = pool.counters["same_context"]
    engine.prefill(request((0,), mode="anchor"))
    assert pool.counters["same_context"] == before
