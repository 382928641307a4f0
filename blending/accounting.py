"""Token accounting of a prompt's KV, defined once for the engine, the service and its clients.

Every prompt token gets its KV in exactly one of four ways:

- ``exact_tokens``: from the cache, identical to a dense prefill's (an exact-prefix or hot-prompt hit);
- ``reused_tokens``: from the cache at a new place (re-rotated, approximate), kept as is past the check
  layer(s) (CacheBlend), or corrected by anchors;
- ``recomputed_tokens``: cached, but selected and recomputed (CacheBlend's HKVD tokens, hybrid);
- ``computed_tokens``: no cached KV (query, glue text, misses, a dense prefill): computed.

``prompt_tokens`` is their sum and ``cached_tokens = exact + reused + recomputed`` (what OpenAI's
``usage.prompt_tokens_details.cached_tokens`` reports). Both are checked, never trusted: a count that does
not add up is a ``ValueError`` (a ``pydantic.ValidationError``).

This module has no heavy imports (no torch), so HTTP clients can use it (``connectors.client``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

TOKEN_FIELDS = ("prompt_tokens", "exact_tokens", "reused_tokens", "recomputed_tokens", "computed_tokens")


class TokenAccounting(BaseModel):
    """How many prompt tokens got their KV which way (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    prompt_tokens: int = Field(default=0, ge=0, description="all prompt tokens")
    exact_tokens: int = Field(default=0, ge=0, description="KV from the cache, identical to a dense prefill's")
    reused_tokens: int = Field(default=0, ge=0, description="cached KV used at a new place (approximate)")
    recomputed_tokens: int = Field(default=0, ge=0, description="cached, but selected and recomputed")
    computed_tokens: int = Field(default=0, ge=0, description="no cached KV: computed")

    @computed_field(description="exact + reused + recomputed (OpenAI's cached_tokens)")  # type: ignore[prop-decorator]
    @property
    def cached_tokens(self) -> int:
        return self.exact_tokens + self.reused_tokens + self.recomputed_tokens

    @model_validator(mode="before")
    @classmethod
    def _given_cached_matches(cls, data: Any) -> Any:
        """A ``cached_tokens`` in the input (a parsed response) must equal the sum it stands for."""
        if isinstance(data, dict) and "cached_tokens" in data:
            parts = [data.get(k, 0) for k in ("exact_tokens", "reused_tokens", "recomputed_tokens")]
            if all(isinstance(p, int) for p in parts) and data["cached_tokens"] != sum(parts):
                raise ValueError(
                    f"cached_tokens {data['cached_tokens']} != exact + reused + recomputed ({sum(parts)})"
                )
        return data

    @model_validator(mode="after")
    def _adds_up(self) -> TokenAccounting:
        parts = self.exact_tokens + self.reused_tokens + self.recomputed_tokens + self.computed_tokens
        if parts != self.prompt_tokens:
            raise ValueError(
                f"token accounting does not add up: exact {self.exact_tokens} + reused {self.reused_tokens} + "
                f"recomputed {self.recomputed_tokens} + computed {self.computed_tokens} = {parts}, "
                f"prompt_tokens {self.prompt_tokens}"
            )
        return self

    def tokens(self) -> dict[str, int]:
        """The counts alone (with ``cached_tokens``)."""
        return {**{k: int(getattr(self, k)) for k in TOKEN_FIELDS}, "cached_tokens": self.cached_tokens}


class ReuseReport(TokenAccounting):
    """How one request's prompt KV was obtained: the ``kvfuse`` block of every service response."""

    mode: str = Field(description="the mode actually used: dense, prefix, naive, blend, anchor or hybrid")
    requested_mode: str = Field(default="auto", description="the mode the request asked for")
    fallback_reason: str | None = Field(default=None, description="why a cheaper mode was not used")
    ttft_ms: float = Field(description="arrival to the first token's logits, queue time included")
    queue_ms: float = Field(default=0.0, description="time spent waiting for the model before the prefill ran")
    chunk_hits: int = Field(default=0, ge=0)
    chunk_misses: int = Field(default=0, ge=0)
