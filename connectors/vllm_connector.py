"""vLLM V1 KV connector on kvfuse's TieredStore: prefix hits, and blended KV for prompts kvfuse prepared.

Load it into an unpatched vLLM with::

    --kv-transfer-config '{"kv_connector": "KvfuseConnector", "kv_connector_module_path": "connectors.vllm_connector",
      "kv_role": "kv_both", "kv_connector_extra_config": {"kvfuse_store": {"cpu_bytes": 4294967296,
      "ssd_dir": "/var/cache/kvfuse", "redis_url": "redis://cache:6379/0"}, "kvfuse_namespace": "default"}}'

Lazy base class: as in :mod:`connectors.sglang_storage`, ``KvfuseConnectorImpl`` holds the logic and no
vLLM base; the module ``__getattr__`` builds ``KvfuseConnector(KvfuseConnectorImpl, KVConnectorBase_V1)``
the first time vLLM's factory looks the name up, so the module imports without vLLM.

Keys. A block is keyed by vLLM's own block hash (``request.block_hashes``: chained SHA-256 over pickled
token tuples by default, :func:`connectors.engine_hashes.vllm_block_hashes`), the kvfuse namespace, the
model, the tensor-parallel shard and a scope: ``prefix`` for KV an engine computed densely (exact, shared by
every request with that prefix), or ``prepared:<id>`` for KV kvfuse blended for one prompt. Prepared KV is
loaded only for a request whose ``kv_transfer_params`` carry ``{"kvfuse_prepared": <id>}``, so blended
(approximate) KV never serves a request that did not ask for it. Give such requests a ``cache_salt`` (any
value, the same at export) so vLLM's own GPU prefix cache also keeps their blocks apart.

Blocks are stored as :class:`~kvstore.chunk.KVChunk` ``[layers, 2, kv_heads, block_size, head_dim]``. vLLM
0.33 hands connectors per-layer views ``[num_blocks, kv_heads, block_size, head_size + head_size_v]`` (K then
V in the last axis, any strides); loads and saves index those views directly. Loads run synchronously in
``start_load_kv``; a block that vanished between lookup and load is reported through
``get_block_ids_with_load_errors`` so vLLM recomputes it. Saves gather the blocks of newly computed prompts
layer by layer and store them in ``wait_for_save`` (``"kvfuse_save": false`` turns saving off).
MLA (a single latent per token) is not supported.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from blending.fused import FusedKV
from connectors.common import open_store
from connectors.engine_hashes import vllm_block_hashes
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
]
_SEP = b"\x1f"
PREPARED_PARAM = "kvfuse_prepared"


@dataclass(frozen=True)
class VLLMBlockKeys:
    """How vLLM blocks are named in the kvfuse store."""

    model_name: str
    namespace: str = "default"
    tp_rank: int = 0
    tp_size: int = 1

    def key(self, block_hash: bytes, prepared_id: str | None = None) -> ChunkKey:
        scope = f"prepared:{prepared_id}" if prepared_id is not None else "prefix"
        h = xxhash.xxh3_128(
            _SEP.join(
                [
                    b"kvfuse/vllm/v1",
                    self.namespace.encode(),
                    self.model_name.encode(),
                    f"tp{self.tp_rank}/{self.tp_size}".encode(),
                    scope.encode(),
                ]
            )
        )
        h.update(_SEP)
        h.update(bytes(block_hash))
        return ChunkKey(h.digest())


def export_fused_kv_vllm(
    store: TieredStore,
    fused: FusedKV | torch.Tensor,
    token_ids: Sequence[int] | torch.Tensor,
    *,
    model_name: str,
    block_size: int,
    dtype: torch.dtype = torch.bfloat16,
    tp_size: int = 1,
    prepared_id: str | None = None,
    namespace: str = "default",
    cache_salt: str | None = None,
    hash_algo: str = "sha256",
    none_hash_seed: str | None = None,
) -> list[bytes]:
    """Store a prompt's KV as vLLM blocks (full blocks short of the last token); returns their block hashes.

    ``prepared_id``: store in that prepared scope (for blended KV); ``None``: the shared exact-prefix scope.
    """
    kv = fused.kv if isinstance(fused, FusedKV) else fused
    ids = [int(t) for t in (token_ids.tolist() if isinstance(token_ids, torch.Tensor) else token_ids)]
    if kv.dim() != 5 or kv.shape[1] != 2 or kv.shape[3] != len(ids):
        raise ValueError(f"fused KV must be [layers, 2, heads, {len(ids)}, head_dim], got {tuple(kv.shape)}")
    n_blocks = max(0, len(ids) - 1) // block_size
    hashes = vllm_block_hashes(
        ids[: n_blocks * block_size], block_size, algo=hash_algo, none_hash_seed=none_hash_seed, cache_salt=cache_salt
    )
    heads = kv.shape[2]
    if heads % tp_size:
        raise ValueError(f"{heads} KV heads cannot be split over {tp_size} TP ranks")
    per = heads // tp_size
    items: list[tuple[ChunkKey, KVChunk]] = []
    for rank in range(tp_size):
        keys = VLLMBlockKeys(model_name, namespace, rank, tp_size)
        shard = kv[:, :, rank * per : (rank + 1) * per].detach().to("cpu", dtype)
        for i, block_hash in enumerate(hashes):
            lo = i * block_size
            block = shard[:, :, :, lo : lo + block_size].contiguous()
            items.append(
                (keys.key(block_hash, prepared_id), KVChunk(block, torch.arange(lo, lo + block_size), model_name))
            )
    store.put_many(items)
    return hashes


@dataclass
class BlockLoad:
    req_id: str
    keys: list[ChunkKey]
    block_ids: list[int]


@dataclass
class BlockSave:
    req_id: str
    keys: list[ChunkKey]
    block_ids: list[int]
    start_token: int


@dataclass
class KvfuseConnectorMetadata:
    """What the worker loads and saves this step (a ``KVConnectorMetadata`` in the built class)."""

    loads: list[BlockLoad] = field(default_factory=list)
    saves: list[BlockSave] = field(default_factory=list)


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
        )
        self.store, self._owns_store = open_store(extra, store)
        # scheduler side
        self._requests: dict[str, Any] = {}
        self._pending_loads: dict[str, BlockLoad] = {}
        self._saved: set[str] = set()
        # worker side
        self._layers: dict[str, torch.Tensor] = {}
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

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens beyond ``num_computed_tokens`` whose KV kvfuse holds (leading blocks, never the last token)."""
        self._requests[request.request_id] = request
        prompt = list(request.prompt_token_ids or [])
        usable = max(0, len(prompt) - 1) // self.block_size
        hashes = self._block_hashes(request)[:usable]
        first = num_computed_tokens // self.block_size
        if first >= len(hashes):
            return 0, False
        prepared = self._prepared_id(request)
        keys = [self.keys.key(h, prepared) for h in hashes[first:]]
        present = self.store.contains_many(keys)
        hits = present.index(False) if False in present else len(present)
        matched = (first + hits) * self.block_size - num_computed_tokens
        return max(0, matched), False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if num_external_tokens <= 0:
            return
        block_ids = list(blocks.get_block_ids()[0])
        first = int(request.num_computed_tokens) // self.block_size
        n = num_external_tokens // self.block_size
        prepared = self._prepared_id(request)
        hashes = self._block_hashes(request)[first : first + n]
        self._pending_loads[request.request_id] = BlockLoad(
            request.request_id, [self.keys.key(h, prepared) for h in hashes], block_ids[first : first + n]
        )

    def build_connector_meta(self, scheduler_output: Any) -> Any:
        meta = self._new_metadata()
        meta.loads = list(self._pending_loads.values())
        self._pending_loads.clear()
        if self.save_enabled:
            loading = {load.req_id for load in meta.loads}
            for new in scheduler_output.scheduled_new_reqs:
                request = self._requests.get(new.req_id)
                if request is None or new.req_id in loading or new.req_id in self._saved:
                    continue
                if self._prepared_id(request) is not None:
                    continue  # a prepared prompt's KV is blended: never publish it as an exact prefix
                done = int(new.num_computed_tokens) + int(scheduler_output.num_scheduled_tokens[new.req_id])
                prompt_len = len(request.prompt_token_ids or [])
                n_full = min(done, prompt_len) // self.block_size
                first = int(new.num_computed_tokens) // self.block_size
                hashes = self._block_hashes(request)[first:n_full]
                if not hashes:
                    continue
                keys = [self.keys.key(h) for h in hashes]
                present = self.store.contains_many(keys)
                if all(present):
                    continue
                block_ids = list(new.block_ids[0])[first:n_full]
                meta.saves.append(BlockSave(new.req_id, keys, block_ids, first * self.block_size))
                self._saved.add(new.req_id)
        return meta

    def _new_metadata(self) -> Any:
        return KvfuseConnectorMetadata()

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._requests.pop(request.request_id, None)
        self._pending_loads.pop(request.request_id, None)
        self._saved.discard(request.request_id)
        return False, None

    # -- worker side --------------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Per-layer ``[num_blocks, kv_heads, block_size, 2 * head_dim]`` views, in layer order."""
        for name, cache in kv_caches.items():
            if cache.dim() != 4 or cache.shape[2] != self.block_size or cache.shape[3] % 2:
                raise ValueError(
                    f"kvfuse expects [blocks, heads, {self.block_size}, 2*head_dim] KV views; {name} is "
                    f"{tuple(cache.shape)} (MLA and hybrid caches are not supported)"
                )
        self._layers = dict(kv_caches)
        self._layer_index = {name: i for i, name in enumerate(kv_caches)}

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if meta is None or not meta.loads or not self._layers:
            return
        caches = list(self._layers.values())
        for load in meta.loads:
            chunks = self.store.get_many(load.keys)
            for chunk, block_id in zip(chunks, load.block_ids, strict=True):
                if chunk is None or not self._fits(chunk, caches[0]):
                    self._load_errors.add(block_id)
                    continue
                head_dim = chunk.head_dim
                for layer, cache in enumerate(caches):
                    src = chunk.kv[layer].to(cache.device, cache.dtype)  # [2, H, N, D]
                    cache[block_id, :, :, :head_dim] = src[0]
                    cache[block_id, :, :, head_dim:] = src[1]

    def _fits(self, chunk: KVChunk, cache: torch.Tensor) -> bool:
        ok = (
            chunk.num_layers == len(self._layers)
            and chunk.num_kv_heads == cache.shape[1]
            and chunk.num_tokens == self.block_size
            and 2 * chunk.head_dim == cache.shape[3]
        )
        if not ok:
            log.warning("kvfuse block of shape %s does not fit the KV cache %s", tuple(chunk.kv.shape), cache.shape)
        return ok

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete inside start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if meta is None or not meta.saves:
            return
        layer = self._layer_index.get(layer_name, len(self._layer_index))
        self._layer_index.setdefault(layer_name, layer)
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
            if not per_layer or sorted(per_layer) != list(range(len(per_layer))):
                log.warning("kvfuse: incomplete layers for request %s; not saved", save.req_id)
                continue
            stacked = torch.stack([per_layer[i] for i in range(len(per_layer))])  # [L, n, H, N, 2D]
            head_dim = stacked.shape[-1] // 2
            for j, key in enumerate(save.keys):
                block = stacked[:, j]  # [L, H, N, 2D]
                kv = torch.stack([block[..., :head_dim], block[..., head_dim:]], dim=1).contiguous()
                lo = save.start_token + j * self.block_size
                items.append((key, KVChunk(kv, torch.arange(lo, lo + self.block_size), self.keys.model_name)))
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
