"""kvfuse's SGLang page hash against vectors recorded from SGLang 0.5.23's own get_native_hash.

The vectors come from scripts/gen_engine_hash_vectors.py run in the engines venv (SGLang's C++ hash
extension, built from its wheel); this test needs no SGLang.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from connectors.engine_hashes import sglang_namespace_seed, sglang_page_hashes

DATA = json.loads((Path(__file__).parent / "data" / "sglang_page_hashes.json").read_text())


def test_vectors_come_from_sglang() -> None:
    assert DATA["sglang_version"] == "0.5.23"
    assert len(DATA["vectors"]) > 30


@pytest.mark.parametrize(
    "vec", DATA["vectors"], ids=lambda v: f"{v['name']}-{v.get('extra_key')}-{v.get('cache_salt')}"
)
def test_page_hashes_match_sglang(vec: dict) -> None:
    if "prior_hash" in vec:
        got = sglang_page_hashes(vec["tokens"], vec["page"], vec["prior_hash"])
    else:
        assert sglang_namespace_seed(vec["extra_key"], vec["cache_salt"]) == vec["seed"]
        got = sglang_page_hashes(vec["tokens"], vec["page"], extra_key=vec["extra_key"], cache_salt=vec["cache_salt"])
    assert got == vec["hashes"]


def test_chain_depends_on_every_earlier_page() -> None:
    a = sglang_page_hashes([1, 2, 3, 4, 5, 6], 2)
    b = sglang_page_hashes([9, 2, 3, 4, 5, 6], 2)
    assert all(x != y for x, y in zip(a, b, strict=True))
    assert sglang_page_hashes([3, 4, 5, 6], 2, a[0]) == a[1:]
