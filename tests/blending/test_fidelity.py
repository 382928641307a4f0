"""Kept answers: the measure that calibration and the guard use, on the real model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from blending.calibration import Calibration, calibration_prompts, document_segments
from blending.engine import Engine, EngineConfig, PrefillRequest
from blending.fidelity import fidelity, greedy_answer, keeps_answer, measure_curve
from blending.guard import GuardConfig
from blending.model import LoadedModel
from blending.policy import PolicyConfig
from kvstore import StoreConfig, TieredStore
from tests.blending.test_auto import long_request


@pytest.fixture()
def engine(smollm2: LoadedModel, tmp_path: Path) -> Iterator[Engine]:
    store = TieredStore.from_config(StoreConfig(cpu_bytes=256 << 20))
    yield Engine(smollm2, store, EngineConfig(guard=GuardConfig(sample_rate=0.0)))
    store.close()


def test_a_divergence_after_the_teacher_forced_window_changes_the_answer(engine: Engine) -> None:
    """Teacher-forced agreement over the first 16 tokens cannot see a token that differs at position 20;
    the kept-answer check does."""
    documents, _, system = calibration_prompts(1, docs=3)[0]
    segments = document_segments(engine.tokenizer, system, documents, "Describe every town in the documents.")
    dense = engine.prefill(PrefillRequest(segments, mode="dense"))
    answer = greedy_answer(engine, dense, 32)
    assert len(answer) > 20
    assert keeps_answer(engine, dense, answer, 32)
    changed = answer.clone()
    changed[20] = (int(answer[20]) + 1) % engine.tokenizer.vocab_size
    assert not keeps_answer(engine, dense, changed, 32)
    assert not keeps_answer(engine, dense, answer[:-1], 32)  # the answer ended early: not the same answer
    window = fidelity(engine, dense, engine.score(dense, answer[:16]), changed[:16])
    assert window.agreement == 1.0


def test_calibration_measures_kept_answers(engine: Engine) -> None:
    cal = measure_curve(engine, (0.0, 1.0), prompts=2, docs=3, answer_tokens=24)
    assert cal.answer_tokens == 24 and cal.samples == 2 and set(cal.curve) == set(cal.agreement) == {0.0, 1.0}
    for r in cal.curve:
        assert cal.curve[r] in (0.0, 0.5, 1.0)
        # A kept answer has every token equal, so the share of kept answers never exceeds agreement.
        assert cal.curve[r] <= cal.agreement[r] + 1e-9
    engine.set_calibration(cal)
    again = Engine(engine.loaded, engine.store, EngineConfig(guard=GuardConfig(sample_rate=0.0)))
    loaded = again.calibration()
    assert loaded is not None and loaded.answer_tokens == 24
    assert loaded.curve == pytest.approx(cal.curve, abs=1e-4)
    assert loaded.agreement == pytest.approx(cal.agreement, abs=1e-4)


def test_guard_reports_kept_answers(smollm2: LoadedModel) -> None:
    store = TieredStore.from_config(StoreConfig(cpu_bytes=256 << 20))
    engine = Engine(smollm2, store, EngineConfig(guard=GuardConfig(sample_rate=1.0, min_samples=1)))
    engine.writeback(engine.prefill(long_request((0, 1, 2))))
    result = engine.prefill(PrefillRequest(long_request((2, 1, 0)).segments, mode="naive"))
    assert engine.guard is not None
    engine.guard.drain()
    row = engine.guard.snapshot("default")["naive"]
    dense = engine.prefill(long_request((2, 1, 0), mode="dense"))
    kept = keeps_answer(engine, result, greedy_answer(engine, dense, 32), 32)
    assert row["same_answer"] == float(kept) and row["samples"] == 1
    assert torch.isfinite(torch.tensor(row["agreement"]))
    store.close()


def test_a_tenant_earns_a_budget_from_its_own_kept_answers(smollm2: LoadedModel) -> None:
    """auto runs exact-only (no calibrated budget keeps the answers), the guard blends those requests at the
    shadow budget in the background and compares answers; once enough were kept (here at a target of 50%),
    that tenant blends, and another tenant's traffic earns nothing for it."""
    store = TieredStore.from_config(StoreConfig(cpu_bytes=256 << 20))
    config = EngineConfig(guard=GuardConfig(sample_rate=1.0, min_evidence=2, window=2),
                          policy=PolicyConfig(fidelity_target=0.5))
    engine = Engine(smollm2, store, config)
    engine.set_calibration(Calibration(engine.fingerprint, {0.3: 0.25, 1.0: 1.0}, samples=8))
    engine.writeback(engine.prefill(long_request((0, 1, 2))))
    assert engine.guard is not None
    first = engine.prefill(long_request((2, 1, 0)))
    assert first.mode == "prefix" and first.shadow is not None and first.shadow.ratio == 0.3
    engine.guard.drain()
    # The same blend, computed apart from the store's in-context chunks, keeps the answer iff the guard says so.
    probe = Engine(smollm2, store, EngineConfig(guard=GuardConfig(sample_rate=0.0)))
    blended = probe.prefill(PrefillRequest(long_request((2, 1, 0)).segments, mode="blend", recompute_ratio=0.3))
    dense = probe.prefill(long_request((2, 1, 0), mode="dense"))
    kept = keeps_answer(probe, blended, greedy_answer(probe, dense, 32), 32)
    shadow = engine.guard.snapshot("default")["shadow"]
    assert shadow["samples"] == 1 and shadow["same_answer"] == float(kept)
    assert engine.guard.earned("default") is None  # one comparison is not enough evidence
    assert engine.prefill(long_request((1, 2, 0))).mode == "prefix"
    engine.guard.drain()
    row = engine.guard.snapshot("default")["shadow"]
    assert row["samples"] == 2
    assert (engine.guard.earned("default") == 0.3) == (row["same_answer"] >= 0.5)
    assert engine.guard.earned("default") == 0.3, "on SmolLM2 one of these two answers is kept at 0.3"
    earned = engine.prefill(long_request((0, 2, 1)))
    assert earned.mode == "blend" and "sampled answers were kept" in (earned.fallback_reason or "")
    engine.writeback(engine.prefill(long_request((0, 1, 2), namespace="other")))
    other = engine.prefill(long_request((0, 2, 1), namespace="other"))
    assert other.mode == "prefix" and other.shadow is not None and engine.guard.earned("other") is None
    store.close()
