"""LMCache as the peer of ``kvfuse bench store``: its backends measured in the same run, on the same blobs.

Each backend runs through LMCache's own ``StorageManager``, end to end: a put allocates a memory object from
LMCache's CPU pool, copies the blob's bytes into it (copy in) and calls ``batched_put``, then waits until the
backend holds the key (LocalDisk and remote writes are asynchronous in LMCache: the wait is part of the
put); a get calls ``batched_get`` on that backend only and copies the result out into a tensor (copy out).

- ``cpu``: ``LocalCPUBackend`` (its pre-allocated pool; the get's copy out is counted, kvfuse's get is a
  zero-copy view, so that pair is not compared).
- ``ssd``: ``LocalDiskBackend`` (``local_cpu=False``: the CPU pool only stages), same directory and the
  same durability as kvfuse's ``--fsync never`` (LMCache does not fsync).
- ``redis``: LMCache's native RESP client (``resp://``) and its redis-py connector (``redis://``), on the
  same redis-server as kvfuse.

Only importable where LMCache is installed (``scripts/test-lmcache.sh`` builds such a venv):
:func:`available` says whether it is.
"""

from __future__ import annotations

import importlib.util
import os
import random
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any, Protocol
from urllib.parse import urlparse

import torch

from kvstore.hostmem import copy_bytes

BACKENDS: dict[str, tuple[str, ...]] = {
    "cpu": ("LocalCPUBackend",),
    "ssd": ("LocalDiskBackend",),
    "redis": ("resp", "redis-py"),
}
_WAIT_S = 60.0
_CLOSE_S = 5.0


def available() -> bool:
    """Whether LMCache (with its compiled parts) can be imported here."""
    if importlib.util.find_spec("lmcache") is None:
        return False
    try:
        import lmcache.v1.storage_backend.storage_manager  # noqa: F401
    except Exception:
        return False
    return True


def version() -> str:
    from importlib.metadata import version as v

    return v("lmcache")


class PeerShape(Protocol):
    """What the peer needs of a blob's shape (``workloads.bench_store.BlobShape`` is one)."""

    @property
    def layers(self) -> int: ...
    @property
    def kv_heads(self) -> int: ...
    @property
    def tokens(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def dtype(self) -> torch.dtype: ...


def lmcache_shape(shape: PeerShape) -> torch.Size:
    """The blob as LMCache sees it: ``[2, layers, tokens, heads * head_dim]`` (KV_2LTD)."""
    return torch.Size([2, shape.layers, shape.tokens, shape.kv_heads * shape.head_dim])


def config_for(
    kind: str, variant: str, *, nbytes: int, count: int, ssd_dir: str, redis_url: str | None, tokens: int = 256
) -> Any:
    """The ``LMCacheEngineConfig`` of one backend, sized for ``count`` blobs of ``nbytes`` (chunks of ``tokens``)."""
    from lmcache.v1.config import LMCacheEngineConfig

    pool_gb = max(0.05, (2 * count + 8) * nbytes / 1e9 * 1.2)  # puts and gets may both hold objects
    common: dict[str, Any] = {"chunk_size": tokens, "save_unfull_chunk": False, "max_local_cpu_size": pool_gb}
    if kind == "cpu":
        return LMCacheEngineConfig.from_defaults(local_cpu=True, **common)
    if kind == "ssd":
        return LMCacheEngineConfig.from_defaults(
            local_cpu=False, local_disk=f"file://{ssd_dir}/", max_local_disk_size=pool_gb * 2, **common
        )
    assert redis_url is not None
    where = urlparse(redis_url)
    scheme = "resp" if variant == "resp" else "redis"
    return LMCacheEngineConfig.from_defaults(
        local_cpu=False, remote_url=f"{scheme}://{where.hostname}:{where.port}", remote_serde="naive", **common
    )


def _memcpy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """The peer's copy in and out: kvfuse's own host copy (:func:`kvstore.hostmem.copy_bytes`), so that a
    ratio measures the stores, not two ways to copy (torch's parallel copy waits for its whole intra-op team,
    which on a busy machine measures the scheduler)."""
    copy_bytes(dst.view(torch.uint8).view(-1).numpy(), src.view(torch.uint8).view(-1).numpy())


class LMCachePeer:
    """One LMCache ``StorageManager`` with one backend under test."""

    def __init__(
        self, kind: str, variant: str, shape: PeerShape, *, count: int, ssd_dir: str, redis_url: str | None
    ) -> None:
        from lmcache.utils import CacheEngineKey
        from lmcache.v1.event_manager import EventManager
        from lmcache.v1.metadata import LMCacheMetadata
        from lmcache.v1.storage_backend.storage_manager import StorageManager

        os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
        self.kind, self.variant, self.shape = kind, variant, shape
        self._key_cls = CacheEngineKey
        # fresh keys per instance: a key left by an earlier run on the same server would look stored at once
        self._base = random.getrandbits(48) << 8
        nbytes = lmcache_shape(shape).numel() * shape.dtype.itemsize
        self.nbytes = nbytes
        cfg = config_for(
            kind, variant, nbytes=nbytes, count=count, ssd_dir=ssd_dir, redis_url=redis_url, tokens=shape.tokens
        )
        # LMCache sizes what a get allocates from its chunk size: one chunk is one blob of ``shape.tokens``
        kv_shape = (shape.layers, 2, shape.tokens, shape.kv_heads, shape.head_dim)
        meta = LMCacheMetadata(
            model_name="kvfuse/bench",
            world_size=1,
            local_world_size=1,
            worker_id=0,
            local_worker_id=0,
            kv_dtype=shape.dtype,
            kv_shape=kv_shape,
            use_mla=False,
            chunk_size=shape.tokens,
        )
        self.manager = StorageManager(cfg, meta, EventManager())
        names = [n for n in self.manager.storage_backends if n != "LocalCPUBackend" or kind == "cpu"]
        if len(names) != 1:
            raise RuntimeError(f"LMCache built backends {list(self.manager.storage_backends)} for {kind}")
        self.location = names[0]
        self.backend = self.manager.storage_backends[self.location]
        if kind == "redis":  # the remote backend connects in the background: not part of any put
            self._wait(lambda: getattr(self.backend, "connection", None) is not None)

    def key(self, i: int) -> Any:
        return self._key_cls("kvfuse/bench", 1, 0, self._base + i, self.shape.dtype)

    def put(self, i: int, src: torch.Tensor) -> None:
        """Copy in, ``batched_put``, and wait until the backend holds the key."""
        obj = self.manager.allocate(lmcache_shape(self.shape), self.shape.dtype)
        if obj is None:
            raise RuntimeError("LMCache's CPU pool is full")
        assert obj.tensor is not None
        _memcpy(obj.tensor, src)
        key = self.key(i)
        self.manager.batched_put([key], [obj])
        self._wait(lambda: self._holds(key))

    def _holds(self, key: Any) -> bool:
        in_flight = getattr(self.backend, "exists_in_put_tasks", None)  # LocalDisk, Remote: async writes
        if in_flight is not None and in_flight(key):
            return False
        return bool(self.backend.contains(key))

    def get(self, i: int, out: torch.Tensor) -> None:
        """``batched_get`` from the backend under test, then copy out into ``out``."""
        objs = self.manager.batched_get([self.key(i)], location=self.location)
        obj = objs[0] if objs else None
        if obj is None or obj.tensor is None:
            raise RuntimeError(f"LMCache {self.location} lost a blob it stored")
        _memcpy(out, obj.tensor)
        obj.ref_count_down()

    @staticmethod
    def _wait(done: Callable[[], bool]) -> None:
        deadline = time.perf_counter() + _WAIT_S
        while not done():
            if time.perf_counter() > deadline:
                raise TimeoutError("LMCache did not finish a put")
            time.sleep(0.0002)

    def close(self) -> None:
        self._avoid_close_deadlock()

        def close() -> None:
            with suppress(Exception):
                self.manager.close()

        # a last guard: whatever else blocks in LMCache's close must not hang the bench
        closer = threading.Thread(target=close, daemon=True, name="lmcache-close")
        closer.start()
        closer.join(_CLOSE_S)

    def _avoid_close_deadlock(self) -> None:
        """LMCache 0.5.6's RESP connector closes on its event loop with ``await pq_executor.shutdown()``, the
        *blocking* shutdown, which waits for a coroutine on that same loop: a deadlock, and its loop thread
        is not a daemon, so the process never exits. Point this instance at the awaitable shutdown."""
        remote = self.manager.storage_backends.get("RemoteBackend")
        connector = getattr(remote, "connection", None)
        unwrap = getattr(connector, "getWrappedConnector", None)
        connector = unwrap() if unwrap is not None else connector
        executor = getattr(connector, "pq_executor", None)
        if executor is not None and hasattr(executor, "shutdown_async"):
            executor.shutdown = executor.shutdown_async
