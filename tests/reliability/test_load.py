"""32 concurrent clients: budgets never exceeded, RSS bounded, no errors, anchor pool within bounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from blending.model import LoadedModel
from tests.reliability.conftest import assert_clean
from workloads.reliability.load import run_load


@pytest.mark.slow
def test_32_clients_within_budgets(smollm2: LoadedModel, tmp_path: Path, redis_url: str) -> None:
    tally = run_load(smollm2, tmp_path, seconds=15, clients=32, redis_url=redis_url)
    assert_clean(tally, min_requests=60)
    notes = tally.notes
    assert notes["samples"] >= 100
    assert all(notes["peak_mib"][t] <= notes["budget_mib"][t] for t in notes["budget_mib"])
    assert notes["chat"] > 0 and notes["upload"] > 0 and notes["download"] > 0 and notes["prefetch"] > 0
