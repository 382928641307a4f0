"""The store benchmark: it runs end to end, reports the documented JSON shape, and shows only measured peers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from workloads import bench_store, bench_store_lmcache


def _quick(tmp_path: Path, *extra: str) -> dict[str, Any]:
    out = tmp_path / "bench.json"
    tiers = "cpu,ssd,redis" if bench_store.redis_server_binary() else "cpu,ssd"
    argv = ["--quick", "--tiers", tiers, "--ssd-dir", str(tmp_path), "--json", str(out), *extra]
    assert bench_store.main(argv) == 0
    report: dict[str, Any] = json.loads(out.read_text())
    assert len(report["results"]) == len(bench_store.QUICK_SIZES) * len(tiers.split(","))
    return report


def test_quick_run_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = _quick(tmp_path)
    assert set(report) == {"meta", "results"}  # no constant reference numbers anywhere
    assert report["meta"]["iterations"] == 3 and report["meta"]["peer"] is None
    for r in report["results"]:
        assert r["size"] in bench_store.QUICK_SIZES and r["bytes"] > 0
        for side in (r["put"], r["get"], r["raw"]["put"], r["raw"]["get"]):
            assert set(side) == {"gbps", "p50_ms", "p99_ms"} and side["gbps"] > 0
        assert r["ratio_vs_raw"]["put"] > 0 and r["ratio_vs_raw"]["get"] > 0 and isinstance(r["floor_ok"], bool)
        assert r["lmcache"] is None and r["ratio_vs_lmcache"] is None
        assert r["zero_copy_get"] == (r["tier"] == "cpu")
        if r["tier"] == "cpu":
            assert r["prefetch"] is None
        else:  # prefetched from SSD / Redis into a CPU tier, then a CPU-tier get
            assert r["prefetch"]["prefetch"]["gbps"] > 0 and r["prefetch"]["cpu_get"]["gbps"] > 0
    out = capsys.readouterr().out
    assert "kvfuse store tiers" in out and "LMCache put" not in out
    assert not [p for p in tmp_path.iterdir() if p.name != "bench.json"]  # the bench cleans up after itself


@pytest.mark.skipif(bench_store_lmcache.available(), reason="LMCache is installed here")
def test_peer_without_lmcache_has_no_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = _quick(tmp_path, "--peer", "lmcache")
    assert report["meta"]["peer"] is None
    assert any("LMCache is not importable" in n for n in report["meta"]["notes"])
    assert all(r["lmcache"] is None and r["ratio_vs_lmcache"] is None for r in report["results"])
    assert "LMCache put" not in capsys.readouterr().out


@pytest.mark.skipif(not bench_store_lmcache.available(), reason="needs LMCache (scripts/test-lmcache.sh)")
def test_peer_lmcache_measured_in_the_same_run(tmp_path: Path) -> None:
    report = _quick(tmp_path, "--peer", "lmcache", "--fsync", "never")
    assert report["meta"]["peer"].startswith("lmcache ")
    for r in report["results"]:
        assert r["lmcache"]["backend"] in ("LocalCPUBackend", "LocalDiskBackend", "RemoteBackend")
        assert r["lmcache"]["put"]["gbps"] > 0 and r["lmcache"]["get"]["gbps"] > 0
        assert r["ratio_vs_lmcache"]["put"] == pytest.approx(r["put"]["gbps"] / r["lmcache"]["put"]["gbps"])


def test_lmcache_config_matches_its_interface() -> None:
    """The configs the peer builds, checked field by field (runs without LMCache)."""
    shape = bench_store.BlobShape(32, 8, 256, 128, torch.bfloat16)
    assert bench_store_lmcache.lmcache_shape(shape) == torch.Size([2, 32, 256, 1024])
    assert bench_store_lmcache.lmcache_shape(shape).numel() * 2 == bench_store.SIZES["llama3-8b-bf16"].nbytes
    assert bench_store_lmcache.BACKENDS["redis"][0] == "resp"
    if not bench_store_lmcache.available():
        return
    kw: dict[str, Any] = {"nbytes": 1 << 20, "count": 4, "ssd_dir": "/tmp/x", "redis_url": "redis://127.0.0.1:7000"}
    disk = bench_store_lmcache.config_for("ssd", "LocalDiskBackend", **kw)
    assert disk.local_cpu is False and disk.local_disk.rstrip("/") == "/tmp/x"
    resp = bench_store_lmcache.config_for("redis", "resp", **kw)
    assert resp.remote_url == "resp://127.0.0.1:7000" and resp.save_unfull_chunk is False


def test_unknown_names_refused() -> None:
    with pytest.raises(ValueError):
        bench_store.run(["nope"], ["cpu"], 1)
    with pytest.raises(ValueError):
        bench_store.run(["tiny-fp32"], ["cpu"], 1, peer="other")


def test_sides_take_turns_at_going_first() -> None:
    """No side always runs right after the same other one (its cache traffic would favour or cost it)."""
    order: list[str] = []
    ops = [(name, order.append, (name,)) for name in ("tier", "raw", "peer")]
    times: dict[str, list[float]] = {name: [] for name in ("tier", "raw", "peer")}
    for i in range(3):
        bench_store._rotated(ops, i, times)
    assert order == ["tier", "raw", "peer", "raw", "peer", "tier", "peer", "tier", "raw"]
    assert all(len(t) == 3 for t in times.values())
    bench_store._rotated(ops, 0, None)  # warm-up: run, not recorded
    assert all(len(t) == 3 for t in times.values())


def test_repeat_reports_medians_of_the_rounds(tmp_path: Path) -> None:
    from rich.console import Console

    report = bench_store.run(["tiny-fp32"], ["cpu", "ssd"], 2, warmup=0, ssd_dir=str(tmp_path), repeat=3)
    assert report["meta"]["repeat"] == 3 and len(report["results"]) == 2
    for r in report["results"]:
        rounds = r["rounds"]
        assert len(rounds) == 3 and isinstance(r["size"], str) and r["bytes"] == int(r["bytes"])
        for op in ("put", "get"):
            assert r["ratio_vs_raw"][op] == pytest.approx(sorted(x["ratio_vs_raw"][op] for x in rounds)[1])
        assert r["floor_ok"] == (min(r["ratio_vs_raw"].values()) >= bench_store.FLOOR)
    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    bench_store.render(report, console)
    text = console.export_text()
    assert "medians of 3 rounds" in text and max(map(len, text.splitlines())) <= 80
    with pytest.raises(ValueError):
        bench_store.run(["tiny-fp32"], ["cpu"], 1, repeat=0)


def test_repeat_is_a_command_line_option(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from workloads.cli import app

    out = tmp_path / "store.json"
    result = CliRunner().invoke(app, ["bench", "store", "--quick", "--tiers", "cpu", "--repeat", "2",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["meta"]["repeat"] == 2
