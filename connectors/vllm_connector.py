"""vLLM V1 KV connector on kvfuse's TieredStore: prefix hits, and blended KV for prompts kvfuse prepared.

Load it into an unpatched vLLM with::

    --kv-transfer-config '{"kv_connector": "KvfuseConnector", "kv_connector_module_path": "connectors.vllm_connector",
      "kv_role": "kv_both", "kv_connector_extra_config": {"kvfuse_store": {"cpu_bytes": 4294967296,
      "ssd_dir": "/var/cache/kvfuse", "redis_url": "redis://cache:6379/0"}, "kvfuse_namespace": "default"}}'

Lazy base class: as in :mod:`connectors.sglang_storage`, ``KvfuseConnectorImpl`` holds the logic and no
vLLM base; the module ``__getattr__`` builds ``KvfuseConnector(KvfuseConnectorImpl, KVConnectorBase_V1)``
the first time vLLM's factory looks the name up, so the module imports without vLLM.

Keys (:mod:`connectors.vllm_keys`). A block is keyed by vLLM's own block hash (``request.block_hashes``,
:func:`connectors.engine_hashes.vllm_block_hashes`) in the space of the model identity (weight fingerprint
``kvfuse_fingerprint``, else the model name), the TP shard, the KV dtype and the kvfuse namespace, with a
scope: ``prefix`` for KV an engine computed densely (exact, shared by every request with that prefix), or
``prepared:<id>`` for KV kvfuse blended for one prompt. A stored block of another dtype than the KV cache
is a load error (vLLM recomputes it), never cast. Prepared KV is
loaded only for a request whose ``kv_transfer_params`` carry ``{"kvfuse_prepared": <id>}``, so blended
(approximate) KV never serves a request that did not ask for it. Give such requests a ``cache_salt`` (any
value, the same at export) so vLLM's own GPU prefix cache also keeps their blocks apart.

Blocks are stored as :class:`~kvstore.chunk.KVChunk` ``[layers, 2, kv_heads, block_size, head_dim]``. vLLM
0.33 hands connectors per-layer views ``[num_blocks, kv_heads, block_size, head_size + head_size_v]`` (K then
V in the last axis, any strides); loads and saves index those views directly. A layer's index in the chunk is
the integer in its name (``model.layers.12.self_attn.attn`` -> 12, as vLLM's ``extract_layer_index``), never
the order of the ``kv_caches`` dict; names without exactly one integer, duplicate indices and gaps are refused
(so is pipeline parallelism: a later stage's layers do not start at 0).

Tensor parallelism. Every TP rank stores its own head shard under keys carrying its rank. The scheduler (one
process) only plans: the connector metadata carries block *hashes*, block ids and the prepared id, and each
worker builds the keys with its own rank (``get_tensor_model_parallel_rank()``), so rank r loads and saves rank
r's heads. A lookup counts a block as a hit only when every rank's shard is stored.

Loads run synchronously in ``start_load_kv``; a block that vanished between lookup and load is reported
through ``get_block_ids_with_load_errors`` so vLLM recomputes it. Saves (``"kvfuse_save": false`` turns them
off) cover the full blocks of the prompt: each step, the scheduler plans the prompt blocks that this step's
forward completes, for new requests (``scheduled_new_reqs``) and for the later chunks of a chunked prefill
(``scheduled_cached_reqs``: their ``new_block_ids`` extend the request's blocks, replacing them when resumed
after preemption), tracking per request how many leading blocks were already planned. The worker gathers
those blocks layer by layer (``save_kv_layer``) and stores the ones its rank does not hold yet in
``wait_for_save``. Generated (decode) tokens are not saved. MLA (a single latent per token) is not supported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch

from connectors.common import FINGERPRINT_PARAM, open_store
from connectors.engine_hashes import vllm_block_hashes
from connectors.vllm_keys import VLLMBlockKeys, export_fused_kv_vllm, kv_dtype_of
from connectors.vllm_meta import BlockLoad, BlockSave, KvfuseConnectorMetadata, SaveProgress, layer_index
from kvstore.chunk import KVChunk
from kvstore.keys import ChunkKey
from kvstore.store import TieredStore

log = logging.getLogger(__name__)

__all__ = [
    "BlockLoad",
    "BlockSave",
    "KvfuseConnectorImpl",
    "KvfuseConnectorMetadata",
    "VLLMBlockKeys",
    "export_fused_kv_vllm",
    "layer_index",
]
PREPARED_PARAM = "kvfuse_prepared"


def _get(obj: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        if obj is None:
            return default
        obj = getattr(obj, name, None)
    return default if obj is None else obj


class KvfuseConnectorImpl:
    """The connector's logic (vLLM's ``KVConnectorBase_V1`` API); use ``KvfuseConnector`` inside vLLM.

    ``role``: vLLM's ``KVConnectorRole`` (scheduler or worker; both sides open the store). ``store``: use this
    store instead of opening one from ``kv_connector_extra_config["kvfuse_store"]``.
    """

    _ENGINE_BASE = False

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None, *, store: TieredStore | None = None):
        if self._ENGINE_BASE:
            super().__init__(vllm_config, role, kv_cache_config)  # type: ignore[call-arg]
        else:
            self._vllm_config, self._role, self._kv_cache_config = vllm_config, role, kv_cache_config
            self._kv_transfer_config = vllm_config.kv_transfer_config
            self._connector_metadata: Any = None
        extra: dict[str, Any] = dict(_get(vllm_config, "kv_transfer_config", "kv_connector_extra_config", default={}))
        self.block_size = int(vllm_config.cache_config.block_size)
        self.hash_algo = str(_get(vllm_config, "cache_config", "prefix_caching_hash_algo", default="sha256"))
        self.save_enabled = bool(extra.get("kvfuse_save", True))
        tp_size = int(_get(vllm_config, "parallel_config", "tensor_parallel_size", default=1))
        self.keys = VLLMBlockKeys(
            str(extra.get("kvfuse_model_name") or _get(vllm_config, "model_config", "model", default="")),
            str(extra.get("kvfuse_namespace", "default")),
            int(extra.get("kvfuse_tp_rank", self._tp_rank())),
            tp_size,
            dtype=kv_dtype_of(vllm_config, extra),
            block_size=self.block_size,
            fingerprint=extra.get(FINGERPRINT_PARAM) or None,
        )
        self.store, self._owns_store = open_store(extra, store)
        # scheduler side
        self._requests: dict[str, Any] = {}
        self._lookup_start: dict[str, int] = {}  # locally computed tokens at the last lookup
        self._pending_loads: dict[str, BlockLoad] = {}
        self._save_progress: dict[str, SaveProgress] = {}
        # worker side
        self._caches: list[torch.Tensor] = []  # by layer index
        self._layer_index: dict[str, int] = {}
        self._save_buf: dict[str, dict[int, torch.Tensor]] = {}
        self._load_errors: set[int] = set()

    @staticmethod
    def _tp_rank() -> int:
        try:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            return int(get_tensor_model_parallel_rank())
        except Exception:  # no vLLM, or no parallel state (scheduler process): rank 0's keys
            return 0

    # -- metadata binding (the base class provides these inside vLLM) ------------------------------------
    def bind_connector_metadata(self, connector_metadata: Any) -> None:
        self._connector_metadata = connector_metadata

    def clear_connector_metadata(self) -> None:
        self._connector_metadata = None

    def has_connector_metadata(self) -> bool:
        return self._connector_metadata is not None

    # -- scheduler side -----------------------------------------------------------------------------------
    def _block_hashes(self, request: Any) -> list[bytes]:
        hashes = getattr(request, "block_hashes", None)
        if hashes is not None:
            return [bytes(h) for h in hashes]
        return vllm_block_hashes(
            list(request.prompt_token_ids), self.block_size, algo=self.hash_algo, cache_salt=request.cache_salt
        )

    def _prepared_id(self, request: Any) -> str | None:
        params = getattr(request, "kv_transfer_params", None) or {}
        value = params.get(PREPARED_PARAM) if isinstance(params, dict) else None
        return None if value is None else str(value)

    def _present(self, hashes: list[bytes], prepared: str | None) -> list[bool]:
        """Per block: stored for every TP rank (a rank missing its shard would have to recompute it)."""
        if not hashes:
            return []
        ranks = [replace(self.keys, tp_rank=r) for r in range(max(1, self.keys.tp_size))]
        flags = self.store.contains_many([k.key(h, prepared) for k in ranks for h in hashes])
        n = len(hashes)
        return [all(flags[r * n + i] for r in range(len(ranks))) for i in range(n)]

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens beyond ``num_computed_tokens`` whose KV kvfuse holds (leading blocks, never the last token)."""
        self._requests[request.request_id] = request
        self._lookup_start[request.request_id] = num_computed_tokens
        prompt = list(request.prompt_token_ids or [])
        usable = max(0, len(prompt) - 1) // self.block_size
        hashes = self._block_hashes(request)[:usable]
        first = num_computed_tokens // self.block_size
        if first >= len(hashes):
            return 0, False
        present = self._present(hashes[first:], self._prepared_id(request))
        hits = present.index(False) if False in present else len(present)
        matched = (first + hits) * self.block_size - num_computed_tokens
        return max(0, matched), False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if num_external_tokens <= 0:
            return
        block_ids = list(blocks.get_block_ids()[0])
        # the external tokens follow the locally computed ones seen at lookup (request.num_computed_tokens is
        # not updated yet when vLLM calls this)
        local = self._lookup_start.get(request.request_id, int(request.num_computed_tokens))
        first = local // self.block_size
        n = num_external_tokens // self.block_size
        hashes = self._block_hashes(request)[first : first + n]
        self._pending_loads[request.request_id] = BlockLoad(
            request.request_id, hashes, block_ids[first : first + n], self._prepared_id(request)
        )

    def build_connector_meta(self, scheduler_output: Any) -> Any:
        meta = self._new_metadata()
        meta.loads = list(self._pending_loads.values())
        self._pending_loads.clear()
        if not self.save_enabled:
            return meta
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            request = self._requests.get(new.req_id)
            if request is None or self._prepared_id(request) is not None:
                continue  # a prepared prompt's KV is blended: never publish it as an exact prefix
            computed = int(new.num_computed_tokens)
            self._save_progress[new.req_id] = SaveProgress(list(new.block_ids[0]), computed // self.block_size)
            self._plan_save(meta, new.req_id, computed, int(scheduled.get(new.req_id, 0)))
        cached: Any = getattr(scheduler_output, "scheduled_cached_reqs", None)
        for i, req_id in enumerate(_get(cached, "req_ids", default=[])):
            progress = self._save_progress.get(req_id)
            if progress is None:
                continue
            new_ids = cached.new_block_ids[i] if i < len(cached.new_block_ids) else None
            if new_ids is not None:
                if req_id in (getattr(cached, "resumed_req_ids", None) or ()):
                    progress.block_ids = list(new_ids[0])  # resumed after preemption: all of its blocks
                else:
                    progress.block_ids.extend(new_ids[0])
            self._plan_save(meta, req_id, int(cached.num_computed_tokens[i]), int(scheduled.get(req_id, 0)))
        return meta

    def _plan_save(self, meta: Any, req_id: str, computed: int, num_scheduled: int) -> None:
        """Plan saving the full prompt blocks this step's forward completes and that are not planned yet."""
        request, progress = self._requests.get(req_id), self._save_progress.get(req_id)
        if request is None or progress is None:
            return
        prompt_len = len(request.prompt_token_ids or [])
        n_full = min(computed + num_scheduled, prompt_len) // self.block_size
        first = max(progress.planned, computed // self.block_size)
        if n_full <= first:
            return
        hashes = self._block_hashes(request)[first:n_full]
        block_ids = progress.block_ids[first:n_full]
        if len(block_ids) != len(hashes):
            log.warning("kvfuse: request %s has %d blocks for %d prompt blocks; not saved", req_id,
                        len(progress.block_ids), n_full)
            return
        progress.planned = n_full
        if all(self._present(hashes, None)):
            return
        meta.saves.append(BlockSave(req_id, hashes, block_ids, first * self.block_size))

    def _new_metadata(self) -> Any:
        return KvfuseConnectorMetadata()

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._requests.pop(request.request_id, None)
        self._lookup_start.pop(request.request_id, None)
        self._pending_loads.pop(request.request_id, None)
        self._save_progress.pop(request.request_id, None)
        return False, None

    # -- worker side --------------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Per-layer ``[num_blocks, kv_heads, block_size, 2 * head_dim]`` views, keyed by layer name."""
        by_index: dict[int, str] = {}
        for name, cache in kv_caches.items():
            if cache.dim() != 4 or cache.shape[2] != self.block_size or cache.shape[3] % 2:
                raise ValueError(
                    f"kvfuse expects [blocks, heads, {self.block_size}, 2*head_dim] KV views; {name} is "
                    f"{tuple(cache.shape)} (MLA and hybrid caches are not supported)"
                )
            if cache.dtype != self.keys.dtype:
                raise ValueError(
                    f"KV cache {name} is {cache.dtype}, but kvfuse keys this engine's blocks as {self.keys.dtype} "
                    "(set kvfuse_kv_dtype in kv_connector_extra_config to the KV cache dtype)"
                )
            index = layer_index(name)
            if index in by_index:
                raise ValueError(f"KV caches {by_index[index]!r} and {name!r} both have layer index {index}")
            by_index[index] = name
        missing = sorted(set(range(len(by_index))) - set(by_index))
        if missing:
            raise ValueError(
                f"kvfuse needs the KV caches of layers 0..{len(by_index) - 1}; layer indices {missing} are missing "
                f"(got {sorted(by_index)}; pipeline parallelism is not supported)"
            )
        self._caches = [kv_caches[by_index[i]] for i in range(len(by_index))]
        self._layer_index = {name: i for i, name in by_index.items()}

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if meta is None or not meta.loads or not self._caches:
            return
        caches = self._caches
        for load in meta.loads:
            chunks = self.store.get_many([self.keys.key(h, load.prepared_id) for h in load.block_hashes])
            for chunk, block_id in zip(chunks, load.block_ids, strict=True):
                if chunk is None or not self._fits(chunk, caches[0]):
                    self._load_errors.add(block_id)
                    continue
                head_dim = chunk.head_dim
                for layer, cache in enumerate(caches):
                    src = chunk.kv[layer].to(cache.device)  # [2, H, N, D]; same dtype (checked by _fits)
                    cache[block_id, :, :, :head_dim] = src[0]
                    cache[block_id, :, :, head_dim:] = src[1]

    def _fits(self, chunk: KVChunk, cache: torch.Tensor) -> bool:
        ok = (
            chunk.num_layers == len(self._caches)
            and chunk.num_kv_heads == cache.shape[1]
            and chunk.num_tokens == self.block_size
            and 2 * chunk.head_dim == cache.shape[3]
        )
        if not ok:
            log.warning("kvfuse block of shape %s does not fit the KV cache %s", tuple(chunk.kv.shape), cache.shape)
        elif chunk.dtype != cache.dtype:  # never cast: stored KV of another dtype is a miss, vLLM recomputes it
            log.warning("kvfuse block is %s, the KV cache %s: treated as a miss", chunk.dtype, cache.dtype)
            ok = False
        return ok

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete inside start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if meta is None or not meta.saves:
            return
        layer = self._layer_index.get(layer_name)
        if layer is None:
            layer = layer_index(layer_name)
        for save in meta.saves:
            ids = torch.tensor(save.block_ids, dtype=torch.long, device=kv_layer.device)
            self._save_buf.setdefault(save.req_id, {})[layer] = kv_layer.index_select(0, ids).to("cpu")

    def wait_for_save(self) -> None:
        meta = self._connector_metadata
        if meta is None or not meta.saves:
            return
        items: list[tuple[ChunkKey, KVChunk]] = []
        for save in meta.saves:
            per_layer = self._save_buf.pop(save.req_id, {})
            n_layers = len(self._caches) or len(per_layer)
            if not per_layer or sorted(per_layer) != list(range(n_layers)):
                log.warning("kvfuse: incomplete layers for request %s; not saved", save.req_id)
                continue
            keys = [self.keys.key(h) for h in save.block_hashes]  # this worker's TP rank
            present = self.store.contains_many(keys)
            stacked = torch.stack([per_layer[i] for i in range(n_layers)])  # [L, n, H, N, 2D]
            head_dim = stacked.shape[-1] // 2
            for j, key in enumerate(keys):
                if present[j]:
                    continue
                block = stacked[:, j]  # [L, H, N, 2D]
                kv = torch.stack([block[..., :head_dim], block[..., head_dim:]], dim=1).contiguous()
                lo = save.start_token + j * self.block_size
                items.append((key, KVChunk(kv, torch.arange(lo, lo + self.block_size), self.keys.identity)))
        if items:
            self.store.put_many(items)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        if self._owns_store:
            self.store.close()


_BUILT: dict[str, type] = {}


def __getattr__(name: str) -> type:
    if name not in ("KvfuseConnector", "KvfuseConnectorMetadataV1"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not _BUILT:
        try:
            from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata
        except ImportError as exc:
            raise ImportError(f"KvfuseConnector needs vLLM (kv_connector.v1.base): {exc}") from exc
        meta_cls = type(
            "KvfuseConnectorMetadataV1", (KvfuseConnectorMetadata, KVConnectorMetadata), {"__module__": __name__}
        )
        _BUILT["KvfuseConnectorMetadataV1"] = dataclass(meta_cls)
        _BUILT["KvfuseConnector"] = type(
            "KvfuseConnector",
            (KvfuseConnectorImpl, KVConnectorBase_V1),
            {
                "__module__": __name__,
                "__doc__": KvfuseConnectorImpl.__doc__,
                "_ENGINE_BASE": True,
                "_new_metadata": lambda self: _BUILT["KvfuseConnectorMetadataV1"](),
            },
        )
    return _BUILT[name]
