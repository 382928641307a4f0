"""The vLLM connector's scheduler and worker logic against a real kvfuse store (SSD dir + real Redis).

vLLM is not importable in CI (CUDA wheels): the config, request, block and scheduler-output objects here are
duck-typed mirrors of vLLM 0.33.0's (``Request.block_hashes`` / ``kv_transfer_params``,
``KVCacheBlocks.get_block_ids()``, ``SchedulerOutput.scheduled_new_reqs`` / ``num_scheduled_tokens``), and
the KV caches are real tensors in vLLM 0.33's per-layer connector view ``[blocks, kv_heads, block_size,
2 * head_dim]``. The real base class is exercised in tests/connectors/test_vllm_interface.py (engines venv).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from connectors.engine_hashes import vllm_block_hashes
from connectors.vllm_connector import KvfuseConnectorImpl, export_fused_kv_vllm
from kvstore.config import StoreConfig
from kvstore.store import TieredStore

torch.set_num_threads(1)
BS, L, H, D = 4, 3, 2, 8
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def store(tmp_path: Path, redis_url: str) -> Any:
    s = TieredStore.from_config(StoreConfig(cpu_bytes=0, ssd_dir=str(tmp_path / "ssd"), redis_url=redis_url,
                                            ssd_fsync="never"))
    yield s
    s.close()


def _vllm_config() -> Any:
    return SimpleNamespace(
        cache_config=SimpleNamespace(block_size=BS, prefix_caching_hash_algo="sha256"),
        model_config=SimpleNamespace(model=MODEL),
        parallel_config=SimpleNamespace(tensor_parallel_size=1),
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config={"kvfuse_namespace": "t"}),
    )


def _request(rid: str, ids: list[int], params: dict | None = None, salt: str | None = None) -> Any:
    return SimpleNamespace(request_id=rid, prompt_token_ids=ids, kv_transfer_params=params, cache_salt=salt,
                           num_computed_tokens=0, block_hashes=vllm_block_hashes(ids, BS, cache_salt=salt))


def _caches(blocks: int = 16) -> dict[str, torch.Tensor]:
    # vLLM allocates one buffer and hands out strided per-layer views: mimic that (non-contiguous views)
    raw = torch.zeros(blocks, L, H, BS, 2 * D, dtype=torch.bfloat16)
    return {f"model.layers.{i}.self_attn.attn": raw[:, i] for i in range(L)}


def _step(sched: KvfuseConnectorImpl, worker: KvfuseConnectorImpl, req: Any, block_ids: list[int]) -> int:
    """One scheduler step for a new request, then the worker's load (what vLLM's engine core does)."""
    matched, is_async = sched.get_num_new_matched_tokens(req, 0)
    assert not is_async
    sched.update_state_after_alloc(req, SimpleNamespace(get_block_ids=lambda: (block_ids,)), matched)
    new = SimpleNamespace(req_id=req.request_id, num_computed_tokens=matched, block_ids=(block_ids,))
    todo = {req.request_id: len(req.prompt_token_ids) - matched}
    out = SimpleNamespace(scheduled_new_reqs=[new], num_scheduled_tokens=todo)
    meta = sched.build_connector_meta(out)
    worker.bind_connector_metadata(meta)
    worker.start_load_kv(None)
    return matched


def _block_of(caches: dict[str, torch.Tensor], block: int) -> torch.Tensor:
    """[L, 2, H, BS, D] of one paged block."""
    return torch.stack([torch.stack([c[block, :, :, :D], c[block, :, :, D:]]) for c in caches.values()])


def test_prepared_blended_kv_loads_only_for_its_request(store: TieredStore) -> None:
    ids = list(range(50, 61))  # 11 tokens: 2 full blocks usable (the last token is always computed)
    fused = torch.randn(L, 2, H, len(ids), D)
    hashes = export_fused_kv_vllm(store, fused, ids, model_name=MODEL, block_size=BS, prepared_id="p1",
                                  namespace="t", cache_salt="p1")
    assert len(hashes) == 2
    sched = KvfuseConnectorImpl(_vllm_config(), "scheduler", store=store)
    worker = KvfuseConnectorImpl(_vllm_config(), "worker", store=store)
    caches = _caches()
    worker.register_kv_caches(caches)
    # same tokens without the prepared id (or with another salt): no hit, blended KV stays private
    assert sched.get_num_new_matched_tokens(_request("a", ids), 0) == (0, False)
    assert sched.get_num_new_matched_tokens(_request("b", ids, {"kvfuse_prepared": "p2"}, "p1"), 0) == (0, False)
    req = _request("c", ids, {"kvfuse_prepared": "p1"}, "p1")
    assert _step(sched, worker, req, [7, 3, 9]) == 2 * BS
    for j, block in enumerate([7, 3]):
        assert torch.equal(_block_of(caches, block), fused[:, :, :, j * BS : (j + 1) * BS].to(torch.bfloat16))
    assert _block_of(caches, 9).abs().sum() == 0
    assert worker.get_block_ids_with_load_errors() == set()


def test_dense_prompts_are_saved_and_served_as_prefix_hits(store: TieredStore) -> None:
    ids = [11, 12, 13, 14, 15, 16, 17, 18, 19]
    sched = KvfuseConnectorImpl(_vllm_config(), "scheduler", store=store)
    worker = KvfuseConnectorImpl(_vllm_config(), "worker", store=store)
    caches = _caches()
    worker.register_kv_caches(caches)
    req = _request("r1", ids)
    assert _step(sched, worker, req, [2, 5, 6]) == 0  # miss: vLLM computes, then the layers are saved
    for name, cache in caches.items():  # the forward pass writes KV; the attention wrapper saves each layer
        cache[[2, 5, 6]] = torch.randn(3, H, BS, 2 * D).to(cache.dtype)
        worker.save_kv_layer(name, cache, None)
    worker.wait_for_save()
    written = [_block_of(caches, b).clone() for b in (2, 5)]
    # a second instance (fresh connectors, same store) gets both full blocks as an external prefix hit
    sched2 = KvfuseConnectorImpl(_vllm_config(), "scheduler", store=store)
    worker2 = KvfuseConnectorImpl(_vllm_config(), "worker", store=store)
    caches2 = _caches()
    worker2.register_kv_caches(caches2)
    req2 = _request("r2", [*ids, 99, 98, 97])
    assert sched2.get_num_new_matched_tokens(req2, BS) == (BS, False)  # one block already local
    assert _step(sched2, worker2, req2, [0, 1, 4, 8]) == 2 * BS
    assert torch.equal(_block_of(caches2, 0), written[0]) and torch.equal(_block_of(caches2, 1), written[1])


def test_evicted_block_is_reported_for_recompute(store: TieredStore) -> None:
    ids = list(range(9))
    fused = torch.randn(L, 2, H, len(ids), D)
    export_fused_kv_vllm(store, fused, ids, model_name=MODEL, block_size=BS, namespace="t")
    sched = KvfuseConnectorImpl(_vllm_config(), "scheduler", store=store)
    worker = KvfuseConnectorImpl(_vllm_config(), "worker", store=store)
    worker.register_kv_caches(_caches())
    req = _request("e", ids)
    matched, _ = sched.get_num_new_matched_tokens(req, 0)
    assert matched == 2 * BS
    sched.update_state_after_alloc(req, SimpleNamespace(get_block_ids=lambda: ([4, 5, 6],)), matched)
    store.delete(sched.keys.key(req.block_hashes[1]))  # evicted between lookup and load
    new = SimpleNamespace(req_id="e", num_computed_tokens=matched, block_ids=([4, 5, 6],))
    worker.bind_connector_metadata(sched.build_connector_meta(
        SimpleNamespace(scheduled_new_reqs=[new], num_scheduled_tokens={"e": 1})))
    worker.start_load_kv(None)
    assert worker.get_block_ids_with_load_errors() == {5}


def test_rejects_mla_shaped_caches(store: TieredStore) -> None:
    worker = KvfuseConnectorImpl(_vllm_config(), "worker", store=store)
    with pytest.raises(ValueError, match="MLA"):
        worker.register_kv_caches({"l0": torch.zeros(4, 1, BS, 9)})
