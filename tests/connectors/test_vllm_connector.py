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


def _vllm_config(tp_size: int = 1, tp_rank: int | None = None) -> Any:
    extra: dict[str, Any] = {"kvfuse_namespace": "t"}
    if tp_rank is not None:  # what get_tensor_model_parallel_rank() returns inside that worker process
        extra["kvfuse_tp_rank"] = tp_rank
    return SimpleNamespace(
        cache_config=SimpleNamespace(block_size=BS, prefix_caching_hash_algo="sha256"),
        model_config=SimpleNamespace(model=MODEL, dtype=torch.bfloat16),
        parallel_config=SimpleNamespace(tensor_parallel_size=tp_size),
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra),
    )


def _request(rid: str, ids: list[int], params: dict | None = None, salt: str | None = None) -> Any:
    return SimpleNamespace(request_id=rid, prompt_token_ids=ids, kv_transfer_params=params, cache_salt=salt,
                           num_computed_tokens=0, block_hashes=vllm_block_hashes(ids, BS, cache_salt=salt))


def _caches(blocks: int = 16, heads: int = H, order: list[int] | None = None) -> dict[str, torch.Tensor]:
    # vLLM allocates one buffer and hands out strided per-layer views: mimic that (non-contiguous views)
    raw = torch.zeros(blocks, L, heads, BS, 2 * D, dtype=torch.bfloat16)
    return {f"model.layers.{i}.self_attn.attn": raw[:, i] for i in (order if order is not None else range(L))}


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
    """[L, 2, H, BS, D] of one paged block, layers in index order (the names' numbers)."""
    ordered = [caches[f"model.layers.{i}.self_attn.attn"] for i in range(L)]
    return torch.stack([torch.stack([c[block, :, :, :D], c[block, :, :, D:]]) for c in ordered])


def _forward(worker: KvfuseConnectorImpl, caches: dict[str, torch.Tensor], blocks: list[int]) -> None:
    """The forward pass writes KV into ``blocks``; the attention wrapper saves each layer; then wait_for_save."""
    for name, cache in caches.items():
        cache[blocks] = torch.randn(len(blocks), *cache.shape[1:]).to(cache.dtype)
        worker.save_kv_layer(name, cache, None)
    worker.wait_for_save()


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


def _new_step(sched: KvfuseConnectorImpl, req: Any, block_ids: list[int], scheduled: int) -> Any:
    """Scheduler side of a request's first step with ``scheduled`` tokens (no external hit)."""
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    new = SimpleNamespace(req_id=req.request_id, num_computed_tokens=0, block_ids=(block_ids,))
    return sched.build_connector_meta(SimpleNamespace(scheduled_new_reqs=[new],
                                                      num_scheduled_tokens={req.request_id: scheduled}))


def test_tensor_parallel_ranks_save_and_load_their_own_heads(store: TieredStore) -> None:
    """TP=2: one scheduler, two workers; the metadata is the same, each rank keys its own head shard."""
    ids = list(range(30, 39))  # 9 tokens: 2 full blocks
    sched = KvfuseConnectorImpl(_vllm_config(2), "scheduler", store=store)
    workers = [KvfuseConnectorImpl(_vllm_config(2, r), "worker", store=store) for r in (0, 1)]
    caches = [_caches() for _ in workers]
    meta = _new_step(sched, _request("t1", ids), [3, 4, 5], len(ids))
    for worker, cache in zip(workers, caches, strict=True):
        worker.register_kv_caches(cache)
        worker.bind_connector_metadata(meta)
        _forward(worker, cache, [3, 4, 5])  # each rank computes different heads
    written = [[_block_of(c, b).clone() for b in (3, 4)] for c in caches]
    assert not torch.equal(written[0][0], written[1][0])
    # fresh instances: a prefix hit for both blocks; each rank loads its own shard
    sched2 = KvfuseConnectorImpl(_vllm_config(2), "scheduler", store=store)
    workers2 = [KvfuseConnectorImpl(_vllm_config(2, r), "worker", store=store) for r in (0, 1)]
    caches2 = [_caches() for _ in workers2]
    for worker, cache in zip(workers2, caches2, strict=True):
        worker.register_kv_caches(cache)
    req = _request("t2", [*ids, 1, 2])
    assert _step(sched2, workers2[0], req, [8, 9, 10]) == 2 * BS
    workers2[1].bind_connector_metadata(workers2[0]._connector_metadata)
    workers2[1].start_load_kv(None)
    for rank in (0, 1):
        assert torch.equal(_block_of(caches2[rank], 8), written[rank][0])
        assert torch.equal(_block_of(caches2[rank], 9), written[rank][1])
        assert workers2[rank].get_block_ids_with_load_errors() == set()


def test_tensor_parallel_export_loads_each_ranks_head_shard(store: TieredStore) -> None:
    ids = list(range(70, 79))
    fused = torch.randn(L, 2, 2 * H, len(ids), D)  # 4 KV heads over 2 ranks
    export_fused_kv_vllm(store, fused, ids, model_name=MODEL, block_size=BS, tp_size=2, prepared_id="tp",
                         namespace="t", cache_salt="tp")
    sched = KvfuseConnectorImpl(_vllm_config(2), "scheduler", store=store)
    req = _request("x", ids, {"kvfuse_prepared": "tp"}, "tp")
    for rank in (0, 1):
        worker = KvfuseConnectorImpl(_vllm_config(2, rank), "worker", store=store)
        caches = _caches()
        worker.register_kv_caches(caches)
        assert _step(sched, worker, req, [0, 1, 2]) == 2 * BS
        want = fused[:, :, rank * H : (rank + 1) * H].to(torch.bfloat16)
        assert torch.equal(_block_of(caches, 0), want[:, :, :, :BS])
        assert torch.equal(_block_of(caches, 1), want[:, :, :, BS : 2 * BS])


def test_lookup_hit_needs_every_ranks_shard(store: TieredStore) -> None:
    ids = list(range(9))
    export_fused_kv_vllm(store, torch.randn(L, 2, 2 * H, len(ids), D), ids, model_name=MODEL, block_size=BS,
                         tp_size=2, namespace="t")
    sched = KvfuseConnectorImpl(_vllm_config(2), "scheduler", store=store)
    req = _request("m", ids)
    assert sched.get_num_new_matched_tokens(req, 0) == (2 * BS, False)
    rank1 = KvfuseConnectorImpl(_vllm_config(2, 1), "worker", store=store)
    store.delete(rank1.keys.key(req.block_hashes[1]))  # rank 1 lost its shard of block 1
    assert sched.get_num_new_matched_tokens(req, 0) == (BS, False)


def test_chunked_prefill_saves_every_chunk(store: TieredStore) -> None:
    """A 13-token prompt prefilled in chunks of 5 and 8 tokens: the second chunk arrives as a cached request."""
    ids = list(range(100, 113))  # 3 full blocks
    sched = KvfuseConnectorImpl(_vllm_config(), "scheduler", store=store)
    worker = KvfuseConnectorImpl(_vllm_config(), "worker", store=store)
    caches = _caches()
    worker.register_kv_caches(caches)
    req = _request("c1", ids)
    worker.bind_connector_metadata(_new_step(sched, req, [2, 5], 5))  # tokens 0..4: block 0 completes
    _forward(worker, caches, [2, 5])
    cached = SimpleNamespace(req_ids=["c1"], resumed_req_ids=set(), new_block_ids=[([6, 7],)],
                             num_computed_tokens=[5], num_output_tokens=[0])
    meta = sched.build_connector_meta(SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=cached,
                                                      num_scheduled_tokens={"c1": 8}))
    assert [(s.block_ids, s.start_token) for s in meta.saves] == [([5, 6], BS)]
    worker.bind_connector_metadata(meta)
    _forward(worker, caches, [5, 6, 7])  # tokens 5..12: blocks 1 and 2 complete
    written = [_block_of(caches, b).clone() for b in (2, 5, 6)]
    # a decode step afterwards plans nothing more
    cached = SimpleNamespace(req_ids=["c1"], resumed_req_ids=set(), new_block_ids=[None],
                             num_computed_tokens=[13], num_output_tokens=[1])
    assert sched.build_connector_meta(SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=cached,
                                                      num_scheduled_tokens={"c1": 1})).saves == []
    sched2 = KvfuseConnectorImpl(_vllm_config(), "scheduler", store=store)
    worker2 = KvfuseConnectorImpl(_vllm_config(), "worker", store=store)
    caches2 = _caches()
    worker2.register_kv_caches(caches2)
    assert _step(sched2, worker2, _request("c2", [*ids, 5]), [9, 10, 11, 12]) == 3 * BS
    for block, want in zip((9, 10, 11), written, strict=True):
        assert torch.equal(_block_of(caches2, block), want)


def test_external_hit_after_local_prefix_hit_loads_the_following_blocks(store: TieredStore) -> None:
    """vLLM's GPU cache holds block 0; kvfuse supplies block 1, which must land in the request's second block."""
    ids = list(range(200, 209))
    fused = torch.randn(L, 2, H, len(ids), D)
    export_fused_kv_vllm(store, fused, ids, model_name=MODEL, block_size=BS, namespace="t")
    sched = KvfuseConnectorImpl(_vllm_config(), "scheduler", store=store)
    worker = KvfuseConnectorImpl(_vllm_config(), "worker", store=store)
    caches = _caches()
    worker.register_kv_caches(caches)
    req = _request("l", ids)  # request.num_computed_tokens is still 0 when vLLM calls update_state_after_alloc
    assert sched.get_num_new_matched_tokens(req, BS) == (BS, False)
    sched.update_state_after_alloc(req, SimpleNamespace(get_block_ids=lambda: ([4, 6, 8],)), BS)
    new = SimpleNamespace(req_id="l", num_computed_tokens=2 * BS, block_ids=([4, 6, 8],))
    worker.bind_connector_metadata(sched.build_connector_meta(
        SimpleNamespace(scheduled_new_reqs=[new], num_scheduled_tokens={"l": 1})))
    worker.start_load_kv(None)
    assert torch.equal(_block_of(caches, 6), fused[:, :, :, BS : 2 * BS].to(torch.bfloat16))
    assert _block_of(caches, 4).abs().sum() == 0  # block 0 is vLLM's own: untouched


def test_layer_index_comes_from_the_layer_name(store: TieredStore) -> None:
    ids = list(range(40, 49))
    fused = torch.randn(L, 2, H, len(ids), D)
    export_fused_kv_vllm(store, fused, ids, model_name=MODEL, block_size=BS, namespace="t")
    sched = KvfuseConnectorImpl(_vllm_config(), "scheduler", store=store)
    worker = KvfuseConnectorImpl(_vllm_config(), "worker", store=store)
    caches = _caches(order=[2, 0, 1])  # dict order is not layer order
    worker.register_kv_caches(caches)
    assert _step(sched, worker, _request("o", ids), [1, 2, 3]) == 2 * BS
    assert torch.equal(_block_of(caches, 1), fused[:, :, :, :BS].to(torch.bfloat16))
    # saving from a shuffled dict: stored in name order too
    sched2 = KvfuseConnectorImpl(_vllm_config(), "scheduler", store=store)
    worker.bind_connector_metadata(_new_step(sched2, _request("o2", [9, 8, 7, 6, 5]), [12, 13], 5))
    _forward(worker, caches, [12])
    written = _block_of(caches, 12).clone()
    worker2 = KvfuseConnectorImpl(_vllm_config(), "worker", store=store)
    caches2 = _caches()
    worker2.register_kv_caches(caches2)
    assert _step(sched2, worker2, _request("o3", [9, 8, 7, 6, 5, 4]), [0, 1]) == BS
    assert torch.equal(_block_of(caches2, 0), written)


@pytest.mark.parametrize(
    ("names", "match"),
    [
        (["model.layers.0.attn", "model.layers.0.self_attn.attn", "model.layers.1.attn"], "both have layer index 0"),
        (["model.layers.0.attn", "model.layers.2.attn"], r"indices \[1\] are missing"),
        (["model.layers.1.attn", "model.layers.2.attn"], "pipeline parallelism"),
        (["attn"], "exactly one integer"),
        (["model.layers.0.sub.1.attn"], "exactly one integer"),
    ],
)
def test_refuses_ambiguous_layer_names(store: TieredStore, names: list[str], match: str) -> None:
    worker = KvfuseConnectorImpl(_vllm_config(), "worker", store=store)
    with pytest.raises(ValueError, match=match):
        worker.register_kv_caches({n: torch.zeros(4, H, BS, 2 * D, dtype=torch.bfloat16) for n in names})
