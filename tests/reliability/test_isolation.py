"""Tenants never share KV or anchors, cannot reach each other's chunks by key; keys and KV never appear in logs."""

from __future__ import annotations

from pathlib import Path

from blending.model import LoadedModel
from tests.reliability.conftest import assert_clean
from workloads.reliability.isolation import HEX_KEY, run_isolation
from workloads.reliability.service import DOCS


def test_tenant_isolation_and_log_hygiene(smollm2: LoadedModel, tmp_path: Path) -> None:
    tally = run_isolation(smollm2, tmp_path)
    keys = len(DOCS)
    # Every attempt was made, answered and contained: 4 per key of alice's (get, head, put, delete).
    assert tally.notes["cross_tenant"] == {
        "keys": keys, "attempts": 4 * keys, "refused": 2 * keys, "writes_contained": keys, "deletes_contained": keys,
    }
    anchors = tally.notes["anchors"]
    assert anchors["alice_anchors"] > 0 and anchors["bob_unaffected"] == 1
    assert tally.notes["corrupt_refused"] == 1
    assert_clean(tally, min_requests=15, min_faults=4 * keys + 2)
    assert tally.faults == 4 * keys + 2
    assert tally.notes["log_lines"] > 10


def test_key_pattern_catches_keys() -> None:
    assert HEX_KEY.search("GET /v1/chunks/5ad1adbef9b75b6c2da58394448ec5ab done")
    assert not HEX_KEY.search("blob 5ad1adbe… removed")
