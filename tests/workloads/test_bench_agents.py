"""Smoke test of ``kvfuse bench agents --quick``: every method is reported (not timings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workloads import bench_agents


@pytest.mark.slow
def test_bench_agents_quick(tmp_path: Path) -> None:
    out, plot = tmp_path / "agents.json", tmp_path / "agents.png"
    assert bench_agents.main(["--quick", "--json", str(out), "--plot", str(plot)]) == 0
    report = json.loads(out.read_text())
    assert set(report["calibration"]["curve"]) == {"0.15", "1"}
    (result,) = report["runs"]
    methods = result["methods"]
    assert set(methods) == {"dense", "auto", "anchor", "hybrid", "base", "blend", "naive"}
    assert 0.0 <= methods["auto"]["cached_share"] <= 1.0
    assert methods["dense"]["agreement"] == 1.0 and methods["dense"]["reuse_rate"] == 0.0
    assert all(0.0 <= m["agreement"] <= 1.0 and 0.0 <= m["reuse_rate"] <= 1.0 for m in methods.values())
    assert result["anchor_pools"]["anchor"]["anchors"] > 0
    # The second agent reuses the question and fact sheet its predecessor computed (the first cannot).
    assert methods["anchor"]["reuse_rate"] == 0.5
    assert plot.stat().st_size > 1000
