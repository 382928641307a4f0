"""Selective recompute: ratio 1.0 is a dense prefill, ratio 0.0 is naive reuse, masks are exact."""

from __future__ import annotations

import pytest
import torch

from blending.adapter import ModelAdapter
from blending.cacheblend import BlendConfig, blend
from blending.fused import Reuse, SegmentInput
from blending.precompute import chunk_kv, prefix_kv
from tests.blending.conftest import tiny_model


def _segments(adapter: ModelAdapter, shared_prefix: bool) -> tuple[list[SegmentInput], torch.Tensor]:
    torch.manual_seed(1)
    prefix, a, b, query = (torch.randint(0, 256, (n,)) for n in (6, 20, 15, 5))
    pre = prefix_kv(adapter, "fp", prefix)
    base = pre if shared_prefix else None
    segs = [
        SegmentInput(prefix, Reuse.EXACT, pre),
        SegmentInput(b, Reuse.CACHED, chunk_kv(adapter, "fp", b, base)),  # order differs from cache
        SegmentInput(a, Reuse.CACHED, chunk_kv(adapter, "fp", a, base)),
        SegmentInput(query),
    ]
    return segs, torch.cat([prefix, b, a, query])


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("shared_prefix", [False, True])
def test_full_ratio_reproduces_dense(family: str, shared_prefix: bool) -> None:
    adapter = ModelAdapter(tiny_model(family))
    segs, ids = _segments(adapter, shared_prefix)
    dense_kv, dense_logits = adapter.prefill(ids)
    fused = blend(adapter, segs, BlendConfig(recompute_ratio=1.0))
    torch.testing.assert_close(fused.kv, dense_kv, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused.last_logits, dense_logits[-1], atol=1e-4, rtol=1e-4)
    s = fused.stats
    assert (s.exact_tokens, s.recomputed_tokens, s.reused_tokens, s.computed_tokens) == (6, 35, 0, 5)


def test_zero_ratio_is_naive_reuse() -> None:
    adapter = ModelAdapter(tiny_model("llama"))
    segs, ids = _segments(adapter, shared_prefix=False)
    fused = blend(adapter, segs, BlendConfig(recompute_ratio=0.0))
    assert fused.stats.recomputed_tokens == 0 and fused.stats.reused_tokens == 35
    # Past the check layer, cached tokens keep their (re-rotated) cached values.
    cached_v = segs[1].cached.kv[2, 1]  # type: ignore[union-attr]
    torch.testing.assert_close(fused.kv[2, 1, :, 6:21], cached_v)
    dense_kv, _ = adapter.prefill(ids)
    assert not torch.allclose(fused.kv[2, 1, :, 6:21], dense_kv[2, 1, :, 6:21], atol=1e-3)


def test_partial_ratio_selects_and_improves() -> None:
    adapter = ModelAdapter(tiny_model("llama"))
    segs, ids = _segments(adapter, shared_prefix=False)
    dense_kv, _ = adapter.prefill(ids)
    errors = []
    for ratio in (0.0, 0.3, 0.6, 1.0):
        fused = blend(adapter, segs, BlendConfig(recompute_ratio=ratio))
        assert fused.stats.recomputed_tokens == round(ratio * 35)
        errors.append(float((fused.kv[2:] - dense_kv[2:]).pow(2).mean()))
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[3] < 1e-8


def test_selected_queries_use_exact_causal_mask() -> None:
    """A recomputed token must not see keys after it (a bottom-right-aligned mask would let it)."""
    adapter = ModelAdapter(tiny_model("llama"))
    segs, _ = _segments(adapter, shared_prefix=False)
    fused = blend(adapter, segs, BlendConfig(recompute_ratio=1.0))
    # Changing the last (fresh) segment must leave the KV of every earlier token unchanged.
    other = [*segs[:-1], SegmentInput(torch.randint(0, 256, (5,)))]
    fused2 = blend(adapter, other, BlendConfig(recompute_ratio=1.0))
    torch.testing.assert_close(fused.kv[:, :, :, :41], fused2.kv[:, :, :, :41])


def test_sink_tokens_and_multi_layer_selection() -> None:
    adapter = ModelAdapter(tiny_model("llama"))
    segs, _ = _segments(adapter, shared_prefix=False)
    cfg = BlendConfig(recompute_ratio=0.2, sink_tokens=2, check_layers=(1, 2), first_ratio=0.5)
    fused = blend(adapter, segs, cfg)
    assert fused.selected is not None
    selected = set(fused.selected.tolist())
    assert {6, 7, 21, 22} <= selected  # the first two tokens of each cached segment
    assert fused.stats.recomputed_tokens == 7


def test_key_deviation_and_attention_weight_run() -> None:
    adapter = ModelAdapter(tiny_model("qwen2"))
    segs, _ = _segments(adapter, shared_prefix=True)
    for cfg in (BlendConfig(0.3, deviation="key"), BlendConfig(0.3, attention_weight=0.5)):
        fused = blend(adapter, segs, cfg)
        assert fused.stats.recomputed_tokens == round(0.3 * 35)
        assert torch.isfinite(fused.last_logits).all()


def test_bad_inputs_rejected() -> None:
    with pytest.raises(ValueError):
        BlendConfig(recompute_ratio=1.5)
    with pytest.raises(ValueError):
        BlendConfig(check_layers=(2, 1))
    adapter = ModelAdapter(tiny_model("llama"))
    ids = torch.randint(0, 256, (4,))
    wrong = chunk_kv(adapter, "fp", torch.randint(0, 256, (5,)))
    with pytest.raises(ValueError, match="tokens"):
        SegmentInput(ids, Reuse.CACHED, wrong)
    not_prefix = chunk_kv(adapter, "fp", ids, prefix_kv(adapter, "fp", torch.randint(0, 256, (3,))))
    with pytest.raises(ValueError, match="EXACT"):
        blend(adapter, [SegmentInput(ids, Reuse.EXACT, not_prefix), SegmentInput(ids)], BlendConfig())
