"""Smoke test of ``kvfuse bench agents --quick`` through the typer app: every method is reported (not
timings), in a table that fits 80 columns, without FutureWarnings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from workloads.cli import app


@pytest.mark.slow
@pytest.mark.filterwarnings("error::FutureWarning")
def test_bench_agents_quick(tmp_path: Path) -> None:
    out, plot = tmp_path / "agents.json", tmp_path / "agents.png"
    result = CliRunner().invoke(app, ["bench", "agents", "--quick", "--json", str(out), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report["calibration"]["curve"]) == {"0.15", "1"}
    (result_row,) = report["runs"]
    methods = result_row["methods"]
    assert set(methods) == {"dense", "auto", "learned", "anchor", "hybrid", "base", "blend", "naive"}
    assert 0.0 <= methods["auto"]["cached_share"] <= 1.0
    assert methods["dense"]["agreement"] == 1.0 and methods["dense"]["reuse_rate"] == 0.0
    assert all(0.0 <= m["agreement"] <= 1.0 and 0.0 <= m["reuse_rate"] <= 1.0 for m in methods.values())
    assert result_row["anchor_pools"]["anchor"]["anchors"] > 0
    # The second agent reuses the question and fact sheet its predecessor computed (the first cannot).
    assert methods["anchor"]["reuse_rate"] == 0.5
    # accuracy means something at --quick: final answers long enough to reach the fact (was 0 for every method)
    assert methods["dense"]["finals"] == 3 and methods["dense"]["correct"] >= 1
    assert plot.stat().st_size > 1000
    table = result.stdout
    assert "multi-agent reuse" in table and "hybrid" in table and "…" not in table
    assert max(map(len, table.splitlines())) <= 80
