"""Helpers for kvstore tests: deterministic chunks and key spaces."""

from __future__ import annotations

import pytest
import torch

from kvstore import ChunkKey, KeySpace, KVChunk

FP = "model-fp-test"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_chunk(
    tokens: int = 16,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    *,
    layers: int = 2,
    heads: int = 2,
    head_dim: int = 8,
    start: int = 0,
    fingerprint: str = FP,
) -> KVChunk:
    """A chunk with reproducible random KV, computed at positions ``start .. start + tokens``."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(layers, 2, heads, tokens, head_dim, generator=g).to(dtype)
    return KVChunk(kv, torch.arange(start, start + tokens), fingerprint)


def key(i: int, namespace: str = "default") -> ChunkKey:
    return KeySpace(FP, "test", namespace).chunk_key([i, i + 1, i + 2])


def assert_same(a: KVChunk | None, b: KVChunk) -> None:
    assert a is not None
    assert a.kv.dtype == b.kv.dtype and a.fingerprint == b.fingerprint
    assert torch.equal(a.kv.cpu(), b.kv.cpu())
    assert torch.equal(a.positions.cpu(), b.positions.cpu())


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return request.param
