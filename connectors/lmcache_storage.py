"""kvfuse as LMCache's remote storage, through LMCache's remote-storage-plugin mechanism (no LMCache change).

Why this way: LMCache 0.5.6 loads third-party remote connectors by configuration
(``remote_storage_plugins`` + ``extra_config["remote_storage_plugin.<name>.module_path" / ".class_name"]``,
handled by its ``ConnectorManager``; a ``RemoteConnector`` subclass is wrapped by its own
``DynamicConnectorAdapter``). Its chunks then flow through LMCache's usual ``RemoteBackend`` (CPU buffer,
prefetch, batched contains) into kvfuse's TieredStore, so LMCache gets kvfuse's SSD and shared Redis tiers,
checksummed blobs and byte budgets. The alternatives need more: the deprecated ``external://`` URL scheme
is slated for removal; speaking LMCache's ``lm://`` server protocol would tie kvfuse to a wire format LMCache
changes between releases; LMCache's own Redis connector would write LMCache's format, not kvfuse's (and
stores payload and metadata under two keys, LMCache#426).

LMCache config (YAML)::

    chunk_size: 256
    local_cpu: true
    max_local_cpu_size: 5
    remote_storage_plugins: ["kvfuse"]
    extra_config:
      remote_storage_plugin.kvfuse.module_path: connectors.lmcache_storage
      remote_storage_plugin.kvfuse.class_name: KvfuseRemoteConnector
      kvfuse_store: {cpu_bytes: 0, ssd_dir: /var/cache/kvfuse, redis_url: "redis://cache:6379/0"}
      kvfuse_namespace: default

Lazy base class: ``KvfuseLMCacheConnectorImpl`` has the logic; the module ``__getattr__`` builds
``KvfuseRemoteConnector(KvfuseLMCacheConnectorImpl, RemoteConnector)`` on first access.

Chunks: LMCache's ``KV_2LTD`` objects ``[2, layers, tokens, heads*head_dim]`` are stored as KVChunks
``[layers, 2, 1, tokens, heads*head_dim]`` and ``KV_MLA_FMT`` objects ``[1, layers, tokens, dim]`` as
``[layers, 2, 1, tokens, dim/2]`` (lossless; partial last chunks keep their token count). The kvfuse key is
:meth:`kvstore.keys.KeySpace.engine_key` of ``CacheEngineKey.to_string()`` (model, world size, worker, chunk
hash, dtype, tags) in the space of (model identity, memory format and KV dtype, ``kvfuse_namespace``). The
model identity is kvfuse's weight fingerprint when the extra config gives ``kvfuse_fingerprint``, else the
key's model name (LMCache exposes nothing else). A stored chunk of another dtype than LMCache's
``kv_dtype`` is a miss with a logged reason, never cast. Store I/O runs in worker threads, off LMCache's
event loop.
Refused at construction (LMCache then logs it and runs without this remote backend): ``use_layerwise``
(per-layer ``KV_T2D`` objects), a ``remote_serde`` other than ``naive`` (cachegen/kivi send opaque
``BINARY`` objects), and a scheduler-role engine (no ``LocalCPUBackend`` metadata). Chunks of hybrid models
with several KV layer groups, and chunks whose memory format is not the connector's (``KV_MLA_FMT`` for MLA
models, else ``KV_2LTD``: keys and gets use that one), are refused per put (LMCache counts them in
``put_failed_count``).

Verified against a full LMCache 0.5.6 install on CPU (``scripts/test-lmcache.sh``,
``tests/connectors/test_lmcache_real.py``): LMCache's loader builds this class, its ``RemoteBackend``
puts/gets through it, and one ``LMCacheEngine`` retrieves what another stored.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import torch

from connectors.common import FINGERPRINT_PARAM, model_identity, open_store, parse_kv_dtype
from kvstore.chunk import KVChunk, dtype_name
from kvstore.keys import ChunkKey, KeySpace
from kvstore.store import TieredStore

log = logging.getLogger(__name__)

__all__ = ["KvfuseLMCacheConnectorImpl", "from_kvchunk", "to_kvchunk"]
SUPPORTED_FORMATS = ("KV_2LTD", "KV_MLA_FMT")


def _fmt_name(fmt: Any) -> str:
    return str(getattr(fmt, "name", fmt))


def to_kvchunk(tensor: torch.Tensor, fmt: Any, fingerprint: str) -> KVChunk:
    """An LMCache memory object's tensor → a KVChunk (see the module docstring for the mapping)."""
    name = _fmt_name(fmt)
    t = tensor.detach().to("cpu")
    if name == "KV_2LTD":
        if t.dim() != 4 or t.shape[0] != 2:
            raise ValueError(f"KV_2LTD tensor must be [2, L, T, D], got {tuple(t.shape)}")
        kv = t.permute(1, 0, 2, 3).unsqueeze(2)
    elif name == "KV_MLA_FMT":
        if t.dim() != 4 or t.shape[0] != 1 or t.shape[3] % 2:
            raise ValueError(f"KV_MLA_FMT tensor must be [1, L, T, even D], got {tuple(t.shape)}")
        L, T, D = t.shape[1:]
        kv = t[0].reshape(L, T, 2, D // 2).permute(0, 2, 1, 3).unsqueeze(2)
    else:
        raise ValueError(f"kvfuse stores LMCache formats {SUPPORTED_FORMATS}, not {name}")
    tokens = kv.shape[3]
    return KVChunk(kv.contiguous(), torch.arange(tokens), fingerprint)


def from_kvchunk(chunk: KVChunk, fmt: Any) -> torch.Tensor:
    """Inverse of :func:`to_kvchunk`: the tensor LMCache's memory object holds."""
    kv = chunk.kv
    if _fmt_name(fmt) == "KV_2LTD":
        return kv[:, :, 0].permute(1, 0, 2, 3)
    L, _, _, T, half = kv.shape
    return kv[:, :, 0].permute(0, 2, 1, 3).reshape(1, L, T, 2 * half)


def _check_config(config: Any) -> None:
    """Refuse LMCache modes whose chunks are not whole ``KV_2LTD`` / ``KV_MLA_FMT`` tensors, once, up front."""
    if getattr(config, "use_layerwise", False):
        raise ValueError("kvfuse's LMCache connector does not support use_layerwise (per-layer KV_T2D objects)")
    serde = getattr(config, "remote_serde", None) or "naive"
    if serde != "naive":
        raise ValueError(f"kvfuse's LMCache connector needs remote_serde 'naive' (kvfuse checksums), not {serde!r}")


def _release(obj: Any) -> None:
    down = getattr(obj, "ref_count_down", None)
    if down is not None:
        down()


class KvfuseLMCacheConnectorImpl:
    """LMCache ``RemoteConnector`` logic on a TieredStore; use ``KvfuseRemoteConnector`` inside LMCache.

    Constructed as LMCache constructs plugin connectors: ``(loop=, local_cpu_backend=, config=)``.
    ``store``: use this store instead of opening ``config.extra_config["kvfuse_store"]``.
    """

    _ENGINE_BASE = False

    def __init__(self, loop: Any, local_cpu_backend: Any, config: Any, *, store: TieredStore | None = None):
        _check_config(config)
        metadata = getattr(local_cpu_backend, "metadata", None)
        if self._ENGINE_BASE:
            if metadata is None:  # LMCache's SafeLocalCPUBackend (scheduler role) carries no metadata
                raise ValueError("KvfuseRemoteConnector needs LMCache's LocalCPUBackend (a worker-role engine)")
            super().__init__(config, metadata)  # type: ignore[call-arg]
        self.loop = loop
        self.local_cpu_backend = local_cpu_backend
        extra: dict[str, Any] = dict(getattr(config, "extra_config", None) or {})
        self.namespace = str(extra.get("kvfuse_namespace", "default"))
        self.fingerprint: str | None = extra.get(FINGERPRINT_PARAM) or None
        dtype = extra.get("kvfuse_kv_dtype") or getattr(metadata, "kv_dtype", None)
        self.kv_dtype: torch.dtype | None = None if dtype is None else parse_kv_dtype(dtype)
        default_fmt = "KV_MLA_FMT" if getattr(metadata, "use_mla", False) else "KV_2LTD"
        self.fmt: Any = getattr(self, "meta_fmt", None) or default_fmt
        self.store, self._owns_store = open_store(extra, store)

    def _identity(self, key: Any) -> str:
        return model_identity(self.fingerprint, str(getattr(key, "model_name", "") or ""))

    def _key(self, key: Any) -> ChunkKey:
        layout = f"lmcache/{_fmt_name(self.fmt)}"
        if self.kv_dtype is not None:
            layout += f":{dtype_name(self.kv_dtype)}"
        return KeySpace(self._identity(key), layout, self.namespace).engine_key("lmcache", key.to_string())

    # -- sync core ----------------------------------------------------------------------------------------
    def exists_sync(self, key: Any) -> bool:
        return self.store.contains(self._key(key))

    def _get_sync(self, key: Any) -> Any:
        chunk = self.store.get(self._key(key))
        if chunk is None:
            return None
        if self.kv_dtype is not None and chunk.dtype != self.kv_dtype:  # never cast: a miss, LMCache recomputes
            log.warning("kvfuse: stored chunk is %s, LMCache's KV is %s: treated as a miss", chunk.dtype, self.kv_dtype)
            return None
        tensor = from_kvchunk(chunk, self.fmt)
        obj = self.local_cpu_backend.allocate(torch.Size(tensor.shape), tensor.dtype, self.fmt)
        if obj is None:
            log.warning("kvfuse: LMCache CPU buffer full; chunk not loaded")
            return None
        try:
            obj.tensor.copy_(tensor)
        except BaseException:
            _release(obj)  # hand the buffer back to LMCache's allocator
            raise
        return obj

    def _put_sync(self, key: Any, memory_obj: Any) -> None:
        shapes = memory_obj.get_shapes() if hasattr(memory_obj, "get_shapes") else None
        if shapes is not None and len(shapes) != 1:
            raise ValueError(f"kvfuse stores single-group LMCache chunks, got {len(shapes)} KV layer groups")
        fmt = getattr(getattr(memory_obj, "metadata", None), "fmt", None) or self.fmt
        if _fmt_name(fmt) != _fmt_name(self.fmt):
            # keys and gets use the connector's format: a chunk stored in another one would be read back wrongly
            raise ValueError(
                f"kvfuse's LMCache connector stores {_fmt_name(self.fmt)} chunks; refusing a {_fmt_name(fmt)} chunk"
            )
        if self.kv_dtype is not None and memory_obj.tensor.dtype != self.kv_dtype:
            raise ValueError(
                f"kvfuse's LMCache connector stores {self.kv_dtype} KV; refusing a {memory_obj.tensor.dtype} chunk"
            )
        chunk = to_kvchunk(memory_obj.tensor, fmt, self._identity(key))
        self.store.put(self._key(key), chunk)

    def remove_sync(self, key: Any) -> bool:
        return self.store.delete(self._key(key))

    # -- LMCache's async API ---------------------------------------------------------------------------------
    async def exists(self, key: Any) -> bool:
        return await asyncio.to_thread(self.exists_sync, key)

    async def get(self, key: Any) -> Any:
        return await asyncio.to_thread(self._get_sync, key)

    async def put(self, key: Any, memory_obj: Any) -> None:
        # The caller owns memory_obj's reference (LMCache's InstrumentedRemoteConnector drops it after this
        # returns). Errors propagate: LMCache's RemoteBackend logs them and counts put_failed_count.
        await asyncio.to_thread(self._put_sync, key, memory_obj)

    def support_batched_async_contains(self) -> bool:
        return True

    async def batched_async_contains(self, lookup_id: str, keys: list[Any], pin: bool = False) -> int:
        present = await asyncio.to_thread(self.store.contains_many, [self._key(k) for k in keys])
        return present.index(False) if False in present else len(present)

    async def list(self) -> list[str]:
        return []  # a content-addressed store is not enumerable by LMCache key

    async def close(self) -> None:
        if self._owns_store:
            await asyncio.to_thread(self.store.close)


_BUILT: dict[str, type] = {}


def __getattr__(name: str) -> type:
    if name != "KvfuseRemoteConnector":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _BUILT:
        try:
            from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector
        except ImportError as exc:
            raise ImportError(f"KvfuseRemoteConnector needs LMCache: {exc}") from exc
        _BUILT[name] = type(
            name,
            (KvfuseLMCacheConnectorImpl, RemoteConnector),
            {"__module__": __name__, "__doc__": KvfuseLMCacheConnectorImpl.__doc__, "_ENGINE_BASE": True},
        )
    return _BUILT[name]
