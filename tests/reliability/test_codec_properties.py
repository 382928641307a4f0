"""Hypothesis properties of the codec (any mutation is rejected) and of key derivation."""

from __future__ import annotations

from kvstore import KeySpace
from tests.reliability.conftest import assert_clean
from workloads.reliability.properties import codec_properties, key_properties


def test_any_mutation_of_a_blob_is_rejected() -> None:
    tally = codec_properties(examples=600)
    assert_clean(tally, min_requests=1800, min_faults=600)
    assert set(tally.notes["mutations"]) >= {"flip", "flips", "overwrite", "truncate", "insert", "delete"}


def test_key_derivation_properties() -> None:
    assert_clean(key_properties(examples=400), min_requests=1000, min_faults=300)


def test_fields_that_contain_the_old_separator_do_not_collide() -> None:
    """Regression: fields were joined with 0x1f, so a namespace could mimic namespace + tokens."""
    a = KeySpace("fp", "lay", "alice\x1f\x01\x00\x00").chunk_key([5, 6])
    b = KeySpace("fp", "lay", "alice").chunk_key([0x1F000001, 5, 6])
    c = KeySpace("fp\x1flay", "x", "ns").chunk_key([1])
    d = KeySpace("fp", "lay\x1fx", "ns").chunk_key([1])
    assert a != b and c != d
