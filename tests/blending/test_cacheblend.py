"""Selective recompute: ratio 1.0 is a dense prefill, ratio 0.0 is naive reuse, masks are exact."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from blending.adapter import ModelAdapter
from blending.cacheblend import BlendConfig, blend
from blending.fused import FusedKV, Reuse, SegmentInput
from blending.precompute import chunk_kv, prefix_kv
from blending.rope import rerotate
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


def _reference_forward(
    adapter: ModelAdapter, ids: torch.Tensor, kv: torch.Tensor, rows_at: list[torch.Tensor]
) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Plain-torch forward of the buffer rows ``rows_at[l]`` (each a subset of the previous layer's) through
    every layer ``l`` of a Llama model, attending over the fused buffer ``kv[l]`` with an explicit per-token
    mask: the row at buffer index i sees key j iff j <= i (and j > i - window). Uses the model's modules, not
    the adapter's projection, mask or attention code. Returns each layer's (q, k, v) of its rows and the
    logits of the last row."""
    m, s = adapter.model.model, adapter.shape
    rows = rows_at[0]
    hidden = m.embed_tokens(ids[rows])
    out = []
    for layer, block in enumerate(m.layers):
        pick = torch.tensor([rows.tolist().index(r) for r in rows_at[layer].tolist()], dtype=torch.int64)
        hidden, rows = hidden[pick], rows_at[layer]
        attn, n = block.self_attn, len(rows)
        x = block.input_layernorm(hidden)
        q = attn.q_proj(x).view(n, s.num_heads, s.head_dim).transpose(0, 1)
        k = attn.k_proj(x).view(n, s.num_kv_heads, s.head_dim).transpose(0, 1)
        v = attn.v_proj(x).view(n, s.num_kv_heads, s.head_dim).transpose(0, 1)
        cos, sin = m.rotary_emb(x, rows[None])
        q4, k4 = apply_rotary_pos_emb(q[None], k[None], cos, sin)
        q, k = q4[0], k4[0]
        out.append((q, k, v))
        group = s.num_heads // s.num_kv_heads
        keys = kv[layer, 0].repeat_interleave(group, dim=0)  # [heads, N, d]
        values = kv[layer, 1].repeat_interleave(group, dim=0)
        j = torch.arange(kv.shape[3])[None, :]
        visible = j <= rows[:, None]
        window = adapter.windows[layer]
        if window is not None:
            visible &= j > rows[:, None] - window
        logits = (q @ keys.transpose(1, 2)) * adapter.scaling
        probs = logits.masked_fill(~visible[None], float("-inf")).softmax(dim=-1)
        ctx = (probs @ values).transpose(0, 1).reshape(n, -1)
        hidden = hidden + attn.o_proj(ctx)
        hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
    return out, adapter.model.lm_head(m.norm(hidden[-1:]))[0].float()


def _assert_selected_rows_match_reference(adapter: ModelAdapter, segs: list[SegmentInput], config: BlendConfig,
                                          fused: FusedKV) -> None:
    """Every row blend computed, at every layer, has the K/V (and the last row the logits) of the reference:
    the same rows run over the same fused buffer with an explicit causal mask."""
    assert fused.selected is not None and len(config.check_layers) == 1
    ids = fused.token_ids
    active = torch.arange(len(segs[0].token_ids), len(ids))  # every non-exact row runs up to the check layer
    rows_at = [active if layer <= config.check_layers[0] else fused.selected for layer in range(len(fused.kv))]
    ref, logits = _reference_forward(adapter, ids, fused.kv, rows_at)
    for layer, ((_, k, v), rows) in enumerate(zip(ref, rows_at, strict=True)):
        torch.testing.assert_close(fused.kv[layer, 0][:, rows], k, atol=1e-5, rtol=1e-4, msg=f"K, layer {layer}")
        torch.testing.assert_close(fused.kv[layer, 1][:, rows], v, atol=1e-5, rtol=1e-4, msg=f"V, layer {layer}")
    torch.testing.assert_close(fused.last_logits, logits, atol=1e-4, rtol=1e-4)


def _bottom_right_mask(layer: int, query_index: torch.Tensor, num_keys: int) -> torch.Tensor:
    """The wrong mask: the n queries aligned to the last n keys, whatever their buffer indices."""
    n = len(query_index)
    return torch.arange(num_keys)[None, :] <= torch.arange(num_keys - n, num_keys)[:, None]


@pytest.mark.parametrize("window", [None, 12])
def test_selected_rows_match_reference_with_exact_causal_mask(window: int | None) -> None:
    """A partial selection: the recomputed rows attend over the fused cache with an exact per-token causal mask
    (a bottom-right-aligned mask would let them see later keys). Compared row by row with the reference."""
    adapter = ModelAdapter(tiny_model("llama", num_hidden_layers=4))
    adapter.windows = [window] * adapter.shape.num_layers
    segs, _ = _segments(adapter, shared_prefix=False)
    config = BlendConfig(recompute_ratio=0.3)
    fused = blend(adapter, segs, config)
    assert fused.stats.recomputed_tokens == round(0.3 * 35)
    assert fused.selected is not None and int(fused.selected.min()) < 30  # early rows: later keys exist
    _assert_selected_rows_match_reference(adapter, segs, config, fused)


def test_reference_check_catches_a_bottom_right_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference comparison is not vacuous: with a bottom-right-aligned mask injected into a copy of the
    adapter, the same check fails."""
    adapter = ModelAdapter(tiny_model("llama", num_hidden_layers=4))
    segs, _ = _segments(adapter, shared_prefix=False)
    config = BlendConfig(recompute_ratio=0.3)
    monkeypatch.setattr(adapter, "causal_mask", _bottom_right_mask)
    fused = blend(adapter, segs, config)
    with pytest.raises(AssertionError):
        _assert_selected_rows_match_reference(adapter, segs, config, fused)


def test_sink_tokens_and_multi_layer_selection() -> None:
    adapter = ModelAdapter(tiny_model("llama"))
    segs, _ = _segments(adapter, shared_prefix=False)
    cfg = BlendConfig(recompute_ratio=0.2, sink_tokens=2, check_layers=(1, 2), first_ratio=0.5)
    fused = blend(adapter, segs, cfg)
    assert fused.selected is not None
    selected = set(fused.selected.tolist())
    assert {6, 7, 21, 22} <= selected  # the first two tokens of each cached segment
    assert fused.stats.recomputed_tokens == 7


CACHED_ROWS = range(6, 41)  # the two cached segments of _segments (the prefix is exact, the query fresh)


def _selected_cached(fused: FusedKV) -> set[int]:
    assert fused.selected is not None
    return set(fused.selected.tolist()) & set(CACHED_ROWS)


def _reference_selection(adapter: ModelAdapter, segs: list[SegmentInput], fused: FusedKV,
                         config: BlendConfig) -> set[int]:
    """The cached rows a single-check-layer selection must keep, from reference scores: the squared deviation
    of the fresh K or V (reference forward) from the cached one re-rotated to its new position, or, with
    ``attention_weight`` 1, the attention (explicit causal and windowed mask) that the prompt's fresh tail
    pays each row, averaged over heads and queries."""
    c = config.check_layers[0]
    ids = fused.token_ids
    active = torch.arange(len(segs[0].token_ids), len(ids))
    ref, _ = _reference_forward(adapter, ids, fused.kv, [active] * len(fused.kv))
    q, k, v = ref[c]
    cached_k, cached_v, start = [], [], 0
    for seg in segs:
        n = len(seg.token_ids)
        if seg.reuse is Reuse.CACHED and seg.cached is not None:
            new_pos = torch.arange(start, start + n)
            cached_k.append(rerotate(seg.cached.kv[c, 0], seg.cached.positions, new_pos, adapter.inv_freq))
            cached_v.append(seg.cached.kv[c, 1])
        start += n
    rows = torch.tensor(list(CACHED_ROWS)) - active[0]
    if config.attention_weight == 0.0:
        fresh, old = (v, cached_v) if config.deviation == "value" else (k, cached_k)
        score = (fresh[:, rows] - torch.cat(old, dim=1)).pow(2).sum(dim=(0, 2))
    else:
        assert config.attention_weight == 1.0
        tail = active[active > CACHED_ROWS[-1]]  # the fresh query rows
        group = adapter.shape.num_heads // adapter.shape.num_kv_heads
        logits = q[:, tail - active[0]] @ k.repeat_interleave(group, dim=0).transpose(1, 2) * adapter.scaling
        visible = active[None, :] <= tail[:, None]
        window = adapter.windows[c]
        if window is not None:
            visible &= active[None, :] > tail[:, None] - window
        attn = logits.masked_fill(~visible[None], float("-inf")).softmax(dim=-1).mean(dim=(0, 1))
        score = attn[rows]
    budget = round(config.recompute_ratio * len(CACHED_ROWS))
    return {CACHED_ROWS[i] for i in torch.topk(score, budget).indices.tolist()}


@pytest.mark.parametrize("window", [None, 12])
@pytest.mark.parametrize(("deviation", "weight"), [("value", 0.0), ("key", 0.0), ("value", 1.0)])
def test_selection_is_the_reference_top_scoring_rows(deviation: str, weight: float, window: int | None) -> None:
    adapter = ModelAdapter(tiny_model("llama", num_hidden_layers=4))
    adapter.windows = [window] * adapter.shape.num_layers
    segs, _ = _segments(adapter, shared_prefix=True)
    config = BlendConfig(0.3, deviation=deviation, attention_weight=weight)  # type: ignore[arg-type]
    fused = blend(adapter, segs, config)
    assert len(_selected_cached(fused)) == fused.stats.recomputed_tokens == round(0.3 * 35)
    assert _selected_cached(fused) == _reference_selection(adapter, segs, fused, config)


def test_attention_score_respects_the_sliding_window() -> None:
    """With a 4-token window at the check layer, the fresh query rows (41..45) attend to no cached row but
    38..40: a pure attention score must pick exactly those three."""
    adapter = ModelAdapter(tiny_model("llama", num_hidden_layers=4))
    adapter.windows = [4] * adapter.shape.num_layers
    segs, _ = _segments(adapter, shared_prefix=False)
    config = BlendConfig(3 / 35, attention_weight=1.0)
    fused = blend(adapter, segs, config)
    assert _selected_cached(fused) == {38, 39, 40} == _reference_selection(adapter, segs, fused, config)


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
