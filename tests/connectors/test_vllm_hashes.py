"""kvfuse's vLLM block hash against vectors recorded from vLLM 0.33.0's own hash_block_tokens.

The vectors come from scripts/gen_engine_hash_vectors.py run in the engines venv; this test needs no vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from connectors.engine_hashes import vllm_block_hashes, vllm_none_hash

DATA = json.loads((Path(__file__).parent / "data" / "vllm_block_hashes.json").read_text())


def test_vectors_come_from_vllm() -> None:
    assert DATA["vllm_version"] == "0.33.0"
    assert {v["algo"] for v in DATA["vectors"]} == {"sha256", "xxhash"}


@pytest.mark.parametrize(
    "vec", DATA["vectors"], ids=lambda v: f"{v['algo']}-{v['pythonhashseed']}-{v['name']}-{v['cache_salt']}"
)
def test_block_hashes_match_vllm(vec: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    seed = vec["pythonhashseed"]
    assert vllm_none_hash(vec["algo"], seed).hex() == vec["none_hash"]
    got = vllm_block_hashes(
        vec["tokens"], vec["page"], algo=vec["algo"], none_hash_seed=seed, cache_salt=vec["cache_salt"]
    )
    assert [h.hex() for h in got] == vec["hashes"]


def test_xxhash_needs_an_explicit_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    with pytest.raises(ValueError, match="PYTHONHASHSEED"):
        vllm_none_hash("xxhash")
