"""The full ``kvfuse`` command line: the service commands plus ``kvfuse bench``."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from workloads.cli import app

runner = CliRunner()


@pytest.mark.parametrize("command", [[], ["serve"], ["stats"], ["bench"]])
def test_help(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_bench_dispatches_to_the_workload() -> None:
    result = runner.invoke(app, ["bench", "server", "--help"])
    assert result.exit_code == 0 and "kvfuse bench server" in result.output  # argparse's own help
