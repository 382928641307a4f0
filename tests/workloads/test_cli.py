"""The full ``kvfuse`` command line: the service commands plus ``kvfuse bench``, whose commands are typer
commands with help on every option, shared by ``python -m workloads.bench_X``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from workloads import bench_store
from workloads.cli import Steps, app, bench_table, run_bench

runner = CliRunner()
BENCHES = ("store", "rag", "agents", "server", "reliability")


@pytest.mark.parametrize("command", [[], ["serve"], ["stats"], ["bench"]])
def test_help(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def _options(name: str) -> list[Any]:
    """The click options of ``kvfuse bench <name>`` (typer's own click or its vendored copy)."""
    bench = typer.main.get_command(app).commands["bench"]  # type: ignore[attr-defined]
    return [p for p in bench.commands[name].params if p.param_type_name == "option" and p.name != "help"]


def _flat(text: str) -> str:
    """Help text with the panel borders and line breaks of rich's layout removed."""
    return re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", text))


@pytest.mark.parametrize("name", BENCHES)
def test_bench_help_explains_every_option(name: str) -> None:
    options = _options(name)
    assert len(options) >= 5
    result = runner.invoke(app, ["bench", name, "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    flat = _flat(result.output)
    assert "Usage:" in flat and f"bench {name} [OPTIONS]" in flat
    for option in options:
        assert option.help and len(option.help) > 10, f"{name} {option.opts[0]} has no help"
        assert option.opts[0] in flat, f"{option.opts[0]} missing from `kvfuse bench {name} --help`"
        first_words = " ".join(option.help.split()[:3])
        assert first_words in flat, f"the help of {option.opts[0]} is not shown"


def test_documented_flags_are_kept() -> None:
    """The flags README.md and docs/*.md use (and the old argparse parsers had)."""
    kept = {
        "store": {"--sizes", "--tiers", "--iterations", "--warmup", "--redis-url", "--ssd-dir", "--fsync",
                  "--ssd-cache", "--peer", "--json", "--quick"},
        "rag": {"--examples", "--docs", "--doc-tokens", "--answer-tokens", "--fidelity-target",
                "--calibration-prompts", "--long-tokens", "--seed", "--json", "--plot", "--calibration-from", "--only",
                "--repeats", "--quick"},
        "agents": {"--agents", "--topology", "--tasks", "--warmup", "--prefix-tokens", "--fact-tokens",
                   "--answer-tokens", "--seed", "--sheets", "--calibration-prompts", "--calibration-from", "--json",
                   "--plot", "--quick"},
        "server": {"--clients", "--requests", "--docs", "--doc-words", "--blob-mb", "--blob-iters", "--threads",
                   "--long-tokens", "--chunk-tokens", "--json", "--quick"},
        "reliability": {"--quick", "--json", "--only", "--redis-url", "--threads", "--seed"},
    }
    for name, flags in kept.items():
        have = {opt for option in _options(name) for opt in option.opts}
        assert flags <= have, f"{name} lost {sorted(flags - have)}"


def test_bad_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_bench("store", ["--fsync", "sometimes"]) == 2
    assert run_bench("reliability", ["--only", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_python_m_runs_the_same_command() -> None:
    done = subprocess.run([sys.executable, "-m", "workloads.bench_store", "--help"], capture_output=True,
                          text=True, timeout=120, env={"COLUMNS": "100", "PATH": "/usr/bin:/bin"}, cwd=Path.cwd())
    assert done.returncode == 0, done.stderr
    assert "python -m workloads.bench_store" in done.stdout and "--ssd-cache" in done.stdout


def test_store_quick_through_the_app(tmp_path: Path) -> None:
    out = tmp_path / "store.json"
    args = ["bench", "store", "--quick", "--tiers", "cpu,ssd", "--ssd-dir", str(tmp_path), "--json", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [(r["size"], r["tier"]) for r in report["results"]] == [
        (size, tier) for size in bench_store.QUICK_SIZES for tier in ("cpu", "ssd")]
    assert "kvfuse store tiers" in result.output
    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    bench_store.render(report, console)
    text = console.export_text()
    assert "…" not in text and max(map(len, text.splitlines())) <= 80
    assert "small-bf16" in text and "prefetch" in text


def test_reliability_quick_through_the_app() -> None:
    result = runner.invoke(app, ["bench", "reliability", "--quick", "--only", "codec,keys", "--json"])
    assert result.exit_code == 0, result.output
    tallies = json.loads(result.stdout)
    assert [t["suite"] for t in tallies] == ["codec properties", "key properties"]
    assert all(t["requests"] > 0 for t in tallies)
    table = runner.invoke(app, ["bench", "reliability", "--quick", "--only", "codec"])
    assert table.exit_code == 0 and "codec properties" in table.stdout and "pass" in table.stdout


def test_bench_table_never_cuts_labels() -> None:
    long = "blend 0.15 after-prefix + first 4"
    table = bench_table("title", "method", ["prompt tokens", "TTFT / dense", "top-1 agree", "KL", "correct",
                                             "from cache", "approx"])
    table.add_row(long, "1234", "0.123", "0.990", "0.016", "3/10", "0.681", "1.000")
    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(table)
    text = console.export_text()
    assert long in text and "…" not in text and max(map(len, text.splitlines())) <= 80
    wrapped = bench_table("title", "suite", ["requests", "faults", "errors", "wrong", "lost", "s", "result"],
                          wrap_labels=True)
    wrapped.add_row("Redis killed + restarted under load, a longer name (skipped)", *["12345"] * 7)
    console.print(wrapped)
    text = console.export_text()
    assert "…" not in text and "restarted" in text and "(skipped)" in text
    assert max(map(len, text.splitlines())) <= 80


def test_steps_without_a_bar_log_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    steps = Steps()
    steps.begin(2, "x")
    steps.now("first")
    steps.done()
    steps.log("a line [not markup]")
    assert capsys.readouterr().err == "a line [not markup]\n"
