"""Fused-KV export to SGLang keeps approximate KV out of the shared exact-prefix space (issue #11, item 6).

SGLang keys pages by chained token hashes only, so blended (approximate) KV written under a request's plain
page hashes would be served to every later request with that prefix. By default an export therefore gets a
scope of its own (a fresh SGLang ``cache_salt``, returned for the request to carry); only KV from an exact
prefill (no reused or recomputed tokens) may be exported into the shared space, with ``exact=True``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from blending.fused import BlendStats, FusedKV
from connectors.engine_hashes import sglang_page_hashes
from connectors.sglang_export import export_fused_kv
from kvstore.config import StoreConfig
from kvstore.store import TieredStore
from tests.connectors.test_sglang_storage import HostPool, _backend

MODEL, P, L, H, D = "HuggingFaceTB/SmolLM2-135M-Instruct", 4, 2, 2, 8
IDS = list(range(300, 314))  # 14 tokens: 3 full pages exported (the last token is always computed)
BLENDED = BlendStats(total_tokens=14, exact_tokens=0, reused_tokens=9, recomputed_tokens=2, computed_tokens=3)
DENSE = BlendStats(total_tokens=14, computed_tokens=14)
PREFIX_HIT = BlendStats(total_tokens=14, exact_tokens=8, computed_tokens=6)


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = TieredStore.from_config(StoreConfig(cpu_bytes=0, ssd_dir=str(tmp_path / "ssd"), ssd_fsync="never"))
    yield s
    s.close()


def _fused(stats: BlendStats) -> FusedKV:
    n = len(IDS)
    return FusedKV(torch.randn(L, 2, H, n, D), torch.tensor(IDS), torch.arange(n), torch.zeros(8), stats)


def _export(store: TieredStore, fused: FusedKV | torch.Tensor, **kw: Any) -> Any:
    return export_fused_kv(store, fused, IDS, model_name=MODEL, page_size=P, dtype=torch.float32, namespace="t", **kw)


def _hits(store: TieredStore, **hash_kw: Any) -> int:
    """How many leading pages SGLang finds for a request with these ids (and namespace, if any)."""
    backend = _backend(store, HostPool("page_first", layers=L, heads=H, head_dim=D, page=P, pages=4))
    return backend.batch_exists(sglang_page_hashes(IDS, P, **hash_kw))


def test_blended_export_gets_a_scope_by_default(store: TieredStore) -> None:
    first = _export(store, _fused(BLENDED))
    assert len(first) == 3 and first.cache_salt
    assert _hits(store) == 0  # an unrelated request with the same prefix never gets the approximate KV
    assert _hits(store, cache_salt=first.cache_salt) == 3  # the prepared request (carrying the salt) does
    second = _export(store, _fused(BLENDED))
    assert second.cache_salt != first.cache_salt  # one scope per prepared request
    raw = _export(store, _fused(BLENDED).kv)  # a bare tensor says nothing about exactness: scoped too
    assert raw.cache_salt and _hits(store) == 0


def test_exact_only_for_kv_from_an_exact_prefill(store: TieredStore) -> None:
    with pytest.raises(ValueError, match="exact"):
        _export(store, _fused(BLENDED), exact=True)
    with pytest.raises(ValueError, match="exact"):
        _export(store, _fused(DENSE).kv, exact=True)  # exactness cannot be checked on a bare tensor
    assert _hits(store) == 0
    for stats in (DENSE, PREFIX_HIT):
        exported = _export(store, _fused(stats), exact=True)
        assert exported.cache_salt is None
        assert _hits(store) == 3  # exact KV is a plain prefix hit for every request


def test_a_given_namespace_is_the_scope(store: TieredStore) -> None:
    exported = _export(store, _fused(BLENDED), cache_salt="prepared-7")
    assert exported.cache_salt == "prepared-7"
    assert _hits(store) == 0 and _hits(store, cache_salt="prepared-7") == 3
    # an extra_key (a LoRA adapter, say) is shared by many requests: not a scope, a salt is still drawn
    keyed = _export(store, _fused(BLENDED), extra_key="lora-a")
    assert keyed.cache_salt and keyed.extra_key == "lora-a"
    assert _hits(store, extra_key="lora-a") == 0
    assert _hits(store, extra_key="lora-a", cache_salt=keyed.cache_salt) == 3


def test_vllm_export_refuses_blended_kv_in_the_exact_scope(store: TieredStore) -> None:
    """The vLLM export's default scope is the shared exact prefix: blended KV must name a prepared scope."""
    from connectors.vllm_keys import export_fused_kv_vllm

    with pytest.raises(ValueError, match="prepared_id"):
        export_fused_kv_vllm(store, _fused(BLENDED), IDS, model_name=MODEL, block_size=P, namespace="t")
    assert export_fused_kv_vllm(store, _fused(BLENDED), IDS, model_name=MODEL, block_size=P, prepared_id="p")
    assert export_fused_kv_vllm(store, _fused(DENSE), IDS, model_name=MODEL, block_size=P)
