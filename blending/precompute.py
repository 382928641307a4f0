"""Computing the KV of chunks to store: standalone, or after a shared prefix (APE-style)."""

from __future__ import annotations

import torch

from blending.adapter import ModelAdapter
from kvstore.chunk import KVChunk


@torch.inference_mode()
def chunk_kv(
    adapter: ModelAdapter, fingerprint: str, token_ids: torch.Tensor, prefix: KVChunk | None = None
) -> KVChunk:
    """KV of ``token_ids`` computed alone (positions 0..T-1) or right after ``prefix`` (whose KV must sit
    at positions 0..P-1); the prefix's own KV is dropped. The result records its positions."""
    if prefix is None:
        kv = _kv(adapter, token_ids)
        positions = torch.arange(len(token_ids))
    else:
        past = prefix.num_tokens
        if not torch.equal(prefix.positions.cpu(), torch.arange(past)):
            raise ValueError("a shared prefix must sit at positions 0..P-1")
        kv = _kv(adapter, token_ids, prefix.kv.to(adapter.device, adapter.dtype))[:, :, :, past:]
        positions = torch.arange(past, past + len(token_ids))
    return KVChunk(kv.contiguous().cpu(), positions, fingerprint)


@torch.inference_mode()
def prefix_kv(adapter: ModelAdapter, fingerprint: str, token_ids: torch.Tensor) -> KVChunk:
    """Exact KV of a prompt prefix at positions 0..P-1 (reusable only as a prefix)."""
    return KVChunk(_kv(adapter, token_ids).cpu(), torch.arange(len(token_ids)), fingerprint)


def _kv(adapter: ModelAdapter, token_ids: torch.Tensor, past_kv: torch.Tensor | None = None) -> torch.Tensor:
    """The KV of ``past_kv`` followed by ``token_ids`` (no LM head over the chunk's tokens)."""
    past = 0 if past_kv is None else past_kv.shape[3]
    kv = adapter.empty_kv(past + len(token_ids))
    if past_kv is not None:
        kv[:, :, :, :past] = past_kv
    adapter.prefill_into(kv, past, token_ids)
    return kv
