"""auto end to end with SmolLM2: exact-only for short prompts, immediate reuse, calibrated blending, the
fidelity guard, and naive reuse that really runs nothing for the cached tokens."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from blending.calibration import Calibration
from blending.engine import Engine, EngineConfig, PrefillRequest
from blending.guard import GuardConfig
from blending.model import LoadedModel
from blending.planner import PromptSegment
from blending.rope import rerotate
from kvstore import StoreConfig, TieredStore
from tests.blending.test_engine import DOCS, QUESTION, SYSTEM, request

LONG = [d.strip() + " " + " ".join(f"Note {k}: the archive keeps records of {d.split()[0]} for year {1900 + k}."
                                   for k in range(8)) + "\n\n" for d in DOCS]


def long_request(order: tuple[int, ...], mode: str = "auto", namespace: str = "default") -> PrefillRequest:
    segs = [PromptSegment(SYSTEM, "prefix"), *(PromptSegment(LONG[i], "chunk") for i in order), PromptSegment(QUESTION)]
    return PrefillRequest(tuple(segs), namespace=namespace, mode=mode)  # type: ignore[arg-type]


@pytest.fixture()
def engine(smollm2: LoadedModel, tmp_path: Path) -> Iterator[Engine]:
    store = TieredStore.from_config(StoreConfig(cpu_bytes=256 << 20, ssd_dir=str(tmp_path / "ssd")))
    yield Engine(smollm2, store, EngineConfig(guard=GuardConfig(sample_rate=0.0)))
    store.close()


def test_short_prompt_in_auto_is_exact(engine: Engine) -> None:
    engine.writeback(engine.prefill(request((0, 1, 2), mode="dense", namespace="warm")))
    assert engine.hot.bytes_used("warm") == 0  # the dense reference leaves nothing in the hot cache
    engine.writeback(engine.prefill(request((0, 1, 2), namespace="warm")))
    result = engine.prefill(request((2, 0, 1), mode="auto", namespace="warm"))
    assert result.mode in ("prefix", "dense") and "short prompt" in (result.fallback_reason or "")
    s = result.fused.stats
    assert s.reused_tokens == 0 and s.recomputed_tokens == 0  # nothing approximate
    dense = engine.prefill(request((2, 0, 1), mode="dense", namespace="reference"))
    torch.testing.assert_close(result.fused.last_logits, dense.fused.last_logits, atol=2e-3, rtol=1e-3)


def test_identical_request_twice_is_served_from_the_hot_cache(engine: Engine) -> None:
    first = engine.prefill(long_request((0, 1, 2)))
    second = engine.prefill(long_request((0, 1, 2)))  # no writeback in between
    assert second.mode == "prefix"
    s = second.fused.stats
    assert s.exact_tokens == s.total_tokens - 1 and s.computed_tokens == 1
    torch.testing.assert_close(second.fused.last_logits, first.fused.last_logits, atol=2e-3, rtol=1e-3)
    assert second.ttft_s < first.ttft_s


def test_an_extending_prompt_reuses_the_previous_one_exactly(engine: Engine) -> None:
    first = engine.prefill(long_request((0, 1)))
    longer = long_request((0, 1))
    turn = PrefillRequest((*longer.segments, PromptSegment("Bob.<|im_end|>\n<|im_start|>user\nAnd Carol?")))
    result = engine.prefill(turn)
    assert result.mode == "prefix" and result.fused.stats.exact_tokens == first.fused.stats.total_tokens
    dense = engine.prefill(replace(turn, mode="dense", namespace="reference"))
    torch.testing.assert_close(result.fused.last_logits, dense.fused.last_logits, atol=2e-3, rtol=1e-3)


def test_documents_of_the_previous_prompt_are_reusable_at_once(engine: Engine) -> None:
    engine.prefill(long_request((0, 1, 2)))
    result = engine.prefill(long_request((2, 0, 1), mode="blend"))  # nothing written back yet
    assert result.mode == "blend" and result.chunk_hits >= 3 and result.fused.stats.reused_tokens > 0


def test_auto_blends_with_the_calibrated_budget(engine: Engine) -> None:
    engine.writeback(engine.prefill(long_request((0, 1, 2))))
    uncalibrated = engine.prefill(long_request((2, 1, 0)))
    assert uncalibrated.mode == "prefix" and "no calibration" in (uncalibrated.fallback_reason or "")
    engine.set_calibration(Calibration(engine.fingerprint, {0.15: 0.9, 0.3: 0.96}, samples=3))
    result = engine.prefill(long_request((1, 0, 2)))
    assert result.mode == "blend" and "blend 0.30" in (result.fallback_reason or "")
    chunks = sum(len(s.token_ids) for s in result.plan.segments if s.kind == "chunk")
    assert result.fused.stats.recomputed_tokens == round(0.3 * chunks)
    # Another engine over the same store reads the persisted curve.
    other = Engine(engine.loaded, engine.store, EngineConfig(guard=GuardConfig(sample_rate=0.0)))
    assert other.calibration() == engine.calibration()
    strict = engine.prefill(replace(long_request((0, 2, 1)), fidelity_target=0.99))
    assert strict.mode == "prefix" and "99% of answers" in (strict.fallback_reason or "")


def test_guard_checks_samples_and_raises_the_budget(smollm2: LoadedModel, tmp_path: Path) -> None:
    store = TieredStore.from_config(StoreConfig(cpu_bytes=256 << 20))
    engine = Engine(smollm2, store, EngineConfig(guard=GuardConfig(sample_rate=1.0, min_samples=1)))
    engine.writeback(engine.prefill(long_request((0, 1, 2))))
    engine.set_calibration(Calibration(engine.fingerprint, {0.0: 1.0, 0.3: 1.0}, samples=3))
    assert engine.guard is not None
    first = engine.prefill(long_request((2, 1, 0)))
    assert first.mode == "blend" and "blend 0.00" in (first.fallback_reason or "")
    engine.guard.drain()
    seen = engine.guard.snapshot("default")["blend"]
    assert seen["samples"] == 1 and 0.0 <= seen["agreement"] <= 1.0 and seen["same_answer"] in (0.0, 1.0)
    assert engine.guard.snapshot("another-tenant") == {}
    if seen["same_answer"] < 1.0:  # naive reuse rarely keeps the whole answer: the guard must react
        assert engine.guard.escalation("default") == 1
        assert "blend 0.30" in (engine.prefill(long_request((1, 2, 0))).fallback_reason or "")
    assert engine.guard.escalation("another-tenant") == 0
    store.close()


def test_naive_runs_nothing_for_cached_tokens(engine: Engine) -> None:
    engine.writeback(engine.prefill(request((0, 1, 2), mode="dense")))
    result = engine.prefill(request((2, 1, 0), mode="naive", namespace="default"))
    assert result.mode == "naive"
    i, seg = next((i, s) for i, s in enumerate(result.plan.segments) if s.kind == "chunk")
    start = sum(len(s.token_ids) for s in result.plan.segments[:i])
    assert seg.cached is not None
    span = slice(start, start + len(seg.token_ids))
    for layer in (0, 1, 5):  # every layer keeps the cached (re-rotated) KV: no layer ran for these tokens
        torch.testing.assert_close(result.fused.kv[layer, 1, :, span], seg.cached.kv[layer, 1])
        keys = rerotate(seg.cached.kv[layer, 0], seg.cached.positions, torch.arange(span.start, span.stop),
                        engine.adapter.inv_freq)  # type: ignore[union-attr]
        torch.testing.assert_close(result.fused.kv[layer, 0, :, span], keys.to(result.fused.kv.dtype))
    s = result.fused.stats
    assert s.recomputed_tokens == 0 and s.reused_tokens == result.plan.cached_chunk_tokens


def test_agents_share_messages_in_auto(engine: Engine) -> None:
    """A chain of agents with their own system prompts. While the first agent's prompt is hot, the second
    blends the shared message's in-context KV; from the store alone (hot cache gone: later, or another
    instance), the base the first agent published is corrected by an anchor learned once (hybrid)."""
    engine.set_calibration(Calibration(engine.fingerprint, {0.15: 0.97}, samples=3))
    checker = "<|im_start|>system\nYou are a careful checker of facts.<|im_end|>\n<|im_start|>user\n"

    def agent(system: str) -> PrefillRequest:
        segs = (PromptSegment(system, "prefix"), PromptSegment(LONG[0] + LONG[1], "chunk"), PromptSegment(QUESTION))
        return PrefillRequest(segs)

    first = engine.prefill(agent(SYSTEM))
    assert first.mode == "dense"
    hot = engine.prefill(agent(checker))
    assert hot.mode == "blend" and hot.chunk_hits == 1
    engine.hot.clear()
    learn = engine.prefill(agent(checker))
    assert learn.mode == "dense" and "anchor" in (learn.fallback_reason or "")
    engine.hot.clear()  # else the identical prompt is an exact hit
    reuse = engine.prefill(agent(checker))
    assert reuse.mode == "hybrid" and reuse.fused.stats.reused_tokens > 0
    dense = engine.prefill(replace(agent(checker), mode="dense", namespace="reference"))
    assert int(reuse.fused.last_logits.argmax()) == int(dense.fused.last_logits.argmax())


def test_first_use_calibrates_in_the_background(engine: Engine) -> None:
    from blending.fidelity import calibrate_in_background

    threads = []
    engine.on_uncalibrated = lambda eng: threads.append(
        calibrate_in_background(eng, ratios=(0.15, 1.0), prompts=1, docs=3, answer_tokens=4))
    assert engine.calibration() is None and len(threads) == 1
    assert engine.calibration() is None and len(threads) == 1  # started once
    threads[0].join(timeout=300)
    cal = engine.calibration()
    assert cal is not None and cal.samples == 1 and set(cal.curve) == {0.15, 1.0}
    assert cal.curve[1.0] == 1.0  # recomputing every token is a dense prefill
    assert engine.calibrations is not None and engine.calibrations.load() == cal

