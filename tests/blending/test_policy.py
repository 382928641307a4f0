"""The auto policy's decisions (pure function: no model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from blending.calibration import Calibration, CalibrationStore, calibration_prompts
from blending.policy import Features, PolicyConfig, decide, estimated_saving
from kvstore import StoreConfig, TieredStore

CAL = Calibration("fp", {0.15: 0.93, 0.3: 0.96, 0.5: 0.97, 1.0: 1.0}, samples=8)
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
    assert CalibrationStore(reopened, "other-model", "l30").load() is None
    with pytest.raises(ValueError):
        CalibrationStore(reopened, "other-model", "l30").save(CAL)
    reopened.close()


def test_calibration_prompts_ask_about_their_documents() -> None:
    for docs, question, _ in calibration_prompts(5, docs=6, seed=1):
        town = question.split("documents, ")[1].split()[0]
        assert len(docs) == 6 and any(d.startswith(town) for d in docs)


def test_ladder_ignores_a_lucky_small_budget() -> None:
    noisy = Calibration("fp", {0.1: 0.96, 0.2: 0.93, 0.4: 0.95, 1.0: 1.0}, samples=8)
    assert noisy.ladder(0.95) == [0.4, 1.0]
