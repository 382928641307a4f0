"""Smoke test of ``kvfuse bench rag --quick``: it runs end to end and reports every method (not timings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workloads import bench_rag


@pytest.mark.slow
def test_bench_rag_quick(tmp_path: Path) -> None:
    out = tmp_path / "rag.json"
    plot = tmp_path / "rag.png"
    assert bench_rag.main(["--quick", "--json", str(out), "--plot", str(plot)]) == 0
    report = json.loads(out.read_text())
    quality = report["quality"]
    assert {"dense", "naive", "blend 0.15", "blend 1.00", "auto"} <= set(quality)
    assert quality["dense"]["agreement"] == 1.0 and quality["dense"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert quality["dense"]["reused_share"] == 0.0  # the baseline never hits a cache
    assert quality["blend 1.00"]["agreement"] == 1.0  # recompute everything = dense
    assert quality["blend 0.15"]["recomputed_tokens"] < quality["blend 1.00"]["recomputed_tokens"]
    assert quality["naive"]["recomputed_tokens"] == 0
    assert set(report["calibration"]["curve"]) == {"0.15", "1"}
    assert report["modes"]["auto"]  # the mode auto chose is reported
    assert plot.stat().st_size > 1000
