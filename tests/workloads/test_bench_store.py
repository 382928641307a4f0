"""Smoke test of the store benchmark: it runs end to end and reports the documented JSON shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workloads import bench_store


def test_quick_run_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    tiers = "cpu,ssd,redis" if bench_store.redis_server_binary() else "cpu,ssd"
    assert (
        bench_store.main(["--quick", "--tiers", tiers, "--ssd-dir", str(tmp_path), "--json", str(out)]) == 0
    )
    report = json.loads(out.read_text())
    assert set(report) == {"meta", "lmcache_reference", "results"}
    assert report["meta"]["iterations"] == 3
    assert {"cpu", "ssd", "redis"} <= set(report["lmcache_reference"])
    results = report["results"]
    assert len(results) == len(bench_store.QUICK_SIZES) * len(tiers.split(","))
    for r in results:
        assert r["tier"] in tiers.split(",") and r["size"] in bench_store.QUICK_SIZES and r["bytes"] > 0
        for side in (r["put"], r["get"], r["raw"]["put"], r["raw"]["get"]):
            assert set(side) == {"gbps", "p50_ms", "p99_ms"} and side["gbps"] > 0
        assert r["ratio_put"] > 0 and r["ratio_get"] > 0 and isinstance(r["floor_ok"], bool)
        assert r["lmcache"] is None  # quick sizes match no reference size
    assert "kvfuse store tiers" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name != "bench.json"]  # the bench cleans up after itself


def test_reference_sizes_match() -> None:
    assert bench_store._lmcache_size(bench_store.SIZES["smollm2-135m-bf16"].nbytes + 320) == "5.9MB"
    assert bench_store._lmcache_size(bench_store.SIZES["llama3-8b-bf16"].nbytes + 320) == "33.6MB"
    assert bench_store._lmcache_size(bench_store.SIZES["smollm2-135m-fp32"].nbytes) is None
    with pytest.raises(ValueError):
        bench_store.run(["nope"], ["cpu"], 1)
