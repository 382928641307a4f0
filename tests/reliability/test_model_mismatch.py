"""KV of another model (fingerprint), dtype or layout is refused, by the chunk API and by the engine."""

from __future__ import annotations

from pathlib import Path

from blending.model import LoadedModel
from tests.reliability.conftest import assert_clean
from workloads.reliability.mismatch import run_mismatch


def test_foreign_kv_is_refused(smollm2: LoadedModel, tmp_path: Path) -> None:
    assert_clean(run_mismatch(smollm2, tmp_path), min_requests=10, min_faults=6)
