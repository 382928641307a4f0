"""Inputs and results of blending: segments of a prompt, and the fused KV that replaces its prefill."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
from pydantic import ConfigDict, Field

from blending.accounting import TokenAccounting
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


class BlendStats(TokenAccounting):
    """Token accounting (:class:`~blending.accounting.TokenAccounting`: the counts must add up) and time
    per phase (seconds) of one fused prefill. ``total_tokens`` is accepted and kept as an alias of
    ``prompt_tokens``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    times: dict[str, float] = Field(default_factory=dict, exclude=True)

    def __init__(
        self,
        *,
        prompt_tokens: int | None = None,
        total_tokens: int | None = None,
        exact_tokens: int = 0,
        reused_tokens: int = 0,
        recomputed_tokens: int = 0,
        computed_tokens: int = 0,
        times: dict[str, float] | None = None,
    ) -> None:
        if prompt_tokens is not None and total_tokens is not None and prompt_tokens != total_tokens:
            raise ValueError("prompt_tokens and total_tokens (its alias) differ")
        total = prompt_tokens if prompt_tokens is not None else total_tokens
        fields: dict[str, Any] = {
            "prompt_tokens": total or 0,
            "exact_tokens": exact_tokens,
            "reused_tokens": reused_tokens,
            "recomputed_tokens": recomputed_tokens,
            "computed_tokens": computed_tokens,
            "times": times or {},
        }
        super().__init__(**fields)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens

    def as_dict(self) -> dict[str, object]:
        return {
            "total_tokens": self.prompt_tokens,
            **self.tokens(),
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
