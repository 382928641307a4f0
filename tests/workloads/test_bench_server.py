"""Smoke test of the service benchmark: a --quick run (``python -m workloads.bench_server``, the typer command)
reports the documented JSON shape in tables that fit 80 columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workloads import bench_server


def test_quick_run_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert bench_server.main(["--quick", "--clients", "1,2", "--blob-iters", "3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"meta", "blob", "chat", "head_of_line"}
    assert report["meta"]["quick"] is True and report["meta"]["model"] == "smollm2-135m-instruct"
    blob = report["blob"]
    assert blob["bytes"] > 900_000 and isinstance(blob["target_ok"], bool) and blob["target_get_mb_s"] == 300
    for op in ("put", "get", "get_concurrent"):
        assert {"mb_s", "p50_ms", "p99_ms", "mean_ms", "n"} <= set(blob[op]) and blob[op]["mb_s"] > 0
    assert blob["get_concurrent"]["clients"] == 4
    assert [row["clients"] for row in report["chat"]] == [1, 2]
    for row in report["chat"]:
        assert row["requests"] >= 1 and row["ratio_p50"] > 0 and row["ratio_p99"] > 0
        for side in ("dense", "reuse"):
            stats = row[side]
            assert {"p50_ms", "p99_ms", "mean_ms", "server_ttft_p50_ms", "cached_tokens_mean"} <= set(stats)
            assert stats["p99_ms"] >= stats["p50_ms"] > 0
        assert row["dense"]["modes"] == ["dense"] and row["dense"]["cached_tokens_mean"] == 0
        assert row["reuse"]["cached_tokens_mean"] > 0
    hol = report["head_of_line"]
    assert hol["long_tokens"] >= 300 and hol["busy"]["n"] >= 1 and hol["idle"]["p50_ms"] > 0
    assert hol["ratio_p50"] > 0 and hol["ratio_max"] >= hol["ratio_p50"] and isinstance(hol["target_ok"], bool)
    assert hol["target_ratio"] == 10 and hol["chunk_tokens"] == 64
    printed = capsys.readouterr().out
    assert "MB blobs" in printed and "chat TTFT" in printed and "beside another tenant" in printed
    assert "beside the long request" in printed and "…" not in printed  # labels are never cut
    assert max(map(len, printed.splitlines())) <= 80
