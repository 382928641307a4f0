"""Re-rotation never depends on earlier requests (dynamic RoPE rescales its frequencies past the trained
length; a later blend must not re-rotate cached keys with those stale frequencies)."""

from __future__ import annotations

import torch

from blending.adapter import ModelAdapter
from blending.cacheblend import BlendConfig, blend
from blending.fused import Reuse, SegmentInput
from blending.precompute import chunk_kv, prefix_kv
from tests.blending.conftest import tiny_model


def _segments(adapter: ModelAdapter) -> list[SegmentInput]:
    torch.manual_seed(3)
    prefix, a, b, query = (torch.randint(0, 256, (n,)) for n in (6, 20, 15, 5))
    pre = prefix_kv(adapter, "fp", prefix)
    segs = [
        SegmentInput(prefix, Reuse.EXACT, pre),
        SegmentInput(b, Reuse.CACHED, chunk_kv(adapter, "fp", b)),
        SegmentInput(a, Reuse.CACHED, chunk_kv(adapter, "fp", a)),
        SegmentInput(query),
    ]
    return segs


def _blend(adapter: ModelAdapter, segs: list[SegmentInput]) -> torch.Tensor:
    return blend(adapter, segs, BlendConfig(recompute_ratio=0.0, check_layers=())).kv


def test_long_dense_prefill_does_not_change_a_later_blend() -> None:
    model = tiny_model("llama", rope={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=64)
    adapter = ModelAdapter(model)
    segs = _segments(adapter)
    alone = _blend(adapter, segs)
    adapter.prefill(torch.randint(0, 256, (200,)))  # past the trained length: the rotary module rescales
    after = _blend(adapter, segs)
    torch.testing.assert_close(after, alone, atol=0, rtol=0)
