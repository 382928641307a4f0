"""The auto policy's decisions (pure function: no model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blending.calibration import SYSTEM_NAMESPACE, Calibration, CalibrationStore, calibration_prompts
from blending.policy import Features, PolicyConfig, decide, estimated_saving
from kvstore import StoreConfig, TieredStore
from kvstore.chunk import KVChunk
from kvstore.keys import KeySpace

CAL = Calibration("fp", {0.15: 0.93, 0.3: 0.96, 0.5: 0.97, 1.0: 1.0}, samples=8,
                  agreement={0.15: 0.98, 0.3: 0.99, 0.5: 0.99, 1.0: 1.0}, answer_tokens=32)
CFG = PolicyConfig()


def feats(prompt: int = 1000, exact: int = 100, cached: int = 800, base: int = 0) -> Features:
    return Features(prompt, exact, cached, base, layers=30, check_layers=1)


def test_short_prompt_runs_exact_only() -> None:
    d = decide(feats(prompt=120, exact=20, cached=90), CFG, 0.95, CAL)
    assert d.mode == "prefix" and "short prompt" in d.reason
    assert decide(feats(prompt=120, exact=0, cached=90), CFG, 0.95, CAL).mode == "dense"


def test_little_reusable_text_runs_exact_only() -> None:
    d = decide(feats(cached=100), CFG, 0.95, CAL)
    assert d.mode == "prefix" and "little reusable text" in d.reason


def test_whole_prompt_cached_is_exact() -> None:
    assert decide(feats(exact=999, cached=0), CFG, 0.95, CAL).mode == "prefix"


def test_calibrated_budget_meets_the_target() -> None:
    d = decide(feats(), CFG, 0.95, CAL)
    assert (d.mode, d.ratio) == ("blend", 0.3) and "calibrated" in d.reason
    assert decide(feats(), CFG, 0.90, CAL).ratio == 0.15  # a lower target, a smaller budget


def test_uncalibrated_or_unreachable_target_runs_exact_only() -> None:
    assert "no calibration" in decide(feats(), CFG, 0.95, None).reason
    unreachable = Calibration("fp", {0.15: 0.8, 0.3: 0.85}, samples=4)
    d = decide(feats(), CFG, 0.95, unreachable)
    assert d.mode == "prefix" and "no calibrated budget" in d.reason


def test_guard_escalation_raises_the_budget_then_runs_exact() -> None:
    assert decide(feats(), CFG, 0.95, CAL, escalation=1).ratio == 0.5
    d = decide(feats(), CFG, 0.95, CAL, escalation=2)  # 1.0 > max_ratio: no saving left
    assert d.mode == "prefix" and d.ratio is None
    assert decide(feats(), CFG, 0.95, CAL, escalation=9).mode == "prefix"


def test_shared_messages_with_bases_go_hybrid() -> None:
    d = decide(feats(cached=0, base=700), CFG, 0.95, CAL)
    assert d.mode == "hybrid" and d.ratio == 0.3


def test_small_saving_runs_exact_only() -> None:
    assert estimated_saving(feats(), 800, 1.0) == pytest.approx(0.0, abs=1e-9)
    strict = PolicyConfig(min_saving=0.7)
    assert decide(feats(), strict, 0.95, CAL).mode == "prefix"


def test_calibration_persists_under_the_fingerprint(tmp_path: Path) -> None:
    store = TieredStore.from_config(StoreConfig(cpu_bytes=1 << 20, ssd_dir=str(tmp_path)))
    CalibrationStore(store, "fp", "l30").save(CAL)
    store.close()
    reopened = TieredStore.from_config(StoreConfig(cpu_bytes=1 << 20, ssd_dir=str(tmp_path)))
    loaded = CalibrationStore(reopened, "fp", "l30").load()
    assert loaded is not None and loaded.samples == 8
    assert loaded.curve == pytest.approx(CAL.curve)
    assert loaded.agreement == pytest.approx(CAL.agreement) and loaded.answer_tokens == CAL.answer_tokens
    assert CalibrationStore(reopened, "other-model", "l30").load() is None
    with pytest.raises(ValueError):
        CalibrationStore(reopened, "other-model", "l30").save(CAL)
    reopened.close()


def test_calibration_prompts_ask_about_their_documents() -> None:
    for docs, question, _ in calibration_prompts(5, docs=6, seed=1):
        town = question.split("documents, ")[1].split()[0]
        assert len(docs) == 6 and any(d.startswith(town) for d in docs)


def test_a_curve_of_an_older_kvfuse_is_never_read_as_kept_answers(tmp_path: Path) -> None:
    """Records of teacher-forced agreement (the first format) stay where they are but are not used: ``auto``
    must not take 0.99 agreement for 99% of answers kept."""
    store = TieredStore.from_config(StoreConfig(cpu_bytes=1 << 20))
    old_key = KeySpace("fp", "l30:calibration", SYSTEM_NAMESPACE).chunk_key([0])
    kv = torch.tensor([[0.3, 1.0, -1.0], [0.99, 1.0, 8.0]], dtype=torch.float32).reshape(1, 2, 1, 3, 1)
    store.put(old_key, KVChunk(kv, torch.arange(3), "fp"))
    assert CalibrationStore(store, "fp", "l30").load() is None
    with pytest.raises(ValueError, match="older kvfuse"):
        Calibration.from_dict("fp", {"curve": {"0.3": 0.99}, "samples": 8})
    again = Calibration.from_dict("fp", CAL.as_dict())
    assert again == CAL
    store.close()


def test_auto_decides_by_kept_answers_not_agreement() -> None:
    """The measured case: 0.99 top-1 agreement at 0.30 while half of the answers changed."""
    cal = Calibration("fp", {0.15: 0.4, 0.3: 0.5, 0.5: 0.6, 1.0: 1.0}, 8,
                      agreement={0.15: 0.97, 0.3: 0.99, 0.5: 0.99, 1.0: 1.0}, answer_tokens=32)
    decision = decide(feats(), PolicyConfig(), 0.95, cal)
    assert decision.mode == "prefix" and decision.ratio is None
    assert "no calibrated budget keeps 95% of answers" in decision.reason  # 1.0 alone is not reuse
    assert "0.50 kept 60%" in decision.reason
    assert decide(feats(), PolicyConfig(), 0.5, cal).ratio == 0.3  # a tenant that accepts changed answers


def test_a_rounding_miss_at_full_recompute_does_not_disqualify_smaller_budgets() -> None:
    cal = Calibration("fp", {0.3: 1.0, 0.5: 1.0, 1.0: 0.875}, samples=8)
    assert cal.ladder(0.95) == [0.3, 0.5]


def test_ladder_ignores_a_lucky_small_budget() -> None:
    noisy = Calibration("fp", {0.1: 0.96, 0.2: 0.93, 0.4: 0.95, 1.0: 1.0}, samples=8)
    assert noisy.ladder(0.95) == [0.4, 1.0]


NO_BUDGET = Calibration("fp", {0.15: 0.4, 0.3: 0.5, 0.5: 0.6, 1.0: 1.0}, samples=8)


def test_exact_only_for_want_of_evidence_names_a_shadow_budget() -> None:
    decision = decide(feats(), CFG, 0.95, NO_BUDGET)
    assert decision.mode == "prefix" and decision.shadow == CFG.shadow_ratio
    assert decide(feats(), CFG, 0.95, None).shadow == CFG.shadow_ratio  # not calibrated yet
    assert decide(feats(prompt=100, exact=10, cached=80), CFG, 0.95, NO_BUDGET).shadow is None  # short prompt
    assert decide(feats(), CFG, 0.95, CAL).shadow is None  # the curve already names a budget
    assert decide(feats(), PolicyConfig(shadow_ratio=0.0), 0.95, NO_BUDGET).shadow is None


def test_a_tenant_blends_at_the_budget_its_own_answers_earned() -> None:
    decision = decide(feats(), CFG, 0.95, NO_BUDGET, earned=0.3)
    assert (decision.mode, decision.ratio) == ("blend", 0.3) and "sampled answers were kept" in decision.reason
    assert decision.shadow is None
    assert decide(feats(), CFG, 0.99, NO_BUDGET, earned=0.3).mode == "prefix"  # stricter than it was earned at
    assert decide(feats(cached=0, base=800), CFG, 0.95, NO_BUDGET, earned=0.3).mode == "prefix"  # not for hybrid
    with pytest.raises(ValueError, match="shadow_ratio"):
        PolicyConfig(shadow_ratio=0.9)
