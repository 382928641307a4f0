"""Flipped bytes and truncated blobs on SSD and in Redis: all detected and counted, never served, answers
identical to dense."""

from __future__ import annotations

from pathlib import Path

import pytest

from blending.model import LoadedModel
from tests.reliability.conftest import assert_clean
from workloads.reliability.corruption import run_corruption


@pytest.mark.slow
def test_corruption_on_ssd_and_redis(smollm2: LoadedModel, tmp_path: Path, redis_url: str) -> None:
    tally = run_corruption(smollm2, tmp_path, redis_url)
    assert_clean(tally, min_requests=20, min_faults=16)
    for how in ("flip", "truncate"):
        assert tally.notes[f"{how}_detected"] == tally.notes[f"{how}_damaged"] >= 8
