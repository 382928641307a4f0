"""CacheBlend-style selective recompute over re-rotated cached chunk KV.

Layers up to the (first) check layer run for every non-exact token. At each check layer the cached
tokens whose fresh KV deviates most from their cached KV are kept (high-KV-deviation, "HKVD" tokens);
later layers run only those plus the fresh tokens, attending over the fused cache with an exact
per-token causal mask, and overwrite their K/V in it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch

from blending.adapter import ModelAdapter
from blending.fused import BlendStats, FusedKV, Reuse, SegmentInput
from blending.rope import rerotate


@dataclass(frozen=True)
class BlendConfig:
    """Selective recompute settings.

    ``recompute_ratio``: share of cached (non-exact) tokens recomputed after the last check layer;
    1.0 reproduces a dense prefill; 0.0 recomputes no cached token after the last check layer, but every
    layer up to it still runs for all tokens (naive reuse is ``check_layers=()`` with ratio 0, below).
    ``check_layers``: layers where the selection
    is made; with several, the kept share shrinks geometrically from ``first_ratio`` down to
    ``recompute_ratio``. ``deviation``: compare V (default) or K. ``attention_weight``: blend the
    deviation score with the attention that the prompt's last fresh tokens pay each token (0 = pure
    deviation). ``sink_tokens``: always recompute the first n tokens of every cached segment.
    With no check layers (ratio 0) cached tokens never run: only fresh and sink tokens are computed,
    attending over the cached KV as given (anchor-corrected reuse).
    """

    recompute_ratio: float = 0.15
    check_layers: tuple[int, ...] = (1,)
    first_ratio: float | None = None
    deviation: Literal["value", "key"] = "value"
    attention_weight: float = 0.0
    sink_tokens: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.recompute_ratio <= 1.0:
            raise ValueError("recompute_ratio must be within [0, 1]")
        if list(self.check_layers) != sorted(set(self.check_layers)):
            raise ValueError("check_layers must be an increasing tuple")
        if not self.check_layers and self.recompute_ratio > 0.0:
            raise ValueError("selective recompute needs at least one check layer")
        if self.sink_tokens < 0:
            raise ValueError("sink_tokens must be >= 0")

    def ratio_at(self, step: int) -> float:
        """Share of cached tokens kept after the ``step``-th check layer."""
        steps = len(self.check_layers)
        first = max(self.first_ratio or self.recompute_ratio, self.recompute_ratio)
        if steps == 1 or first == self.recompute_ratio:
            return self.recompute_ratio
        if self.recompute_ratio == 0.0:
            return first if step < steps - 1 else 0.0
        return first * (self.recompute_ratio / first) ** (step / (steps - 1))


@dataclass
class _Layout:
    token_ids: torch.Tensor
    reuse: torch.Tensor  # int8 per token: 0 exact, 1 cached, 2 fresh
    sinks: torch.Tensor  # bool per token: first tokens of cached segments


_EXACT, _CACHED, _FRESH = 0, 1, 2


def _assemble(adapter: ModelAdapter, segments: list[SegmentInput], kv: torch.Tensor) -> _Layout:
    ids, reuse, sinks = [], [], []
    start = 0
    for seg in segments:
        n = len(seg.token_ids)
        code = {Reuse.EXACT: _EXACT, Reuse.CACHED: _CACHED, Reuse.FRESH: _FRESH}[seg.reuse]
        if seg.cached is not None:
            cached = seg.cached.to(adapter.device)
            new_pos = torch.arange(start, start + n, device=adapter.device)
            if seg.reuse is Reuse.EXACT and not torch.equal(cached.positions, new_pos):
                raise ValueError("an EXACT segment must have been computed at the positions it is used at")
            kv[:, 0, :, start : start + n] = rerotate(
                cached.kv[:, 0], cached.positions, new_pos, adapter.inv_freq
            ).to(kv.dtype)
            kv[:, 1, :, start : start + n] = cached.kv[:, 1].to(kv.dtype)
        ids.append(seg.token_ids.to(torch.int64))
        reuse.append(torch.full((n,), code, dtype=torch.int8))
        sinks.append(torch.zeros(n, dtype=torch.bool))
        start += n
    return _Layout(torch.cat(ids), torch.cat(reuse), torch.cat(sinks))


def _scores(
    adapter: ModelAdapter,
    config: BlendConfig,
    layer: int,
    q: torch.Tensor,
    fresh_k: torch.Tensor,
    fresh_v: torch.Tensor,
    kv: torch.Tensor,
    active: torch.Tensor,
    query_rows: torch.Tensor,
) -> torch.Tensor:
    """Selection score per active token (higher = recompute first)."""
    cached = kv[layer, 1 if config.deviation == "value" else 0][:, active]
    fresh = fresh_v if config.deviation == "value" else fresh_k
    dev = (fresh.float() - cached.float()).pow(2).sum(dim=(0, 2))
    if config.attention_weight <= 0.0 or query_rows.numel() == 0:
        return dev
    # Attention the prompt's last fresh tokens pay each token, from this layer's fresh keys.
    group = adapter.shape.num_heads // adapter.shape.num_kv_heads
    keys = fresh_k.float().repeat_interleave(group, dim=0)
    logits = q[:, query_rows].float() @ keys.transpose(1, 2) * adapter.scaling
    rows = active[query_rows][:, None]
    causal = active[None, :] <= rows
    window = adapter.windows[layer]
    if window is not None:  # the layer's sliding window: keys at or before row - window are not seen
        causal &= active[None, :] > rows - window
    attn = logits.masked_fill(~causal[None], float("-inf")).softmax(dim=-1).mean(dim=(0, 1))
    dev_n = dev / dev.max().clamp_min(1e-12)
    attn_n = attn / attn.max().clamp_min(1e-12)
    w = config.attention_weight
    return (1 - w) * dev_n + w * attn_n


@torch.inference_mode()
def blend(adapter: ModelAdapter, segments: list[SegmentInput], config: BlendConfig) -> FusedKV:
    """Fuse cached and fresh segments into the KV of their concatenation.

    The last token of the prompt is always computed, so the result carries the logits of the next token.
    """
    t0 = time.perf_counter()
    total = sum(len(s.token_ids) for s in segments)
    if total == 0:
        raise ValueError("cannot blend an empty prompt")
    kv = adapter.empty_kv(total)
    layout = _assemble(adapter, segments, kv)
    if config.sink_tokens:
        start = 0
        for seg in segments:
            if seg.reuse is Reuse.CACHED:
                layout.sinks[start : start + min(config.sink_tokens, len(seg.token_ids))] = True
            start += len(seg.token_ids)
    reuse = layout.reuse.clone()
    reuse[-1] = _FRESH if reuse[-1] != _FRESH else reuse[-1]  # the last token must produce logits
    device = adapter.device
    is_cached = (reuse == _CACHED).to(device)
    forced = ((reuse == _FRESH) | layout.sinks).to(device)
    runs = reuse != _EXACT
    if not config.check_layers:  # no selection: only fresh (and sink) tokens are computed
        runs &= (reuse == _FRESH) | layout.sinks
    active = torch.nonzero(runs).flatten().to(device)
    num_cached = int(is_cached.sum())
    t1 = time.perf_counter()

    hidden = adapter.embed(layout.token_ids.to(device)[active])
    check_step = 0
    for layer in range(adapter.shape.num_layers):
        q, k, v = adapter.project_qkv(layer, hidden, active)
        if check_step < len(config.check_layers) and layer == config.check_layers[check_step]:
            fresh_tail = torch.nonzero(~is_cached[active]).flatten()
            query_rows = fresh_tail[-min(32, fresh_tail.numel()) :]
            score = _scores(adapter, config, layer, q, k, v, kv, active, query_rows)
            keep_n = round(config.ratio_at(check_step) * num_cached)
            cand = is_cached[active] & ~forced[active]
            keep = ~cand
            n_forced_cached = int((is_cached[active] & forced[active]).sum())
            budget = max(0, min(int(cand.sum()), keep_n - n_forced_cached))
            if budget > 0:
                top = torch.topk(score.masked_fill(~cand, float("-inf")), budget).indices
                keep[top] = True
            # Fresh KV for all tokens computed at this layer; only the kept go on.
            kv[layer, 0, :, active] = k
            kv[layer, 1, :, active] = v
            mask = adapter.causal_mask(layer, active, total)
            out = adapter.attend_and_mlp(
                layer, hidden[keep], q[:, keep], kv[layer, 0], kv[layer, 1], mask[keep]
            )
            active, hidden = active[keep], out
            check_step += 1
            continue
        kv[layer, 0, :, active] = k
        kv[layer, 1, :, active] = v
        mask = adapter.causal_mask(layer, active, total)
        hidden = adapter.attend_and_mlp(layer, hidden, q, kv[layer, 0], kv[layer, 1], mask)
    last_logits = adapter.logits(hidden[-1:])[0]
    t2 = time.perf_counter()

    recomputed = int(is_cached[active].sum()) if num_cached else 0
    stats = BlendStats(
        total_tokens=total,
        exact_tokens=int((layout.reuse == _EXACT).sum()),
        reused_tokens=num_cached - recomputed,
        recomputed_tokens=recomputed,
        computed_tokens=int((reuse == _FRESH).sum()),
        times={"assemble": t1 - t0, "compute": t2 - t1},
    )
    positions = torch.arange(total)
    return FusedKV(kv, layout.token_ids, positions, last_logits, stats, selected=active.cpu())
