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
        kv = adapter.prefill_kv(token_ids)
        positions = torch.arange(len(token_ids))
    else:
        past = prefix.num_tokens
        if not torch.equal(prefix.positions.cpu(), torch.arange(past)):
            raise ValueError("a shared prefix must sit at positions 0..P-1")
        kv = adapter.prefill_kv(token_ids, prefix.kv.to(adapter.device, adapter.dtype))[:, :, :, past:]
        positions = torch.arange(past, past + len(token_ids))
    return KVChunk(kv.contiguous().cpu(), positions, fingerprint)


@torch.inference_mode()
def prefix_kv(adapter: ModelAdapter, fingerprint: str, token_ids: torch.Tensor) -> KVChunk:
    """Exact KV of a prompt prefix at positions 0..P-1 (reusable only as a prefix)."""
    return KVChunk(adapter.prefill_kv(token_ids).cpu(), torch.arange(len(token_ids)), fingerprint)

