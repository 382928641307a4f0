"""KVCOMM offset estimation: how a shared segment's KV shifts under a receiving context.

An :class:`Anchor` records, for a segment seen under a real context, a summary of the segment's base KV
(its per-layer, per-head mean over tokens) and the observed deviation (real minus base). Both are kept in
the position-free frame (keys de-rotated to position 0), so an anchor helps at other offsets too.
:func:`estimate` corrects a new occurrence by a similarity-weighted mix of the deviations of the
``top_k`` closest anchors (softmax over negative relative distance of base summaries, per layer, keys
and values separately), or says why it cannot (no anchor close enough, weights too flat). Matching reads
only the summaries, so its cost does not grow with the anchors' lengths.

Pure functions over tensors: which anchors exist, their bounds and their use counts are the pool's
business (:mod:`blending.anchors`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from blending.rope import rerotate
from kvstore.chunk import KVChunk


class MixSettings(Protocol):
    """The knobs :func:`estimate` reads (:class:`blending.anchors.AnchorConfig` provides them)."""

    @property
    def temperature(self) -> float: ...  # softmax temperature over relative distances
    @property
    def max_entropy(self) -> float: ...  # normalized entropy of the weights above which they are too flat
    @property
    def max_distance(self) -> float: ...  # relative distance of the closest anchor above which none is close
    @property
    def top_k(self) -> int: ...  # deviations mixed per estimate (the closest anchors)
    @property
    def apply_deviation(self) -> bool: ...  # False: the re-rotated base as is (an ablation)


@dataclass(eq=False)  # identity semantics: anchors hold tensors
class Anchor:
    """One observed deviation. ``slot``: its place among its context's persisted entries; ``uses`` and
    ``added`` order evictions (least used, then oldest, first)."""

    summary: torch.Tensor  # [L, 2, H, 1, D]: the base KV's mean over tokens, keys at position 0
    deviation: torch.Tensor  # [L, 2, H, T, D]: real minus base, keys at position 0
    slot: int = -1
    uses: int = 0
    added: float = field(default_factory=time.monotonic)

    @property
    def num_tokens(self) -> int:
        return int(self.deviation.shape[3])

    @property
    def nbytes(self) -> int:
        summary, dev = self.summary, self.deviation
        return summary.numel() * summary.element_size() + dev.numel() * dev.element_size()


@dataclass(frozen=True)
class Estimate:
    """The outcome of :func:`estimate`: the corrected KV, or None with the reason, and what was weighed."""

    chunk: KVChunk | None  # corrected KV at the new positions, or None with a reason
    reason: str | None
    anchors: int
    entropy: float
    distance: float


def fit(t: torch.Tensor, n: int, tail: int = 16) -> torch.Tensor:
    """``t`` ``[L, 2, H, T, D]`` cut or extended to ``n`` tokens; extension repeats the mean of its last
    tokens (past the segment start the deviation is mostly a steady shift from the receiving context)."""
    have = t.shape[3]
    if have >= n:
        return t[:, :, :, :n]
    fill = t[:, :, :, max(0, have - tail) :].mean(dim=3, keepdim=True)
    return torch.cat([t, fill.expand(-1, -1, -1, n - have, -1)], dim=3)


def frame0(kv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """``kv`` with its keys de-rotated from ``positions`` to position 0 (a copy)."""
    out = kv.clone()
    out[:, 0] = rerotate(kv[:, 0], positions, torch.zeros_like(positions), inv_freq)
    return out


def summarize(kv0: torch.Tensor) -> torch.Tensor:
    """The matching signature of a position-free KV ``[L, 2, H, T, D]``: its mean over tokens."""
    return kv0.float().mean(dim=3, keepdim=True)


def observe(base: KVChunk, real_kv: torch.Tensor, real_positions: torch.Tensor, inv_freq: torch.Tensor) -> Anchor:
    """The anchor of ``base`` observed as ``real_kv`` (at ``real_positions``); raises ValueError when the
    shapes differ."""
    if real_kv.shape != base.kv.shape:
        raise ValueError(f"real KV {tuple(real_kv.shape)} does not match base {tuple(base.kv.shape)}")
    base0 = frame0(base.kv.float(), base.positions, inv_freq)
    real0 = frame0(real_kv.float(), real_positions, inv_freq)
    return Anchor(summarize(base0), (real0 - base0).to(base.kv.dtype))


def estimate(anchors: Sequence[Anchor], base: KVChunk, new_positions: torch.Tensor, inv_freq: torch.Tensor,
             settings: MixSettings) -> tuple[Estimate, int | None]:
    """Corrected KV of ``base`` placed at ``new_positions`` from ``anchors`` (non-empty), with the index
    of the anchor weighing most; or an :class:`Estimate` without a chunk, saying why none is close
    enough, and None."""
    n = base.num_tokens
    base0 = frame0(base.kv.float(), base.positions, inv_freq)  # [L, 2, H, T, D]
    query = summarize(base0)
    norm = query.pow(2).sum(dim=(2, 3, 4)).sqrt().clamp_min(1e-6)  # [L, 2]
    rel = torch.stack([(a.summary - query).pow(2).sum(dim=(2, 3, 4)).sqrt() / norm for a in anchors])
    closest = float(rel.min(dim=0).values.mean())
    weights = torch.softmax(-rel / settings.temperature, dim=0)  # per layer, K and V separately
    entropy = 0.0
    if len(anchors) > 1:
        ent = -(weights * weights.clamp_min(1e-12).log()).sum(dim=0) / math.log(len(anchors))
        entropy = float(ent.mean())
    if closest > settings.max_distance:
        return Estimate(None, "no anchor close enough", len(anchors), entropy, closest), None
    if entropy > settings.max_entropy:
        return Estimate(None, "anchor weights too flat", len(anchors), entropy, closest), None
    order = weights.mean(dim=(1, 2)).argsort(descending=True)[: settings.top_k].tolist()
    top = weights[order] / weights[order].sum(dim=0, keepdim=True)  # [k, L, 2]
    corrected = base0
    for w, i in zip(top, order, strict=True) if settings.apply_deviation else ():
        corrected += w[:, :, None, None, None] * fit(anchors[i].deviation.float(), n)
    corrected[:, 0] = rerotate(corrected[:, 0], torch.zeros_like(new_positions), new_positions, inv_freq)
    chunk = KVChunk(corrected.to(base.kv.dtype), new_positions.clone(), base.fingerprint)
    return Estimate(chunk, None, len(anchors), entropy, closest), order[0]
