"""Tier faults: Redis killed mid-load and restarted, SSD read-only or full, kill -9 during SSD writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from blending.model import LoadedModel
from kvstore.redis_local import LocalRedis
from tests.reliability.conftest import assert_clean
from workloads.reliability.faults import run_redis_outage, run_ssd_faults
from workloads.reliability.ssd_crash import run_ssd_crash


@pytest.mark.slow
def test_redis_killed_mid_load_and_restarted(smollm2: LoadedModel, tmp_path: Path, redis_server: LocalRedis,
                                             redis_url: str) -> None:  # fmt: skip
    tally = run_redis_outage(smollm2, tmp_path, redis_server, seconds=9)
    assert_clean(tally, min_requests=40, min_faults=1)
    assert tally.notes["chat"] > 0 and tally.notes["upload"] > 0 and tally.notes["download"] > 0


@pytest.mark.slow
def test_ssd_read_only_and_full(smollm2: LoadedModel, tmp_path: Path) -> None:
    """Read-only: a read-only bind mount, else ``chattr +i``, else ``chmod 0555`` when not root (root
    ignores permission bits). Full: a small tmpfs (real ENOSPC), else RLIMIT_FSIZE (EFBIG). Skipped when
    none of these can be used here (e.g. root in a container without CAP_SYS_ADMIN nor chattr)."""
    tally = run_ssd_faults(smollm2, tmp_path)
    if not tally.notes["mechanisms"].get("read-only"):
        pytest.skip(f"no way to make a directory read-only for this user here: {tally.notes}")
    assert_clean(tally, min_requests=20, min_faults=2)


def test_kill_9_during_ssd_writes(tmp_path: Path) -> None:
    tally = run_ssd_crash(tmp_path, kills=3)
    assert_clean(tally, min_requests=3, min_faults=3)
    assert tally.notes["acknowledged"] >= 9
