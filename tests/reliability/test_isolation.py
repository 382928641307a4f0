"""Tenants never share KV, cannot reach each other's chunks by key; keys and KV never appear in logs."""

from __future__ import annotations

from pathlib import Path

from blending.model import LoadedModel
from tests.reliability.conftest import assert_clean
from workloads.reliability.isolation import HEX_KEY, run_isolation


def test_tenant_isolation_and_log_hygiene(smollm2: LoadedModel, tmp_path: Path) -> None:
    tally = run_isolation(smollm2, tmp_path)
    assert_clean(tally, min_requests=15, min_faults=12)
    assert tally.notes["log_lines"] > 10


def test_key_pattern_catches_keys() -> None:
    assert HEX_KEY.search("GET /v1/chunks/5ad1adbef9b75b6c2da58394448ec5ab done")
    assert not HEX_KEY.search("blob 5ad1adbe… removed")
