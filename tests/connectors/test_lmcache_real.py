"""kvfuse's LMCache plugin inside a REAL, fully installed LMCache 0.5.x on CPU.

LMCache's own code does everything here: ``CreateStorageBackends`` reads ``remote_storage_plugins`` and its
``ConnectorManager`` imports ``connectors.lmcache_storage.KvfuseRemoteConnector``; chunks are real
``TensorMemoryObj``s from LMCache's CPU allocator, keys real ``CacheEngineKey``s, and puts/gets go through its
``RemoteBackend`` and ``InstrumentedRemoteConnector``. The engine test runs two ``LMCacheEngine``s: one
stores, a fresh one (empty CPU buffer, other SSD dir, same Redis) retrieves the exact KV from kvfuse.

The one stand-in is the GPU connector (``CPUKVConnector``): it copies between a dense CPU KV tensor and
LMCache's memory objects where vLLM's connector runs CUDA kernels on the paged GPU cache.

Skipped unless ``lmcache`` imports (its full install pulls cupy / cuda-python); ``scripts/test-lmcache.sh``
builds a venv with it and runs this file.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

try:
    from lmcache.utils import CacheEngineKey
    from lmcache.v1.cache_engine import LMCacheEngineBuilder
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.gpu_connector.gpu_connectors import GPUConnectorInterface
    from lmcache.v1.memory_management import MemoryFormat
    from lmcache.v1.metadata import LMCacheMetadata
    from lmcache.v1.storage_backend import CreateStorageBackends
    from lmcache.v1.storage_backend.connector import SafeLocalCPUBackend
    from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector
except ImportError as exc:  # not installed, or installed --no-deps (its compiled ops are missing)
    pytest.skip(f"needs a full LMCache install ({exc}); see scripts/test-lmcache.sh", allow_module_level=True)

import connectors.lmcache_storage as lmc_storage

LAYERS, HEADS, HEAD_DIM, CHUNK = 3, 2, 8, 16


def _config(store: dict[str, Any], **overrides: Any) -> Any:
    return LMCacheEngineConfig.from_defaults(
        chunk_size=CHUNK, local_cpu=True, max_local_cpu_size=0.05, save_unfull_chunk=True,
        remote_storage_plugins=["kvfuse"],
        extra_config={
            "remote_storage_plugin.kvfuse.module_path": "connectors.lmcache_storage",
            "remote_storage_plugin.kvfuse.class_name": "KvfuseRemoteConnector",
            "kvfuse_store": store,
            "kvfuse_namespace": "test",
        },
        **overrides,
    )


def _metadata(mla: bool) -> Any:
    kv_shape = (LAYERS, 1, CHUNK, 1, 2 * HEAD_DIM) if mla else (LAYERS, 2, CHUNK, HEADS, HEAD_DIM)
    return LMCacheMetadata(model_name="kvfuse/test-model", world_size=1, local_world_size=1, worker_id=0,
                           local_worker_id=0, kv_dtype=torch.bfloat16, kv_shape=kv_shape, use_mla=mla,
                           chunk_size=CHUNK)


def _store(tmp_path: Path, name: str, redis_url: str) -> dict[str, Any]:
    return {"cpu_bytes": 0, "ssd_dir": str(tmp_path / name), "ssd_fsync": "never", "redis_url": redis_url}


@pytest.fixture(autouse=True)
def _no_usage_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMCACHE_TRACK_USAGE", "false")


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    thread = threading.Thread(target=lp.run_forever, daemon=True)
    thread.start()
    yield lp
    lp.call_soon_threadsafe(lp.stop)
    thread.join(5)
    lp.close()


def test_lmcache_loads_a_complete_remote_connector() -> None:
    cls: Any = lmc_storage.KvfuseRemoteConnector
    assert issubclass(cls, RemoteConnector) and not cls.__abstractmethods__


@pytest.mark.parametrize("mla", [False, True], ids=["KV_2LTD", "KV_MLA_FMT"])
def test_remote_backend_puts_and_gets_through_kvfuse(
    tmp_path: Path, redis_url: str, loop: asyncio.AbstractEventLoop, mla: bool
) -> None:
    md = _metadata(mla)
    backends = CreateStorageBackends(_config(_store(tmp_path, "ssd", redis_url)), md, loop)
    cpu, rb = backends["LocalCPUBackend"], backends["RemoteBackend-kvfuse"]
    inner: Any = rb.connection.getWrappedConnector()  # LMCache wraps every connector in InstrumentedRemoteConnector
    fmt = MemoryFormat.KV_MLA_FMT if mla else MemoryFormat.KV_2LTD
    assert inner.fmt is fmt and type(inner) is lmc_storage.KvfuseRemoteConnector

    def key(h: int) -> Any:
        return CacheEngineKey("kvfuse/test-model", 1, 0, h, torch.bfloat16)

    def filled(tokens: int) -> tuple[Any, torch.Tensor]:
        obj = cpu.allocate(md.get_shapes(tokens), md.get_dtypes(), fmt)
        obj.tensor.copy_(torch.randn(obj.tensor.shape).to(torch.bfloat16))
        return obj, obj.tensor.clone()

    try:
        full, full_ref = filled(CHUNK)
        part, part_ref = filled(5)  # a partial last chunk keeps its token count
        for h, obj in ((1, full), (3, part)):
            rb.submit_put_task(key(h), obj).result(10)
            assert obj.get_ref_count() == 1  # LMCache's put path released exactly its own references
            obj.ref_count_down()  # the writer's own; the buffer goes back to LMCache's allocator
        assert rb.contains(key(1)) and rb.contains(key(3)) and not rb.contains(key(2))

        got = rb.get_blocking(key(1))
        assert got.get_memory_format() is fmt and torch.equal(got.tensor, full_ref) and got.get_ref_count() == 1
        got.ref_count_down()
        got = rb.get_blocking(key(3))
        assert got.get_num_tokens() == 5 and torch.equal(got.tensor, part_ref)
        got.ref_count_down()
        assert rb.get_blocking(key(2)) is None

        objs = rb.batched_get_blocking([key(1), key(2)])
        assert torch.equal(objs[0].tensor, full_ref) and objs[1] is None
        objs[0].ref_count_down()

        def on_loop(coro: Any) -> Any:
            return asyncio.run_coroutine_threadsafe(coro, loop).result(10)

        assert on_loop(rb.batched_async_contains("q", [key(1), key(3), key(2)])) == 2
        prefetched = on_loop(rb.batched_get_non_blocking("q", [key(1), key(2), key(3)]))
        assert len(prefetched) == 1 and torch.equal(prefetched[0].tensor, full_ref)  # prefix up to the miss
        prefetched[0].ref_count_down()

        # An object kvfuse cannot store is a failed put that LMCache logs and counts, not a lost exception.
        bad = cpu.allocate(torch.Size([CHUNK, 2, 16]), torch.bfloat16, MemoryFormat.KV_T2D)
        with pytest.raises(ValueError, match="refusing a KV_T2D chunk"):  # LMCache itself never waits on this future
            rb.submit_put_task(key(4), bad).result(10)
        deadline = time.monotonic() + 5
        while rb.put_failed_count != 1:  # counted by the future's done-callback on LMCache's loop
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not rb.contains(key(4)) and bad.get_ref_count() == 1
        bad.ref_count_down()

        assert rb.remove(key(3)) and not rb.contains(key(3))
    finally:
        rb.close()  # closes the connector, which closes the store it opened (the CPU pool is left to GC)


def test_refused_modes_fail_at_construction(tmp_path: Path, redis_url: str) -> None:
    cls = lmc_storage.KvfuseRemoteConnector
    md = _metadata(False)
    store = _store(tmp_path, "ssd", redis_url)
    backend = type("CPUBackend", (), {"metadata": md})()
    with pytest.raises(ValueError, match="use_layerwise"):
        cls(loop=None, local_cpu_backend=backend, config=_config(store, use_layerwise=True))
    with pytest.raises(ValueError, match="remote_serde"):
        cls(loop=None, local_cpu_backend=backend, config=_config(store, remote_serde="cachegen"))
    with pytest.raises(ValueError, match="LocalCPUBackend"):  # what LMCache passes for a scheduler role
        cls(loop=None, local_cpu_backend=SafeLocalCPUBackend(_config(store)), config=_config(store))


class CPUKVConnector(GPUConnectorInterface):
    """Copies LMCache memory objects ``[2 or 1, L, n, D]`` to/from ``kv=[L, 2 or 1, T, D]`` (a CPU tensor)."""

    def __init__(self, kv_dim: int, hidden: int) -> None:
        self.kv_dim, self.hidden = kv_dim, hidden

    def from_gpu(self, memory_obj: Any, start: int, end: int, **kwargs: Any) -> None:
        memory_obj.tensor.copy_(kwargs["kv"][:, :, start:end].permute(1, 0, 2, 3))

    def to_gpu(self, memory_obj: Any, start: int, end: int, **kwargs: Any) -> None:
        kwargs["kv"][:, :, start:end] = memory_obj.tensor.permute(1, 0, 2, 3)

    def batched_from_gpu(self, memory_objs: Any, starts: Any, ends: Any, **kwargs: Any) -> None:
        for obj, start, end in zip(memory_objs, starts, ends, strict=True):
            self.from_gpu(obj, start, end, **kwargs)

    def batched_to_gpu(self, memory_objs: Any, starts: Any, ends: Any, **kwargs: Any) -> None:
        for obj, start, end in zip(memory_objs, starts, ends, strict=True):
            self.to_gpu(obj, start, end, **kwargs)

    def get_shape(self, num_tokens: int) -> torch.Size:
        return torch.Size([self.kv_dim, LAYERS, num_tokens, self.hidden])


@pytest.mark.parametrize("mla", [False, True], ids=["KV_2LTD", "KV_MLA_FMT"])
def test_one_engine_stores_a_fresh_engine_retrieves_from_kvfuse(tmp_path: Path, redis_url: str, mla: bool) -> None:
    md = _metadata(mla)
    kv_dim, hidden = md.get_shapes()[0][0], md.get_shapes()[0][3]

    def engine(name: str) -> Any:
        cfg = _config(_store(tmp_path, name, redis_url))
        eng = LMCacheEngineBuilder.get_or_create(f"kvfuse-{name}", cfg, md, CPUKVConnector(kv_dim, hidden),
                                                 lambda *a: None, lambda *a: None)
        eng.post_init()
        return eng

    tokens = torch.arange(1000, 1000 + 2 * CHUNK + 7)  # two full chunks and a partial one
    kv = torch.randn(LAYERS, kv_dim, len(tokens), hidden).to(torch.bfloat16)
    try:
        writer = engine("a")
        writer.store(tokens, kv=kv)
        deadline = time.monotonic() + 20
        while writer.storage_manager.storage_backends["RemoteBackend-kvfuse"].put_tasks:
            assert time.monotonic() < deadline, "remote puts did not finish"
            time.sleep(0.05)
    finally:
        LMCacheEngineBuilder.destroy("kvfuse-a")
    try:
        reader = engine("b")  # own CPU buffer and SSD dir: only the shared Redis tier has the chunks
        assert reader.lookup(tokens, lookup_id="r1", pin=True) == len(tokens)
        out = torch.zeros_like(kv)
        mask = reader.retrieve(tokens, kv=out, req_id="r1")
        reader.lookup_unpin("r1")
        assert bool(mask.all()) and torch.equal(out, kv)
        other = torch.arange(5000, 5000 + CHUNK)
        assert reader.lookup(other) == 0
    finally:
        LMCacheEngineBuilder.destroy("kvfuse-b")
