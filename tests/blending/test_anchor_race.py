"""Anchor bases raced by two instances over one shared tier (issue #11 leftover): only the context whose
publication wins becomes a base's origin, in explicit anchor mode as in ``auto``; an instance that did not
publish a base never takes it for its own.

Both engines share one SSD directory (two stores, as two sidecar processes on one volume) and the session's
SmolLM2 model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from blending.anchor_flow import shared_chunks
from blending.engine import Engine, EngineConfig, PrefillResult
from blending.fused import FusedKV
from blending.model import LoadedModel
from kvstore import StoreConfig, TieredStore
from tests.blending.test_engine import request

OTHER = "<|im_start|>system\nYou are a careful checker.<|im_end|>\n<|im_start|>user\n"


@pytest.fixture()
def make_engine(smollm2: LoadedModel, tmp_path: Path) -> Iterator[Callable[..., Engine]]:
    """Engines whose stores share one SSD directory (each its own CPU tier)."""
    stores: list[TieredStore] = []

    def make(config: EngineConfig | None = None) -> Engine:
        store = TieredStore.from_config(StoreConfig(cpu_bytes=64 << 20, ssd_dir=str(tmp_path / "shared-ssd")))
        stores.append(store)
        return Engine(smollm2, store, config)

    yield make
    for store in stores:
        store.close()


def _origins(engine: Engine, result: PrefillResult) -> list[str | None]:
    registry = engine.anchor_origins
    assert registry is not None
    return [registry.get(result.namespace, c.key.hex) for c in shared_chunks(result.plan)]


def test_racing_instances_record_only_the_winners_origin(
    make_engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = make_engine(), make_engine()
    requests = {a: request((0, 1), mode="anchor"), b: request((0, 1), mode="anchor", system=OTHER)}
    barrier = threading.Barrier(2)
    noted_before_publication: dict[Engine, list[str | None]] = {}

    def racing(engine: Engine) -> None:
        # A real race overlaps by chance; the barrier makes it certain: each engine has looked the bases
        # up (both miss) and computes them in its own context while the other does too.
        real = engine._dense

        def dense(ids: torch.Tensor) -> FusedKV:
            barrier.wait(timeout=120)
            registry = engine.anchor_origins
            assert registry is not None
            plan = engine._anchor_plan(requests[engine].segments, "default")
            noted_before_publication[engine] = [registry.get("default", c.key.hex) for c in shared_chunks(plan)]
            return real(ids)

        monkeypatch.setattr(engine, "_dense", dense)

    racing(a)
    racing(b)
    with ThreadPoolExecutor(2) as pool:
        futures = {e: pool.submit(e.prefill, r) for e, r in requests.items()}
        results = {e: f.result(timeout=600) for e, f in futures.items()}
    monkeypatch.undo()
    for engine in (a, b):  # nothing is recorded before the publication decides
        assert noted_before_publication[engine] == [None, None]
    for result in results.values():  # both computed their prompt exactly
        assert result.mode == "dense"
        assert result.fallback_reason == "anchor: no base KV yet for the shared segments (computed now)"
    chunks = {e: shared_chunks(results[e].plan) for e in (a, b)}  # the same bases at each prompt's own spans
    for i, key in enumerate(c.key for c in chunks[a]):
        base = a.store.get(key)
        assert base is not None and all(chunks[e][i].key == key for e in (a, b))
        winners = [e for e in (a, b) if torch.equal(results[e].fused.kv[:, :, :, chunks[e][i].span].cpu(), base.kv)]
        assert len(winners) == 1  # the two contexts' KV differ: the stored base is one engine's
        winner, loser = winners[0], b if winners[0] is a else a
        assert _origins(winner, results[winner])[i] == chunks[winner][i].context
        assert _origins(loser, results[loser])[i] is None  # the loser holds another context's base
    # Both instances keep answering correctly from the shared bases (a dense prefill is the reference).
    for engine, req in requests.items():
        again = engine.prefill(req)
        reference = engine.prefill(request((0, 1), mode="dense", system=req.segments[0].text))
        if all(o is not None for o in _origins(engine, again)):  # its own bases: reused as they are
            assert again.mode == "anchor"
            torch.testing.assert_close(again.fused.last_logits, reference.fused.last_logits, atol=2e-3, rtol=1e-3)
        else:  # another context's bases and no anchor yet: dense, and learns one
            assert again.mode == "dense" and again.fallback_reason == "anchor: no anchor for this context and length"
            assert torch.equal(again.fused.last_logits, reference.fused.last_logits)


def test_an_instance_that_does_not_publish_records_no_origin(smollm2: LoadedModel, tmp_path: Path) -> None:
    """A read-only engine (writeback off) computes a base but stores nothing; when another engine over the
    same store publishes the same segment from another context, the first must not take that base for its
    own and reuse it uncorrected."""
    store = TieredStore.from_config(StoreConfig(cpu_bytes=64 << 20, ssd_dir=str(tmp_path / "ssd")))
    reader, writer = Engine(smollm2, store, EngineConfig(writeback=False)), Engine(smollm2, store)
    first = reader.prefill(request((0, 1), mode="anchor"))
    assert first.mode == "dense" and _origins(reader, first) == [None, None]
    published = writer.prefill(request((0, 1), mode="anchor", system=OTHER))
    assert all(o is not None for o in _origins(writer, published))
    again = reader.prefill(request((0, 1), mode="anchor"))
    assert again.chunk_hits == 2  # the writer's bases, computed under OTHER
    assert again.mode == "dense" and again.fallback_reason == "anchor: no anchor for this context and length"
    reference = reader.prefill(request((0, 1), mode="dense"))
    assert torch.equal(again.fused.last_logits, reference.fused.last_logits)
    store.close()
