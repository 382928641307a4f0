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
no TP part and only the storage-writer rank writes. A kvfuse key is the xxh3-128 of (kvfuse namespace, page
geometry, dtype, suffixed SGLang key): two pools of different shape never share a key.

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
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from connectors.common import open_store
from kvstore.chunk import SUPPORTED_DTYPES, KVChunk, dtype_name
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

MHA_LAYOUTS = ("layer_first", "page_first", "page_first_direct", "page_head")
MLA_LAYOUTS = ("layer_first", "page_first", "page_first_direct")
_SEP = b"\x1f"


def shard_suffix(
    model_name: str | None,
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
    pp_rank: int = 0,
    pp_size: int = 1,
    attn_cp_rank: int = 0,
    attn_cp_size: int = 1,
    is_mla: bool = False,
) -> str:
    """The per-shard key suffix SGLang's own file backend appends (``HiCacheFile.config_suffix``)."""
    model = "-".join(model_name.split("/")) if model_name else ""
    shard = f"_{pp_size}_{pp_rank}" if pp_size > 1 else ""
    if attn_cp_size > 1:
        shard += f"_cp{attn_cp_rank}_{attn_cp_size}"
    return f"_{model}{shard}" if is_mla else f"_{model}_{tp_rank}_{tp_size}{shard}"


@dataclass(frozen=True)
class SGLangPageSpec:
    """What a stored page is: one shard's geometry and the key suffix of that shard.

    MHA: ``head_num`` KV heads of this shard (total / tp_size) of ``head_dim``; MLA: ``head_num`` is 1 and
    ``head_dim`` is ``kv_cache_dim`` (latent + rope dims).
    """

    layer_num: int
    head_num: int
    head_dim: int
    page_size: int
    dtype: torch.dtype
    suffix: str
    is_mla: bool = False
    namespace: str = "default"
    model_name: str = ""

    def __post_init__(self) -> None:
        if min(self.layer_num, self.head_num, self.head_dim, self.page_size) <= 0:
            raise ValueError(f"invalid page geometry {self}")
        if self.dtype not in SUPPORTED_DTYPES.values():
            raise ValueError(
                f"kvfuse stores {sorted(SUPPORTED_DTYPES)} KV; the SGLang KV cache is {self.dtype} "
                "(run SGLang with --kv-cache-dtype auto on a float16/bfloat16/float32 model)"
            )
        if self.is_mla and (self.head_num != 1 or self.head_dim % 2):
            raise ValueError("an MLA page has one latent head of even width")

    @property
    def fingerprint(self) -> str:
        return f"sglang/{self.model_name}"

    @property
    def page_numel(self) -> int:
        return self.layer_num * self.page_size * self.head_num * self.head_dim * (1 if self.is_mla else 2)

    def _tag(self) -> bytes:
        kind = "mla" if self.is_mla else "mha"
        return (
            f"{kind}/l{self.layer_num}h{self.head_num}d{self.head_dim}p{self.page_size}:{dtype_name(self.dtype)}"
        ).encode()

    def key(self, page_key: str) -> ChunkKey:
        """kvfuse key of SGLang page ``page_key`` (a page hash, or a page hash with a pool suffix)."""
        h = xxhash.xxh3_128(_SEP.join([b"kvfuse/sglang/v1", self.namespace.encode(), self._tag()]))
        h.update(_SEP)
        h.update((page_key + self.suffix).encode())
        return ChunkKey(h.digest())


def _flat_shape(spec: SGLangPageSpec, layout: str) -> tuple[int, ...]:
    L, P, H, D = spec.layer_num, spec.page_size, spec.head_num, spec.head_dim
    if spec.is_mla:
        shapes = {"layer_first": (L, P, 1, D), "page_first": (P, L, 1, D), "page_first_direct": (1, L, P, 1, D)}
    else:
        shapes = {
            "layer_first": (2, L, P, H, D),
            "page_first": (2, P, L, H, D),
            "page_first_direct": (2, 1, L, P, H, D),
            "page_head": (2, 1, H, P, L, D),
        }
    if layout not in shapes:
        raise ValueError(f"unsupported SGLang host layout {layout!r} for {'MLA' if spec.is_mla else 'MHA'} pages")
    return shapes[layout]


def page_from_flat(flat: torch.Tensor, spec: SGLangPageSpec, layout: str) -> torch.Tensor:
    """A flat host-pool page (as ``get_data_page(i, flat=True)`` gives it) → canonical ``[L, 2, H, P, D]``."""
    if flat.numel() != spec.page_numel:
        raise ValueError(f"page has {flat.numel()} elements, expected {spec.page_numel}")
    x = flat.reshape(_flat_shape(spec, layout))
    if spec.is_mla:
        lpc = {"layer_first": x[:, :, 0], "page_first": x[:, :, 0].transpose(0, 1), "page_first_direct": x[0, :, :, 0]}
        lat = lpc[layout]  # [L, P, C]
        L, P, C = lat.shape
        return lat.reshape(L, P, 2, C // 2).permute(0, 2, 1, 3).unsqueeze(2).contiguous()
    if layout == "layer_first":
        kv = x.permute(1, 0, 3, 2, 4)
    elif layout == "page_first":
        kv = x.permute(2, 0, 3, 1, 4)
    elif layout == "page_first_direct":
        kv = x[:, 0].permute(1, 0, 3, 2, 4)
    else:  # page_head: [2, H, P, L, D]
        kv = x[:, 0].permute(3, 0, 1, 2, 4)
    return kv.contiguous()


def page_to_flat(kv: torch.Tensor, spec: SGLangPageSpec, layout: str) -> torch.Tensor:
    """Canonical ``[L, 2, H, P, D]`` → the flat page ``set_from_flat_data_page`` expects for ``layout``."""
    if spec.is_mla:
        L, _, _, P, half = kv.shape
        lat = kv[:, :, 0].permute(0, 2, 1, 3).reshape(L, P, 2 * half)  # [L, P, C]
        if layout == "layer_first":
            x = lat[:, :, None]
        elif layout == "page_first":
            x = lat.transpose(0, 1)[:, :, None]
        elif layout == "page_first_direct":
            x = lat[None, :, :, None]
        else:
            _flat_shape(spec, layout)  # raises
            raise AssertionError
        return x.contiguous().flatten()
    if layout == "layer_first":
        x = kv.permute(1, 0, 3, 2, 4)
    elif layout == "page_first":
        x = kv.permute(1, 3, 0, 2, 4)
    elif layout == "page_first_direct":
        x = kv.permute(1, 0, 3, 2, 4)[:, None]
    elif layout == "page_head":
        x = kv.permute(1, 2, 3, 0, 4)[:, None]
    else:
        _flat_shape(spec, layout)
        raise AssertionError
    return x.contiguous().flatten()


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
        )
        _flat_shape(spec, layout)  # refuse unknown layouts now, not on the first transfer
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
            log.warning("stored page is %s %s, expected %s: ignored", tuple(chunk.kv.shape), chunk.dtype, expected)
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
