"""Fused-KV export: write the KV kvfuse blended for a prompt as SGLang HiCache pages.

kvfuse prepares a prompt (``Engine.prefill`` → ``PrefillResult.fused``), then :func:`export_fused_kv` cuts the
fused KV into SGLang pages, names each page with SGLang's own chained page hash of the prompt's token ids
(:func:`connectors.engine_hashes.sglang_page_hashes`) plus the shard suffix of every tensor-parallel rank,
and stores them in the TieredStore that :class:`connectors.sglang_storage.KvfuseHiCacheStorage` reads. When
SGLang then receives exactly those token ids, its radix-tree miss triggers a storage prefetch; its
``batch_exists`` finds the pages and it loads them as an ordinary prefix hit: no SGLang change.

Only full pages are written (SGLang backs up and prefetches whole pages); the tokens of a trailing partial
page, and at least the prompt's last token, are computed by SGLang. Keys are post-RoPE at the prompt's own
positions 0..N-1, as SGLang caches them; the KV is cast to SGLang's KV dtype.

Scope. SGLang names a page by its token hashes alone, so KV exported under a request's plain page hashes
would serve every later request with that prefix. Blended KV is approximate: by default each export gets a
scope of its own, a fresh SGLang ``cache_salt`` (returned as ``ExportedPages.cache_salt``) that seeds the
page-hash chain; only the request that carries it finds the pages. ``exact=True`` exports into the shared
(unsalted) space, and is refused unless the :class:`FusedKV`'s stats show an exact prefill (no reused or
recomputed tokens: every token computed densely or an exact prefix hit).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import torch

from blending.fused import FusedKV
from connectors.common import is_exact
from connectors.engine_hashes import sglang_page_hashes
from connectors.sglang_storage import SGLangPageSpec, shard_suffix
from kvstore.chunk import KVChunk
from kvstore.keys import ChunkKey
from kvstore.store import TieredStore

__all__ = ["ExportedPages", "export_fused_kv", "rank_specs"]


class ExportedPages(list[str]):
    """The SGLang page hashes written, in prompt order. ``.tokens``: how many prompt tokens they cover;
    ``.cache_salt`` / ``.extra_key``: the SGLang namespace they were written in, which the request must carry
    (``None``: none)."""

    tokens: int = 0
    cache_salt: str | None = None
    extra_key: str | None = None


def rank_specs(
    *,
    model_name: str,
    layer_num: int,
    total_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype,
    tp_size: int = 1,
    pp_size: int = 1,
    namespace: str = "default",
    fingerprint: str | None = None,
) -> list[tuple[SGLangPageSpec, slice, slice]]:
    """One page spec per (tp rank, pp stage) of an MHA deployment, with the heads and layers it holds.

    SGLang shards KV heads evenly over TP ranks (heads replicated when there are fewer heads than ranks) and
    layers contiguously over PP stages (``layer_num // pp_size`` each, the remainder on the last stage).
    """
    if total_kv_heads % tp_size and tp_size % total_kv_heads:
        raise ValueError(f"{total_kv_heads} KV heads cannot be spread over {tp_size} TP ranks")
    per_rank = max(1, total_kv_heads // tp_size)
    base = layer_num // pp_size
    specs: list[tuple[SGLangPageSpec, slice, slice]] = []
    for pp in range(pp_size):
        lo = pp * base
        hi = layer_num if pp == pp_size - 1 else lo + base
        for tp in range(tp_size):
            h0 = tp * per_rank if tp_size <= total_kv_heads else tp * total_kv_heads // tp_size
            spec = SGLangPageSpec(
                layer_num=hi - lo,
                head_num=per_rank,
                head_dim=head_dim,
                page_size=page_size,
                dtype=dtype,
                suffix=shard_suffix(model_name, tp_rank=tp, tp_size=tp_size, pp_rank=pp, pp_size=pp_size),
                namespace=namespace,
                model_name=model_name,
                model_fingerprint=fingerprint,
            )
            specs.append((spec, slice(h0, h0 + per_rank), slice(lo, hi)))
    return specs


def export_fused_kv(
    store: TieredStore,
    fused: FusedKV | torch.Tensor,
    token_ids: Sequence[int] | torch.Tensor,
    *,
    model_name: str,
    page_size: int,
    dtype: torch.dtype = torch.bfloat16,
    tp_size: int = 1,
    pp_size: int = 1,
    namespace: str = "default",
    extra_key: str | None = None,
    cache_salt: str | None = None,
    max_tokens: int | None = None,
    fingerprint: str | None = None,
    exact: bool = False,
) -> ExportedPages:
    """Store ``fused`` (a :class:`FusedKV` or its ``[layers, 2, heads, N, head_dim]`` tensor) as SGLang pages.

    ``model_name``: SGLang's ``--served-model-name`` / model path as its storage config names it;
    ``fingerprint``: kvfuse's weight fingerprint, the backend's ``kvfuse_fingerprint`` (both or neither);
    ``namespace``: the ``kvfuse_namespace`` of the backend's extra config; ``extra_key`` / ``cache_salt``:
    the request's SGLang namespace. Unless ``exact``, a ``cache_salt`` is drawn when none is given (see the
    module docstring): send the request with ``ExportedPages.cache_salt``. ``exact=True``: the KV is a dense
    prefill's, shared with every request of that prefix (refused for blended KV and bare tensors).
    ``max_tokens``: export at most this many tokens (default: all full pages short of the prompt's last
    token, which SGLang must compute to produce logits). Returns the page hashes written.
    """
    if exact and not (isinstance(fused, FusedKV) and is_exact(fused)):
        raise ValueError(
            "exact=True needs a FusedKV from an exact prefill (no reused or recomputed tokens); blended KV is "
            "approximate and is exported under a per-request cache_salt instead"
        )
    if not exact and cache_salt is None:
        cache_salt = f"kvfuse-prepared-{uuid.uuid4().hex}"
    kv = fused.kv if isinstance(fused, FusedKV) else fused
    ids = [int(t) for t in (token_ids.tolist() if isinstance(token_ids, torch.Tensor) else token_ids)]
    if isinstance(fused, FusedKV) and fused.token_ids.tolist() != ids:
        raise ValueError("token_ids differ from the tokens the fused KV was computed for")
    if kv.dim() != 5 or kv.shape[1] != 2 or kv.shape[3] != len(ids):
        raise ValueError(f"fused KV must be [layers, 2, heads, {len(ids)}, head_dim], got {tuple(kv.shape)}")
    limit = len(ids) - 1 if max_tokens is None else min(max_tokens, len(ids))
    n_pages = max(0, limit) // page_size
    hashes = sglang_page_hashes(ids[: n_pages * page_size], page_size, extra_key=extra_key, cache_salt=cache_salt)
    layers, _, heads, _, head_dim = kv.shape
    items: list[tuple[ChunkKey, KVChunk]] = []
    for spec, head_slice, layer_slice in rank_specs(
        model_name=model_name,
        layer_num=layers,
        total_kv_heads=heads,
        head_dim=head_dim,
        page_size=page_size,
        dtype=dtype,
        tp_size=tp_size,
        pp_size=pp_size,
        namespace=namespace,
        fingerprint=fingerprint,
    ):
        shard = kv[layer_slice, :, head_slice].detach().to("cpu", dtype)
        for i, page_hash in enumerate(hashes):
            lo = i * page_size
            page = shard[:, :, :, lo : lo + page_size].contiguous()
            items.append((spec.key(page_hash), KVChunk(page, torch.arange(lo, lo + page_size), spec.fingerprint)))
    store.put_many(items)
    out = ExportedPages(hashes)
    out.tokens, out.cache_salt, out.extra_key = n_pages * page_size, cache_salt, extra_key
    return out
