"""The kvfuse command line: help everywhere, warm and stats against the running test service."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from server.cli import app, human_bytes, read_documents, render_stats
from tests.server.conftest import Service

runner = CliRunner()


@pytest.mark.parametrize("command", [[], ["serve"], ["calibrate"], ["warm"], ["stats"]])
def test_help(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_serve_reports_bad_settings(tmp_path: Path) -> None:
    assert runner.invoke(app, ["serve", "--config", str(tmp_path / "missing.yaml")]).exit_code == 2
    result = runner.invoke(app, ["serve", "--model", str(tmp_path), "--data-dir", str(tmp_path)])
    assert result.exit_code == 1 and "config.json" in result.output


def _one_line_error(args: list[str], code: int, *needles: str) -> None:
    result = runner.invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output and "Error:" not in lines[0], result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    ("yaml_text", "needles"),
    [
        ("port: [8000\nhost: x\n", ("invalid YAML", "line")),  # a syntax error
        ("port: 8000\ncolour: red\n", ("colour", "unknown setting")),
        ("limits:\n  max_documentz: 3\n", ("limits.max_documentz", "unknown setting")),
        ("- port\n- host\n", ("mapping",)),
        ("port: many\n", ("port",)),
        ("redis_url: http://127.0.0.1:6379\n", ("redis_url", "redis://")),
        ("request_deadline_s: 0\n", ("request_deadline_s",)),
    ],
)
def test_bad_settings_files_get_one_clear_line(tmp_path: Path, yaml_text: str, needles: tuple[str, ...]) -> None:
    config = tmp_path / "kvfuse.yaml"
    config.write_text(yaml_text)
    _one_line_error(["serve", "--config", str(config)], 2, "bad settings", *needles)
    _one_line_error(["stats", "--config", str(config)], 2, "bad settings")


def test_unreachable_redis_at_start_is_one_clear_line(tmp_path: Path) -> None:
    args = ["serve", "--data-dir", str(tmp_path), "--redis-url", "redis://127.0.0.1:1"]
    _one_line_error(args, 1, "Redis", "redis://127.0.0.1:1")
    _one_line_error([*args, "--redis-cluster"], 1, "Redis", "redis://127.0.0.1:1")


def test_read_documents(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("first block\nstill first\n\nsecond block\n\n\n")
    assert read_documents([f], split=False) == [(str(f), "first block\nstill first\n\nsecond block")]
    assert [t for _, t in read_documents([f], split=True)] == ["first block\nstill first", "second block"]


def test_warm_and_stats_against_a_service(service: Service, alice: httpx.Client, tmp_path: Path) -> None:
    f = tmp_path / "docs.txt"
    f.write_text("CLI warm document one about trains crossing the long bridge.\n\n"
                 "CLI warm document two about ships entering the old harbour.\n")  # fmt: skip
    args = ["warm", str(f), "--split", "--url", service.url, "--api-key", "sk-alice", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2 and all(r["tokens"] > 8 for r in rows)
    for row in rows:
        assert alice.head(f"/v1/chunks/{row['key']}").status_code == 200
    result = runner.invoke(app, ["stats", "--url", service.url, "--api-key", "sk-alice"])
    assert result.exit_code == 0 and "reuse totals" in result.output
    result = runner.invoke(app, ["stats", "--url", service.url, "--api-key", "sk-wrong"])
    assert result.exit_code == 1 and "401" in result.output


def test_warm_in_process_persists_to_the_data_dir(tmp_path: Path) -> None:
    f = tmp_path / "doc.txt"
    f.write_text("An in-process warm document about a small bakery that opens before sunrise every day.")
    env = {"KVFUSE_DATA_DIR": str(tmp_path / "data")}
    result = runner.invoke(app, ["warm", str(f), "--json"], env=env)
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(row["key"]) == 32 and row["tokens"] > 8
    assert any((tmp_path / "data" / "kv").rglob("*")) and (tmp_path / "data" / "secret").is_file()


def test_calibrate_persists_the_curve_for_later_instances(tmp_path: Path) -> None:
    env = {"KVFUSE_DATA_DIR": str(tmp_path / "data")}
    args = ["calibrate", "--prompts", "1", "--docs", "2", "--ratios", "0.15,1", "--json"]
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    (curve,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert curve["samples"] == 1 and curve["curve"]["1"] == 1.0
    from server.config import Settings
    from server.runtime import build_engine

    engine = build_engine(Settings(data_dir=tmp_path / "data", auto_calibrate=False))  # a later instance
    try:
        cal = engine.calibration()
        assert cal is not None and cal.as_dict()["curve"] == curve["curve"]
    finally:
        engine.store.close()
    assert runner.invoke(app, ["calibrate", "--ratios", "a,b"], env=env).exit_code == 2


def test_stats_tables_use_human_sizes_and_fold_to_the_terminal() -> None:
    from rich.console import Console

    assert human_bytes(512) == "512 B" and human_bytes(1536) == "1.5 KiB"
    assert human_bytes(1610612736) == "1.5 GiB"
    tier = {"name": "redis-cluster-tier", "available": True, "used_bytes": 1610612736,
            "budget_bytes": 4 << 30, "hits": 123456789, "misses": 7, "evictions": 0, "errors": 0}  # fmt: skip
    data = {"model": "smollm2", "scope": "service", "store": {"tiers": [tier]},
            "reuse": {"requests_with_a_very_long_metric_name": 3, "reused_share": 0.5}}  # fmt: skip
    wide = Console(width=120, record=True, color_system=None)
    render_stats(data, wide)
    text = wide.export_text()
    assert "1.5 GiB" in text and "4.0 GiB" in text and "1610612736" not in text
    narrow = Console(width=50, record=True, color_system=None)
    render_stats(data, narrow)
    text = narrow.export_text()
    assert all(len(line) <= 50 for line in text.splitlines())
    assert "…" not in text  # folded, never truncated
