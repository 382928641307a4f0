"""SGLang HiCache storage backend on kvfuse's TieredStore (CPU / SSD / shared Redis tiers).

Load it into an unpatched SGLang with::

    --enable-hierarchical-cache --hicache-storage-backend dynamic \\
    --hicache-storage-backend-extra-config '{"backend_name": "kvfuse",
        "module_path": "connectors.sglang_storage", "class_name": "KvfuseHiCacheStorage",
        "interface_v1": 1, "kvfuse_store": {"cpu_bytes": 4294967296, "ssd_dir": "/var/cache/kvfuse",
        "redis_url": "redis://cache:6379/0"}, "kvfuse_namespace": "default"}'

Lazy base class: this module imports without SGLang. ``KvfuseHiCacheStorageImpl`` holds all the logic and
no SGLang base; the name ``KvfuseHiCacheStorage`` is resolved by the module ``__getattr__`` on first access
(which is what SGLang's ``StorageBackendFactory`` does with ``getattr(module, class_name)``): it imports
``sglang.srt.mem_cache.hicache_storage.HiCacheStorage`` and builds, once, the class
``KvfuseHiCacheStorage(KvfuseHiCacheStorageImpl, HiCacheStorage)``, which passes the factory's
``issubclass`` check. Without SGLang, accessing that name raises ImportError with the reason.

Pages. SGLang keys a page by its chained SHA-256 hex digest (see :mod:`connectors.engine_hashes`), made
unique per shard by the same suffixes as its file backend: ``_{model}_{tp_rank}_{tp_size}`` (+
``_{pp_size}_{pp_rank}``, ``_cp{rank}_{size}``) for MHA; MLA KV is replicated over TP, so MLA keys carry
no TP part and only the storage-writer rank writes. The kvfuse key of a page is
:meth:`kvstore.keys.KeySpace.engine_key` of the suffixed SGLang key in the space of (model identity, page
geometry with dtype, ``kvfuse_namespace``): two pools of different shape or dtype never share a key. The
model identity is kvfuse's weight fingerprint if the extra config gives it (``"kvfuse_fingerprint"``), else
the served model name (SGLang exposes nothing else); :mod:`connectors.sglang_pages` has the details.

Every page is stored canonically, as a :class:`~kvstore.chunk.KVChunk` ``[layers, 2, heads, page, head_dim]``,
whatever host layout wrote it: ``layer_first``, ``page_first``,
``page_first_direct`` and ``page_head`` (MHA) and ``layer_first`` / ``page_first`` / ``page_first_direct``
(MLA) pages are converted on the way in and out, so instances with different ``--hicache-mem-layout``
share pages, and kvfuse can write pages itself (:mod:`connectors.sglang_export`). MLA pages
``[layers, page, 1, kv_cache_dim]`` are stored losslessly as ``[layers, 2, 1, page, kv_cache_dim / 2]``
(the latent's two halves). kvfuse stores float32 / float16 / bfloat16 KV only: an fp8 KV cache is refused
when the host pool is registered. SGLang hands storage backends pages by chained hash, not by position: a
page is only ever looked up as part of a prefix (the chain fixes where it sits), so the chunk's positions are
not meaningful and are stored as ``0 .. page_size - 1``.

Both of SGLang's data paths work: the generic one (``batch_get`` into flat pages, ``batch_set`` of flat
pages) and, with ``"interface_v1": 1`` in the extra config, the zero-copy one (``batch_get_v1`` /
``batch_set_v1`` with host indices, reading and writing the registered host pool through its own
``get_data_page`` / ``set_from_flat_data_page``). The v2 pool-transfer API (hybrid Mamba/SWA/DSA models) is
not implemented: SGLang only uses it for those model families, which kvfuse does not serve.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from connectors.common import FINGERPRINT_PARAM, open_store
from connectors.sglang_pages import (
    MHA_LAYOUTS,
    MLA_LAYOUTS,
    SGLangPageSpec,
    flat_shape,
    page_from_flat,
    page_to_flat,
    shard_suffix,
)
from kvstore.chunk import KVChunk
from kvstore.keys import ChunkKey
from kvstore.store import TieredStore

log = logging.getLogger(__name__)

__all__ = [
    "MHA_LAYOUTS",
    "MLA_LAYOUTS",
    "KvfuseHiCacheStorageImpl",
    "SGLangPageSpec",
    "page_from_flat",
    "page_to_flat",
    "shard_suffix",
]


def _cfg(storage_config: Any, name: str, default: Any) -> Any:
    value = getattr(storage_config, name, default)
    return default if value is None else value


class KvfuseHiCacheStorageImpl:
    """The backend's logic (SGLang's ``HiCacheStorage`` API); use ``KvfuseHiCacheStorage`` inside SGLang.

    ``storage_config``: SGLang's ``HiCacheStorageConfig`` (tp/pp/cp ranks, ``is_mla_model``, ``model_name``,
    ``extra_config``). ``extra_config["kvfuse_store"]``: :class:`~kvstore.config.StoreConfig` fields for the
    store this backend opens (``{"cpu_bytes": ...}`` by default); ``store``: use this store instead (shared
    with an in-process kvfuse, and not closed by :meth:`close`).
    """

    def __init__(self, storage_config: Any, kwargs: dict[str, Any] | None = None, *, store: TieredStore | None = None):
        extra: dict[str, Any] = dict(_cfg(storage_config, "extra_config", {}) or {})
        self.storage_config = storage_config
        self.is_mla = bool(_cfg(storage_config, "is_mla_model", False))
        self.model_name = str(_cfg(storage_config, "model_name", ""))
        self.namespace = str(extra.get("kvfuse_namespace", "default"))
        self.model_fingerprint: str | None = extra.get(FINGERPRINT_PARAM) or None
        self.suffix = shard_suffix(
            self.model_name,
            tp_rank=int(_cfg(storage_config, "tp_rank", 0)),
            tp_size=int(_cfg(storage_config, "tp_size", 1)),
            pp_rank=int(_cfg(storage_config, "pp_rank", 0)),
            pp_size=int(_cfg(storage_config, "pp_size", 1)),
            attn_cp_rank=int(_cfg(storage_config, "attn_cp_rank", 0)),
            attn_cp_size=int(_cfg(storage_config, "attn_cp_size", 1)),
            is_mla=self.is_mla,
        )
        # MLA replicas share pages: one writer (SGLang's own rule, HiCacheStorageConfig.is_storage_writer).
        self.is_writer = bool(getattr(storage_config, "is_storage_writer", True))
        self.store, self._owns_store = open_store(extra, store)
        self.mem_pool_host: Any = None
        self.spec: SGLangPageSpec | None = None
        self.layout: str = ""

    # -- host pool ------------------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Learn the page geometry and layout from SGLang's host pool (MHA or MLA)."""
        layout = str(mem_pool_host.layout)
        is_mla = self.is_mla or hasattr(mem_pool_host, "kv_cache_dim")
        if is_mla:
            head_num, head_dim = 1, int(mem_pool_host.kv_cache_dim)
        else:
            head_num, head_dim = int(mem_pool_host.head_num), int(mem_pool_host.head_dim)
            v_dim = int(getattr(mem_pool_host, "v_head_dim", head_dim) or head_dim)
            if v_dim != head_dim:
                raise ValueError(f"kvfuse stores K and V of equal width; this pool has {head_dim} and {v_dim}")
        spec = SGLangPageSpec(
            layer_num=int(mem_pool_host.layer_num),
            head_num=head_num,
            head_dim=head_dim,
            page_size=int(mem_pool_host.page_size),
            dtype=mem_pool_host.dtype,
            suffix=self.suffix,
            is_mla=is_mla,
            namespace=self.namespace,
            model_name=self.model_name,
            model_fingerprint=self.model_fingerprint,
        )
        flat_shape(spec, layout)  # refuse unknown layouts now, not on the first transfer
        self.mem_pool_host, self.spec, self.layout, self.is_mla = mem_pool_host, spec, layout, is_mla

    def register_mem_host_pool_v2(self, host_pool: Any, host_pool_name: Any) -> None:
        if str(getattr(host_pool_name, "value", host_pool_name)) != "kv":
            raise NotImplementedError(
                f"kvfuse stores attention KV pages only; host pool {host_pool_name!s} (hybrid/sidecar models) "
                "is not supported"
            )
        if self.mem_pool_host is None:
            self.register_mem_pool_host(host_pool)

    def on_host_pools_registered(self) -> None:
        if self.spec is None:
            raise RuntimeError("no host KV pool was registered with the kvfuse storage backend")

    def _spec(self) -> SGLangPageSpec:
        if self.spec is None:
            raise RuntimeError("register_mem_pool_host was not called")
        return self.spec

    # -- page conversion ------------------------------------------------------------------------------
    def _chunk(self, flat: torch.Tensor) -> KVChunk:
        spec = self._spec()
        kv = page_from_flat(flat.detach().to("cpu"), spec, self.layout)
        # prefix-only pages keyed by chained hashes: the position within the prompt is not known here and is
        # never used (see the module docstring)
        return KVChunk(kv, torch.arange(spec.page_size), spec.fingerprint)

    def _flat(self, chunk: KVChunk) -> torch.Tensor | None:
        spec = self._spec()
        expected = (spec.layer_num, 2, spec.head_num if not spec.is_mla else 1, spec.page_size)
        if tuple(chunk.kv.shape[:4]) != expected or chunk.kv.dtype != spec.dtype:
            # never cast or reshape: a page of another dtype or geometry is a miss (SGLang recomputes it)
            log.warning("kvfuse: stored page is %s %s, the host pool holds %s %s: treated as a miss",
                        tuple(chunk.kv.shape), chunk.dtype, expected, spec.dtype)
            return None
        return page_to_flat(chunk.kv, spec, self.layout)

    # -- generic path -----------------------------------------------------------------------------------
    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> torch.Tensor | None:
        return self.batch_get([key], [target_location] if target_location is not None else None)[0]

    def batch_get(
        self, keys: list[str], target_locations: Any = None, target_sizes: Any = None
    ) -> list[torch.Tensor | None]:
        spec = self._spec()
        chunks = self.store.get_many([spec.key(k) for k in keys])
        out: list[torch.Tensor | None] = []
        targets = list(target_locations) if target_locations is not None else [None] * len(keys)
        for chunk, target in zip(chunks, targets, strict=True):
            flat = self._flat(chunk) if chunk is not None else None
            if flat is not None and target is not None:
                target.view(-1).copy_(flat.to(target.device))
                flat = target
            out.append(flat)
        return out

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(
        self, keys: list[str], values: Any = None, target_locations: Any = None, target_sizes: Any = None
    ) -> bool:
        if values is None or len(values) != len(keys):
            return False
        if not self.is_writer:
            return True
        spec = self._spec()
        try:
            items = [(spec.key(k), self._chunk(v)) for k, v in zip(keys, values, strict=True)]
        except ValueError as exc:
            log.error("kvfuse: refusing pages: %s", exc)
            return False
        self.store.put_many(items)
        return True

    def exists(self, key: str) -> bool:
        return self.store.contains(self._spec().key(key))

    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        """How many leading keys are stored (SGLang's prefix semantics)."""
        present = self.store.contains_many([self._spec().key(k) for k in keys])
        return present.index(False) if False in present else len(present)

    # -- zero-copy path (interface_v1) ----------------------------------------------------------------------
    def _page_starts(self, keys: Sequence[str], host_indices: torch.Tensor) -> list[int] | None:
        page = self._spec().page_size
        if host_indices.numel() != len(keys) * page:
            log.error("kvfuse: %d host indices for %d pages of %d", host_indices.numel(), len(keys), page)
            return None
        return [int(host_indices[i * page].item()) for i in range(len(keys))]

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        starts = self._page_starts(keys, host_indices)
        if starts is None:
            return [False] * len(keys)
        chunks = self.store.get_many([self._spec().key(k) for k in keys])
        ok: list[bool] = []
        for start, chunk in zip(starts, chunks, strict=True):
            flat = self._flat(chunk) if chunk is not None else None
            if flat is not None:
                self.mem_pool_host.set_from_flat_data_page(start, flat)
            ok.append(flat is not None)
        return ok

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        starts = self._page_starts(keys, host_indices)
        if starts is None:
            return [False] * len(keys)
        if not self.is_writer:
            return [True] * len(keys)
        spec = self._spec()
        items: list[tuple[ChunkKey, KVChunk]] = []
        ok: list[bool] = []
        for k, s in zip(keys, starts, strict=True):
            try:  # as in batch_set: a bad page is reported to SGLang, never raised into its storage thread
                items.append((spec.key(k), self._chunk(self.mem_pool_host.get_data_page(s, flat=True))))
            except ValueError as exc:
                log.error("kvfuse: refusing page %s: %s", k, exc)
                ok.append(False)
                continue
            ok.append(True)
        if items:
            self.store.put_many(items)
        return ok

    # -- lifecycle ------------------------------------------------------------------------------------------
    def clear(self) -> None:
        """SGLang's flush_cache: the kvfuse store is shared with other instances and kvfuse, so it is kept."""
        log.info("kvfuse: clear() leaves the shared store intact (evict through kvfuse's budgets instead)")

    def get_stats(self) -> dict[str, Any]:
        s = self.store.stats()
        return {"gets": s.gets, "hits": s.hits, "puts": s.puts}

    def close(self) -> None:
        if self._owns_store:
            self.store.close()


_BUILT: dict[str, type] = {}


def __getattr__(name: str) -> type:
    if name != "KvfuseHiCacheStorage":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _BUILT:
        try:
            from sglang.srt.mem_cache.hicache_storage import HiCacheStorage
        except ImportError as exc:
            raise ImportError(
                f"KvfuseHiCacheStorage needs SGLang (sglang.srt.mem_cache.hicache_storage): {exc}"
            ) from exc
        _BUILT[name] = type(
            "KvfuseHiCacheStorage",
            (KvfuseHiCacheStorageImpl, HiCacheStorage),
            {"__module__": __name__, "__doc__": KvfuseHiCacheStorageImpl.__doc__},
        )
    return _BUILT[name]
