"""The LMCache remote-storage plugin against a real kvfuse store (SSD dir + real Redis).

LMCache is an optional extra (it pulls cupy/cuda-python): here ``CacheEngineKey``, the memory object and the
CPU backend's ``allocate`` are duck-typed mirrors of LMCache 0.5.6's (``to_string()``, ``.tensor``,
``.metadata.fmt``); with lmcache installed the real base class is checked too (last test, skipped otherwise).
``test_lmcache_real.py`` runs the plugin inside a full LMCache install (``scripts/test-lmcache.sh``).
"""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from connectors.lmcache_storage import KvfuseLMCacheConnectorImpl, from_kvchunk, to_kvchunk
from kvstore.config import StoreConfig
from kvstore.store import TieredStore


class Key(SimpleNamespace):
    def to_string(self) -> str:
        return f"{self.model_name}@1@0@{self.chunk_hash:x}@bfloat16"


class CPUBackend:
    def __init__(self, use_mla: bool = False) -> None:
        self.metadata = SimpleNamespace(use_mla=use_mla)

    def allocate(self, shape: torch.Size, dtype: torch.dtype, fmt: Any) -> Any:
        return SimpleNamespace(tensor=torch.empty(shape, dtype=dtype), metadata=SimpleNamespace(fmt=fmt))


@pytest.fixture
def store(tmp_path: Path, redis_url: str) -> Any:
    s = TieredStore.from_config(StoreConfig(cpu_bytes=0, ssd_dir=str(tmp_path / "ssd"), redis_url=redis_url,
                                            ssd_fsync="never"))
    yield s
    s.close()


@pytest.mark.parametrize(("fmt", "shape"), [("KV_2LTD", (2, 3, 256, 16)), ("KV_MLA_FMT", (1, 3, 100, 12))])
def test_chunks_round_trip_through_the_store(store: TieredStore, fmt: str, shape: tuple[int, ...]) -> None:
    conn = KvfuseLMCacheConnectorImpl(None, CPUBackend(fmt == "KV_MLA_FMT"), SimpleNamespace(extra_config={}),
                                      store=store)
    keys = [Key(model_name="m", chunk_hash=h) for h in (1, 2, 3)]
    data = torch.randn(shape).to(torch.bfloat16)
    obj = SimpleNamespace(tensor=data, metadata=SimpleNamespace(fmt=SimpleNamespace(name=fmt)))

    async def run() -> None:
        await conn.put(keys[0], obj)
        await conn.put(keys[1], obj)
        assert await conn.exists(keys[0]) and not await conn.exists(keys[2])
        assert await conn.batched_async_contains("q", keys) == 2
        got = await conn.get(keys[1])
        assert got is not None and torch.equal(got.tensor, data)
        assert await conn.get(keys[2]) is None

    asyncio.run(run())


def test_conversion_is_lossless_and_refuses_unknown_formats() -> None:
    t = torch.randn(2, 4, 7, 6)
    chunk = to_kvchunk(t, "KV_2LTD", "lmcache/m")
    assert chunk.num_tokens == 7 and torch.equal(from_kvchunk(chunk, "KV_2LTD"), t)
    with pytest.raises(ValueError, match="not KV_T2D"):
        to_kvchunk(torch.randn(7, 2, 6), "KV_T2D", "lmcache/m")


def test_refusals_removal_and_buffer_release(store: TieredStore) -> None:
    for bad in ({"use_layerwise": True}, {"remote_serde": "cachegen"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            KvfuseLMCacheConnectorImpl(None, CPUBackend(), SimpleNamespace(extra_config={}, **bad), store=store)
    conn = KvfuseLMCacheConnectorImpl(None, CPUBackend(), SimpleNamespace(extra_config={}, remote_serde="naive"),
                                      store=store)
    key = Key(model_name="m", chunk_hash=7)
    two_groups = SimpleNamespace(tensor=torch.zeros(2, 1, 4, 8), metadata=SimpleNamespace(fmt="KV_2LTD"),
                                 get_shapes=lambda: [torch.Size([2, 1, 4, 8])] * 2)
    with pytest.raises(ValueError, match="2 KV layer groups"):  # errors reach LMCache, which counts them
        asyncio.run(conn.put(key, two_groups))
    asyncio.run(conn.put(key, SimpleNamespace(tensor=torch.ones(2, 1, 4, 8), metadata=SimpleNamespace(fmt="KV_2LTD"))))
    released: list[int] = []

    class Broken:
        tensor = torch.zeros(3)  # wrong shape: the copy fails after LMCache's allocator handed out a buffer

        def ref_count_down(self) -> None:
            released.append(1)

    conn.local_cpu_backend.allocate = lambda *a: Broken()
    with pytest.raises(RuntimeError):
        asyncio.run(conn.get(key))
    assert released == [1]
    assert conn.remove_sync(key) and not conn.exists_sync(key)


def test_put_in_another_format_is_refused(store: TieredStore) -> None:
    """Keys and gets use the connector's format: a chunk in another one must fail the put, not be stored."""
    conn = KvfuseLMCacheConnectorImpl(None, CPUBackend(), SimpleNamespace(extra_config={}), store=store)
    key = Key(model_name="m", chunk_hash=9)
    mla_fmt = SimpleNamespace(name="KV_MLA_FMT")
    mla = SimpleNamespace(tensor=torch.randn(1, 3, 4, 8), metadata=SimpleNamespace(fmt=mla_fmt))
    with pytest.raises(ValueError, match="stores KV_2LTD chunks; refusing a KV_MLA_FMT"):
        asyncio.run(conn.put(key, mla))  # LMCache's RemoteBackend logs it and counts put_failed_count
    assert not conn.exists_sync(key)
    asyncio.run(conn.put(key, SimpleNamespace(tensor=torch.randn(2, 3, 4, 8), metadata=SimpleNamespace(fmt="KV_2LTD"))))
    assert conn.exists_sync(key)


@pytest.mark.skipif(importlib.util.find_spec("lmcache") is None, reason="lmcache not installed (optional extra)")
def test_real_remote_connector_base() -> None:
    try:
        from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector
    except ImportError as exc:  # e.g. installed --no-deps: its compiled device ops are missing
        pytest.skip(f"lmcache installed but not importable: {exc}")
    import connectors.lmcache_storage as mod

    cls = mod.KvfuseRemoteConnector
    assert issubclass(cls, RemoteConnector) and not getattr(cls, "__abstractmethods__", None)
