"""One key derivation for the engine connectors (issue #11, item 7).

Every storage key a connector uses comes from :meth:`kvstore.keys.KeySpace.engine_key`: the model identity
is kvfuse's weight fingerprint when configured (``kvfuse_fingerprint``; the engine's model name otherwise),
the layout carries the KV dtype, and a stored block of another dtype is a miss with a logged reason, never
cast. The engines' own page/block hashes are unchanged (tests/connectors/test_*_hashes.py).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from connectors.engine_hashes import sglang_page_hashes
from connectors.lmcache_storage import KvfuseLMCacheConnectorImpl, to_kvchunk
from connectors.sglang_export import export_fused_kv
from connectors.sglang_storage import SGLangPageSpec
from connectors.vllm_connector import KvfuseConnectorImpl, VLLMBlockKeys, export_fused_kv_vllm
from kvstore.chunk import KVChunk
from kvstore.config import StoreConfig
from kvstore.keys import KeySpace
from kvstore.store import TieredStore
from tests.connectors.test_lmcache_storage import CPUBackend, Key
from tests.connectors.test_sglang_storage import HostPool, _backend
from tests.connectors.test_vllm_connector import BS, MODEL, D, H, L, _caches, _request, _step, _vllm_config


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = TieredStore.from_config(StoreConfig(cpu_bytes=1 << 26, ssd_dir=str(tmp_path / "ssd"), ssd_fsync="never"))
    yield s
    s.close()


# -- SGLang ------------------------------------------------------------------------------------------------
def test_sglang_keys_come_from_kvstore_keys() -> None:
    spec = SGLangPageSpec(2, 1, 4, 2, torch.bfloat16, "_m_0_1", namespace="t", model_name="m", model_fingerprint="fp")
    page = "ab" * 32
    assert spec.key(page) == KeySpace("fp", "sglang/mha/l2h1d4p2:bfloat16", "t").engine_key("sglang", page + "_m_0_1")
    named = SGLangPageSpec(2, 1, 4, 2, torch.bfloat16, "_m_0_1", namespace="t", model_name="m")
    assert named.key(page) == KeySpace("name:m", "sglang/mha/l2h1d4p2:bfloat16", "t").engine_key(
        "sglang", page + "_m_0_1"
    )


def test_sglang_pages_are_keyed_by_the_weight_fingerprint(store: TieredStore) -> None:
    ids = list(range(20, 29))
    fused = torch.randn(2, 2, 1, len(ids), 4)
    export_fused_kv(store, fused, ids, model_name=MODEL, page_size=4, dtype=torch.float32, namespace="t",
                    fingerprint="weights-A", cache_salt="s")
    hashes = sglang_page_hashes(ids, 4, cache_salt="s")
    pool = HostPool("page_first", layers=2, heads=1, head_dim=4, page=4, pages=3)
    assert _backend(store, pool, kvfuse_fingerprint="weights-A").batch_exists(hashes) == 2
    # same model name, other weights (a fine-tune served under the same name): no shared KV
    assert _backend(store, pool, kvfuse_fingerprint="weights-B").batch_exists(hashes) == 0
    assert _backend(store, pool).batch_exists(hashes) == 0  # name-only identity is another key space


def test_sglang_page_of_another_dtype_is_a_logged_miss(store: TieredStore, caplog: pytest.LogCaptureFixture) -> None:
    pool = HostPool("page_first", layers=2, heads=1, head_dim=4, page=4, pages=3)
    backend = _backend(store, pool)
    page = sglang_page_hashes(list(range(4)), 4)[0]
    foreign = KVChunk(torch.randn(2, 2, 1, 4, 4, dtype=torch.float16), torch.arange(4), backend._spec().fingerprint)
    store.put(backend._spec().key(page), foreign)  # mislabeled: a float16 page under the float32 pool's key
    with caplog.at_level(logging.WARNING):
        assert backend.batch_get([page]) == [None]
    assert "float16" in caplog.text


# -- vLLM --------------------------------------------------------------------------------------------------
def test_vllm_keys_come_from_kvstore_keys() -> None:
    keys = VLLMBlockKeys("m", "t", 1, 2, dtype=torch.bfloat16, block_size=16, fingerprint="fp")
    block = b"\x07" * 32
    space = KeySpace("fp", "vllm/tp1of2/b16:bfloat16", "t")
    assert keys.key(block) == space.engine_key("vllm", block, scope="prefix")
    assert keys.key(block, "p1") == space.engine_key("vllm", block, scope="prepared:p1")
    f16 = VLLMBlockKeys("m", "t", 1, 2, dtype=torch.float16, block_size=16, fingerprint="fp")
    assert f16.key(block) != keys.key(block)  # the dtype is part of the key


def test_vllm_block_of_another_dtype_is_not_cast(store: TieredStore, caplog: pytest.LogCaptureFixture) -> None:
    ids = list(range(40, 49))  # 2 usable blocks
    fused = torch.randn(L, 2, H, len(ids), D)
    # exported as float16 while the engine runs bfloat16: another key space, so no hit at all
    export_fused_kv_vllm(store, fused, ids, model_name=MODEL, block_size=BS, namespace="t", dtype=torch.float16)
    sched = KvfuseConnectorImpl(_vllm_config(), "scheduler", store=store)
    assert sched.get_num_new_matched_tokens(_request("a", ids), 0) == (0, False)
    # a float16 block stored under the bfloat16 key (a mislabeled writer): refused at load, reported, not cast
    export_fused_kv_vllm(store, fused, ids, model_name=MODEL, block_size=BS, namespace="t")
    worker = KvfuseConnectorImpl(_vllm_config(), "worker", store=store)
    caches = _caches()
    worker.register_kv_caches(caches)
    req = _request("b", ids)
    key = worker.keys.key(req.block_hashes[1])
    good = store.get(key)
    assert good is not None
    store.put(key, KVChunk(good.kv.to(torch.float16), good.positions, good.fingerprint))
    with caplog.at_level(logging.WARNING):
        assert _step(sched, worker, req, [3, 4, 5]) == 2 * BS
    assert worker.get_block_ids_with_load_errors() == {4}
    assert "float16" in caplog.text
    assert caches["model.layers.0.self_attn.attn"][4].abs().sum() == 0  # untouched: vLLM recomputes it


def test_vllm_fingerprint_and_dtype_from_config(store: TieredStore) -> None:
    ids = list(range(60, 69))
    fused = torch.randn(L, 2, H, len(ids), D)
    export_fused_kv_vllm(store, fused, ids, model_name=MODEL, block_size=BS, namespace="t", fingerprint="weights-A")

    def matched(**extra: Any) -> int:
        cfg = _vllm_config()
        cfg.kv_transfer_config.kv_connector_extra_config.update(extra)
        return KvfuseConnectorImpl(cfg, "scheduler", store=store).get_num_new_matched_tokens(_request("r", ids), 0)[0]

    assert matched(kvfuse_fingerprint="weights-A") == 2 * BS
    assert matched(kvfuse_fingerprint="weights-B") == 0
    assert matched() == 0  # name-only identity
    assert matched(kvfuse_fingerprint="weights-A", kvfuse_kv_dtype="float16") == 0
    worker = KvfuseConnectorImpl(_vllm_config(), "worker", store=store)
    with pytest.raises(ValueError, match="dtype"):  # caches of another dtype than the keys say: refused
        worker.register_kv_caches({k: v.to(torch.float16) for k, v in _caches().items()})
    cfg = _vllm_config()
    cfg.cache_config.cache_dtype = "fp8"
    with pytest.raises(ValueError, match="fp8"):
        KvfuseConnectorImpl(cfg, "scheduler", store=store)


# -- LMCache -----------------------------------------------------------------------------------------------
def _lmcache(store: TieredStore, **extra: Any) -> KvfuseLMCacheConnectorImpl:
    backend = CPUBackend()
    backend.metadata.kv_dtype = torch.bfloat16
    return KvfuseLMCacheConnectorImpl(None, backend, SimpleNamespace(extra_config=extra), store=store)


def test_lmcache_keys_come_from_kvstore_keys(store: TieredStore) -> None:
    key = Key(model_name="m", chunk_hash=5)
    conn = _lmcache(store, kvfuse_namespace="t", kvfuse_fingerprint="fp")
    assert conn._key(key) == KeySpace("fp", "lmcache/KV_2LTD:bfloat16", "t").engine_key("lmcache", key.to_string())
    assert _lmcache(store, kvfuse_namespace="t")._key(key) == KeySpace(
        "name:m", "lmcache/KV_2LTD:bfloat16", "t"
    ).engine_key("lmcache", key.to_string())


def test_lmcache_fingerprint_and_dtype(store: TieredStore, caplog: pytest.LogCaptureFixture) -> None:
    key = Key(model_name="m", chunk_hash=6)
    a, b = _lmcache(store, kvfuse_fingerprint="weights-A"), _lmcache(store, kvfuse_fingerprint="weights-B")
    data = torch.randn(2, 3, 8, 16).to(torch.bfloat16)
    asyncio.run(a.put(key, SimpleNamespace(tensor=data, metadata=SimpleNamespace(fmt="KV_2LTD"))))
    assert a.exists_sync(key) and not b.exists_sync(key)
    store.put(a._key(key), to_kvchunk(data.to(torch.float16), "KV_2LTD", "x"))  # mislabeled dtype
    with caplog.at_level(logging.WARNING):
        assert asyncio.run(a.get(key)) is None
    assert "float16" in caplog.text
