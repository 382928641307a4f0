"""The embedded engine end to end with SmolLM2 and a real CPU + SSD store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from blending.decode import SamplingParams
from blending.engine import Engine, EngineConfig, PrefillRequest, PromptTooLongError
from blending.model import LoadedModel
from blending.planner import PromptSegment
from kvstore import StoreConfig, TieredStore
from kvstore.chunk import KVChunk

SYSTEM = "<|im_start|>system\nAnswer with the fact from the documents.<|im_end|>\n<|im_start|>user\n"
DOCS = [
    "Alice was born in Paris. She likes cats and long walks by the river.\n\n",
    "Bob was born in Rome. He works as a baker in a small shop near the station.\n\n",
    "Carol was born in Oslo. She teaches history at the local school.\n\n",
]
QUESTION = "Question: In which city was Bob born?<|im_end|>\n<|im_start|>assistant\n"


def request(order: tuple[int, ...], mode: str = "blend", system: str = SYSTEM, **kw: object) -> PrefillRequest:
    segs = [PromptSegment(system, "prefix"), *(PromptSegment(DOCS[i], "chunk") for i in order)]
    return PrefillRequest((*segs, PromptSegment(QUESTION)), mode=mode, **kw)  # type: ignore[arg-type]


@pytest.fixture()
def engine(smollm2: LoadedModel, tmp_path: Path) -> Iterator[Engine]:
    store = TieredStore.from_config(StoreConfig(cpu_bytes=64 << 20, ssd_dir=str(tmp_path / "ssd")))
    yield Engine(smollm2, store)
    store.close()


def test_miss_then_reuse_in_new_order(engine: Engine) -> None:
    first = engine.prefill(request((0, 1, 2)))
    assert first.mode == "dense" and first.fallback_reason == "no cached KV for any segment"
    written = engine.writeback(first)
    assert len(written) == 4  # prefix + 3 chunks
    second = engine.prefill(request((2, 0, 1)))
    assert second.mode == "blend" and second.fallback_reason is None
    s = second.fused.stats
    assert s.exact_tokens > 0 and s.cached_tokens > 0 and s.recomputed_tokens > 0
    assert s.total_tokens == len(second.plan.token_ids)
    assert engine.writeback(second) == []


def test_full_ratio_matches_dense_and_generation_continues(engine: Engine, smollm2: LoadedModel) -> None:
    engine.writeback(engine.prefill(request((0, 1, 2))))
    exact = engine.prefill(request((1, 2, 0), recompute_ratio=1.0))
    dense = engine.prefill(request((1, 2, 0), mode="dense"))
    assert exact.mode == "blend" and exact.fused.stats.cached_tokens > 0
    torch.testing.assert_close(exact.fused.last_logits, dense.fused.last_logits, atol=2e-3, rtol=1e-3)
    params = SamplingParams(max_tokens=8, stop_token_ids=(smollm2.tokenizer.eos_token_id,))
    ours = [t for t, _ in engine.generate(exact, params)]
    ids = dense.plan.token_ids[None]
    with torch.inference_mode():
        ref = smollm2.model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :].tolist()
    assert ours == ref[: len(ours)]
    cont = torch.tensor(ours)
    torch.testing.assert_close(engine.score(exact, cont), engine.score(dense, cont), atol=5e-3, rtol=1e-3)


def test_modes_and_fallbacks(engine: Engine) -> None:
    engine.writeback(engine.prefill(request((0, 1, 2))))
    naive = engine.prefill(request((2, 1, 0), mode="naive"))
    assert naive.mode == "naive" and naive.fused.stats.recomputed_tokens == 0
    dense = engine.prefill(request((2, 1, 0), mode="dense"))
    assert dense.mode == "dense" and dense.fused.stats.cached_tokens == 0
    with pytest.raises(ValueError, match="unknown mode"):
        engine.prefill(request((0,), mode="bogus"))


def test_foreign_or_corrupt_kv_is_ignored(engine: Engine) -> None:
    plan = engine.plan(request((0, 1)).segments, "default")
    chunk_seg = plan.segments[1]
    assert chunk_seg.key is not None and chunk_seg.fallback_key is not None
    bad = KVChunk(torch.zeros(30, 2, 3, len(chunk_seg.token_ids), 64), torch.arange(len(chunk_seg.token_ids)), "x")
    engine.store.put(chunk_seg.key, bad)
    engine.store.put(chunk_seg.fallback_key, bad)
    result = engine.prefill(request((0, 1)))
    assert result.mode == "dense" and result.plan.lookup_errors
    assert result.fused.stats.cached_tokens == 0


def test_tenants_do_not_share(engine: Engine) -> None:
    engine.writeback(engine.prefill(request((0, 1, 2))))
    other = engine.prefill(PrefillRequest(request((2, 1, 0)).segments, namespace="tenant-b"))
    assert other.mode == "dense" and other.fused.stats.cached_tokens == 0


def test_warm_then_hit_and_limits(smollm2: LoadedModel, tmp_path: Path) -> None:
    store = TieredStore.from_config(StoreConfig(cpu_bytes=64 << 20))
    engine = Engine(smollm2, store, EngineConfig(max_prompt_tokens=200))
    keys = engine.warm(DOCS, "default", prefix_text=SYSTEM)
    assert len(keys) == 3 and all(store.contains(k) for k in keys)
    result = engine.prefill(request((1, 0)))
    assert result.chunk_hits == 3 and result.mode == "blend"  # the prefix and both chunks
    with pytest.raises(PromptTooLongError):
        engine.prefill(PrefillRequest((PromptSegment("word " * 400),)))
    store.close()


def test_anchor_mode_learns_then_reuses(engine: Engine) -> None:
    first = engine.prefill(request((0, 1), mode="anchor"))
    assert first.mode == "dense"
    assert first.fallback_reason == "anchor: no base KV yet for the shared segments (computed now)"
    bases = [s.key for s in first.plan.segments if s.kind == "chunk"]
    assert len(bases) == 2 and all(k is not None and engine.store.contains(k) for k in bases)
    assert engine.anchor_pool is not None and len(engine.anchor_pool) == 0
    again = engine.prefill(request((0, 1), mode="anchor"))  # the bases' own context: reused as they are
    assert again.mode == "anchor" and engine.anchor_pool.stats()["same_context"] == 2
    torch.testing.assert_close(again.fused.last_logits, first.fused.last_logits, atol=2e-3, rtol=1e-3)
    # Under another agent's prefix the bases need anchors: the first time, a dense prefill learns them.
    other = "<|im_start|>system\nYou are a careful checker.<|im_end|>\n<|im_start|>user\n"
    second = engine.prefill(request((0, 1), mode="anchor", system=other))
    assert second.mode == "dense" and second.fallback_reason == "anchor: no anchor for this context and length"
    assert len(engine.anchor_pool) == 2
    third = engine.prefill(request((0, 1), mode="anchor", system=other))
    assert third.mode == "anchor" and third.fallback_reason is None
    s = third.fused.stats
    assert s.recomputed_tokens == 0 and s.reused_tokens > 0  # no forward pass for the reused tokens
    # An anchor identical to the occurrence reproduces the real KV, so the logits match dense.
    torch.testing.assert_close(third.fused.last_logits, second.fused.last_logits, atol=2e-3, rtol=1e-3)
    # A segment seen for the first time is computed in place and becomes a base; the others are reused.
    mixed = engine.prefill(request((0, 1, 2), mode="anchor", system=other))
    assert mixed.mode == "anchor" and mixed.chunk_hits == 3 and mixed.chunk_misses == 1
    assert mixed.fused.stats.reused_tokens == s.reused_tokens
    assert engine.store.contains(mixed.plan.segments[3].key)  # type: ignore[arg-type]
    hybrid = engine.prefill(request((0, 1), mode="hybrid"))
    assert hybrid.mode == "hybrid" and hybrid.fused.stats.recomputed_tokens > 0


def test_anchor_mode_survives_a_malformed_base(engine: Engine) -> None:
    """A base of the right length but the wrong head size (e.g. planted through a shared tier) degrades to a
    dense prefill with a reason instead of failing the request."""
    plan = engine._anchor_plan(request((0, 1)).segments, "default")
    seg = next(s for s in plan.segments if s.kind == "chunk")
    n = len(seg.token_ids)
    assert seg.key is not None
    engine.store.put(seg.key, KVChunk(torch.zeros(30, 2, 3, n, 32), torch.arange(n), engine.fingerprint))
    result = engine.prefill(request((0, 1), mode="anchor"))
    assert result.mode == "dense" and (result.fallback_reason or "").startswith("anchor failed:")
    dense = engine.prefill(request((0, 1), mode="dense"))
    torch.testing.assert_close(result.fused.last_logits, dense.fused.last_logits)
