"""Inputs and results of blending: segments of a prompt, and the fused KV that replaces its prefill."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import torch

from kvstore.chunk import KVChunk


class Reuse(StrEnum):
    """How a segment's KV is obtained."""

    EXACT = "exact"  # cached KV equals a dense prefill's (a prefix hit): used as is
    CACHED = "cached"  # cached KV computed elsewhere: re-rotated, then blended
    FRESH = "fresh"  # no cache: always computed


@dataclass(frozen=True)
class SegmentInput:
    """One piece of the prompt: its token ids and, unless FRESH, its cached KV."""

    token_ids: torch.Tensor
    reuse: Reuse = Reuse.FRESH
    cached: KVChunk | None = None

    def __post_init__(self) -> None:
        if (self.cached is None) != (self.reuse is Reuse.FRESH):
            raise ValueError("a FRESH segment has no cached KV; EXACT and CACHED segments need one")
        if self.cached is not None and self.cached.num_tokens != len(self.token_ids):
            raise ValueError(
                f"cached KV has {self.cached.num_tokens} tokens, segment has {len(self.token_ids)}"
            )


@dataclass
class BlendStats:
    """Token accounting and time per phase (seconds) of one fused prefill."""

    total_tokens: int = 0
    exact_tokens: int = 0
    reused_tokens: int = 0  # cached tokens whose KV was kept past the check layer
    recomputed_tokens: int = 0  # cached tokens selected and recomputed
    computed_tokens: int = 0  # fresh tokens
    times: dict[str, float] = field(default_factory=dict)

    @property
    def cached_tokens(self) -> int:
        """Tokens whose KV came from the cache (exact or blended), as OpenAI's usage reports them."""
        return self.exact_tokens + self.reused_tokens + self.recomputed_tokens

    def as_dict(self) -> dict[str, object]:
        return {
            "total_tokens": self.total_tokens,
            "exact_tokens": self.exact_tokens,
            "reused_tokens": self.reused_tokens,
            "recomputed_tokens": self.recomputed_tokens,
            "computed_tokens": self.computed_tokens,
            "cached_tokens": self.cached_tokens,
            "times_ms": {k: round(v * 1000, 3) for k, v in self.times.items()},
        }


@dataclass
class FusedKV:
    """Per-layer K/V for the exact prompt, ready for decoding.

    ``kv``: ``[layers, 2, kv_heads, N, head_dim]``; ``token_ids`` and ``positions``: ``[N]``;
    ``last_logits``: float32 ``[vocab]`` for the token after the prompt.
    """

    kv: torch.Tensor
    token_ids: torch.Tensor
    positions: torch.Tensor
    last_logits: torch.Tensor
    stats: BlendStats
    selected: torch.Tensor | None = None  # buffer indices recomputed past the check layer
