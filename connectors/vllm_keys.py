"""vLLM blocks in kvfuse: their storage keys, the KV dtype they carry, and fused-KV export as vLLM blocks.

A block's kvfuse key is :meth:`kvstore.keys.KeySpace.engine_key` of vLLM's own block hash, in the key space of
(model identity, ``vllm/tp<rank>of<size>/b<block size>:<dtype>``, ``kvfuse_namespace``), with the scope
``prefix`` (KV an engine computed densely: exact, shared by every request with that prefix) or
``prepared:<id>`` (KV kvfuse blended for one prompt). The model identity is kvfuse's weight fingerprint
when configured (``kvfuse_fingerprint``), else vLLM's model name (vLLM exposes nothing else). The KV dtype
is ``kvfuse_kv_dtype`` if given, else vLLM's ``cache_dtype`` unless ``auto``, else the model dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from blending.fused import FusedKV
from connectors.common import is_exact, model_identity, parse_kv_dtype
from connectors.engine_hashes import vllm_block_hashes
from kvstore.chunk import KVChunk, dtype_name
from kvstore.keys import ChunkKey, KeySpace
from kvstore.store import TieredStore

__all__ = ["DTYPE_PARAM", "VLLMBlockKeys", "export_fused_kv_vllm", "kv_dtype_of"]

DTYPE_PARAM = "kvfuse_kv_dtype"


def kv_dtype_of(vllm_config: Any, extra: Mapping[str, Any]) -> torch.dtype:
    """The dtype of vLLM's KV cache as the scheduler can tell it (the worker checks its caches against it)."""
    if extra.get(DTYPE_PARAM):
        return parse_kv_dtype(extra[DTYPE_PARAM])
    cache_dtype = getattr(getattr(vllm_config, "cache_config", None), "cache_dtype", None) or "auto"
    if cache_dtype != "auto":
        return parse_kv_dtype(cache_dtype)
    model_dtype = getattr(getattr(vllm_config, "model_config", None), "dtype", None)
    if model_dtype is None or model_dtype == "auto":
        raise ValueError(f"kvfuse cannot tell vLLM's KV dtype: set {DTYPE_PARAM!r} in kv_connector_extra_config")
    return parse_kv_dtype(model_dtype)


@dataclass(frozen=True)
class VLLMBlockKeys:
    """How vLLM blocks are named in the kvfuse store (see the module docstring)."""

    model_name: str
    namespace: str = "default"
    tp_rank: int = 0
    tp_size: int = 1
    dtype: torch.dtype = torch.bfloat16
    block_size: int = 16
    fingerprint: str | None = None

    @property
    def identity(self) -> str:
        return model_identity(self.fingerprint, self.model_name)

    @property
    def space(self) -> KeySpace:
        layout = f"vllm/tp{self.tp_rank}of{self.tp_size}/b{self.block_size}:{dtype_name(self.dtype)}"
        return KeySpace(self.identity, layout, self.namespace)

    def key(self, block_hash: bytes, prepared_id: str | None = None) -> ChunkKey:
        scope = f"prepared:{prepared_id}" if prepared_id is not None else "prefix"
        return self.space.engine_key("vllm", bytes(block_hash), scope=scope)


def export_fused_kv_vllm(
    store: TieredStore,
    fused: FusedKV | torch.Tensor,
    token_ids: Sequence[int] | torch.Tensor,
    *,
    model_name: str,
    block_size: int,
    dtype: torch.dtype = torch.bfloat16,
    tp_size: int = 1,
    prepared_id: str | None = None,
    namespace: str = "default",
    cache_salt: str | None = None,
    hash_algo: str = "sha256",
    none_hash_seed: str | None = None,
    fingerprint: str | None = None,
) -> list[bytes]:
    """Store a prompt's KV as vLLM blocks (full blocks short of the last token); returns their block hashes.

    ``prepared_id``: store in that prepared scope (for blended KV); ``None``: the shared exact-prefix scope,
    refused for a :class:`FusedKV` whose stats show blending (reused or recomputed tokens). ``dtype``: vLLM's
    KV dtype (the KV is cast to it here, on export; never on load). ``fingerprint``: kvfuse's weight
    fingerprint, as the connector's ``kvfuse_fingerprint`` (both or neither).
    """
    kv = fused.kv if isinstance(fused, FusedKV) else fused
    if prepared_id is None and isinstance(fused, FusedKV) and not is_exact(fused):
        raise ValueError("blended (approximate) KV goes into a prepared scope: pass prepared_id (and a cache_salt)")
    ids = [int(t) for t in (token_ids.tolist() if isinstance(token_ids, torch.Tensor) else token_ids)]
    if kv.dim() != 5 or kv.shape[1] != 2 or kv.shape[3] != len(ids):
        raise ValueError(f"fused KV must be [layers, 2, heads, {len(ids)}, head_dim], got {tuple(kv.shape)}")
    n_blocks = max(0, len(ids) - 1) // block_size
    hashes = vllm_block_hashes(
        ids[: n_blocks * block_size], block_size, algo=hash_algo, none_hash_seed=none_hash_seed, cache_salt=cache_salt
    )
    heads = kv.shape[2]
    if heads % tp_size:
        raise ValueError(f"{heads} KV heads cannot be split over {tp_size} TP ranks")
    per = heads // tp_size
    items: list[tuple[ChunkKey, KVChunk]] = []
    for rank in range(tp_size):
        keys = VLLMBlockKeys(model_name, namespace, rank, tp_size, dtype, block_size, fingerprint)
        shard = kv[:, :, rank * per : (rank + 1) * per].detach().to("cpu", dtype)
        for i, block_hash in enumerate(hashes):
            lo = i * block_size
            block = shard[:, :, :, lo : lo + block_size].contiguous()
            chunk = KVChunk(block, torch.arange(lo, lo + block_size), keys.identity)
            items.append((keys.key(block_hash, prepared_id), chunk))
    store.put_many(items)
    return hashes
