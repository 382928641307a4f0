"""The SGLang HiCache backend and fused-KV export against real kvfuse stores (SSD dir, real Redis).

SGLang itself is not importable in CI (CUDA wheels), so ``HostPool`` below mirrors the buffers and the
``get_data_page`` / ``set_from_flat_data_page`` code of SGLang 0.5.23's ``MHATokenToKVPoolHost`` and
``MLATokenToKVPoolHost`` (pool_host/mha.py, pool_host/mla.py) for every layout. The same backend is checked
against SGLang's real base class and factory in tests/connectors/test_sglang_interface.py (engines venv).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from blending.engine import Engine, PrefillRequest
from blending.model import LoadedModel
from blending.planner import PromptSegment
from connectors.engine_hashes import sglang_page_hashes
from connectors.sglang_export import export_fused_kv
from connectors.sglang_storage import MHA_LAYOUTS, MLA_LAYOUTS, KvfuseHiCacheStorageImpl
from kvstore.config import StoreConfig
from kvstore.store import TieredStore

torch.set_num_threads(1)


class HostPool:
    """SGLang's host KV pool buffers for one layout (MHA ``kv_buffer`` / MLA latent buffer)."""

    def __init__(
        self,
        layout: str,
        *,
        layers: int,
        heads: int,
        head_dim: int,
        page: int,
        pages: int,
        dtype: torch.dtype = torch.float32,
        mla: bool = False,
    ) -> None:
        self.layout, self.layer_num, self.page_size, self.dtype = layout, layers, page, dtype
        self.size, self.page_num = page * pages, pages
        L, P, N = layers, page, page * pages
        if mla:
            self.kv_cache_dim = head_dim
            dims = {
                "layer_first": (L, N, 1, head_dim),
                "page_first": (N, L, 1, head_dim),
                "page_first_direct": (pages, L, P, 1, head_dim),
            }[layout]
        else:
            self.head_num, self.head_dim, self.v_head_dim = heads, head_dim, head_dim
            H, D = heads, head_dim
            dims = {
                "layer_first": (2, L, N, H, D),
                "page_first": (2, N, L, H, D),
                "page_first_direct": (2, pages, L, P, H, D),
                "page_head": (2, pages, H, P, L, D),
            }[layout]
        self.mla = mla
        self.kv_buffer = torch.zeros(dims, dtype=dtype)

    def _view(self, index: int) -> torch.Tensor:
        P, b = self.page_size, self.kv_buffer
        direct = self.layout in ("page_first_direct", "page_head")
        if self.mla:
            if self.layout == "layer_first":
                return b[:, index : index + P]
            if self.layout == "page_first":
                return b[index : index + P]
            return b[index // P : index // P + 1]
        if self.layout == "layer_first":
            return b[:, :, index : index + P]
        if self.layout == "page_first":
            return b[:, index : index + P]
        assert direct
        return b[:, index // P : index // P + 1]

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        page = self._view(index)
        return page.flatten() if flat else page

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        view = self._view(index)
        view.copy_(data_page.reshape(view.shape))

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.zeros(self._view(0).numel(), dtype=self.dtype)

    def token_kv(self, index: int) -> torch.Tensor:
        """Canonical [L, 2, H, 1, D] (MHA) / [L, 1, D] (MLA) of one token slot, read straight from the buffer."""
        b, P = self.kv_buffer, self.page_size
        if self.mla:
            return {
                "layer_first": lambda: b[:, index, 0],
                "page_first": lambda: b[index, :, 0],
                "page_first_direct": lambda: b[index // P, :, index % P, 0],
            }[self.layout]()
        return {
            "layer_first": lambda: b[:, :, index].transpose(0, 1),
            "page_first": lambda: b[:, index].transpose(0, 1),
            "page_first_direct": lambda: b[:, index // P, :, index % P].transpose(0, 1),
            "page_head": lambda: b[:, index // P, :, index % P].permute(2, 0, 1, 3),
        }[self.layout]()


def _config(tp_rank: int = 0, tp_size: int = 1, mla: bool = False, writer: bool = True, **extra: Any) -> Any:
    return SimpleNamespace(
        tp_rank=tp_rank,
        tp_size=tp_size,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=mla,
        model_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        is_storage_writer=writer,
        extra_config={"kvfuse_namespace": "t", **extra},
    )


@pytest.fixture
def store(tmp_path: Path, redis_url: str) -> Any:
    """No memory tier: every read comes from the SSD directory or the real Redis server."""
    s = TieredStore.from_config(
        StoreConfig(cpu_bytes=0, ssd_dir=str(tmp_path / "ssd"), redis_url=redis_url, ssd_fsync="never")
    )
    yield s
    s.close()


def _backend(store: TieredStore, pool: HostPool, **cfg: Any) -> KvfuseHiCacheStorageImpl:
    b = KvfuseHiCacheStorageImpl(_config(**cfg), {}, store=store)
    b.register_mem_pool_host(pool)
    return b


@pytest.mark.parametrize("src", MHA_LAYOUTS)
def test_pages_round_trip_across_host_layouts(store: TieredStore, src: str) -> None:
    geo = dict(layers=3, heads=2, head_dim=8, page=4, pages=4)
    writer = HostPool(src, **geo)
    writer.kv_buffer.copy_(torch.randn(writer.kv_buffer.shape))
    keys = sglang_page_hashes(list(range(12)), 4)
    w = _backend(store, writer)
    assert w.batch_set(keys, [writer.get_data_page(i * 4) for i in range(3)])
    assert w.batch_exists([*keys, "0" * 64]) == 3
    for dst in MHA_LAYOUTS:  # an instance with another --hicache-mem-layout reads the same pages
        reader = HostPool(dst, **geo)
        r = _backend(store, reader)
        pages = r.batch_get(keys, [reader.get_dummy_flat_data_page() for _ in keys])
        for i, page in enumerate(pages):
            assert page is not None
            reader.set_from_flat_data_page(4 + i * 4, page)  # a different host slot than the writer's
        for tok in range(12):
            assert torch.equal(reader.token_kv(4 + tok), writer.token_kv(tok)), (src, dst, tok)


def test_prefix_semantics_and_tp_shards(store: TieredStore) -> None:
    pool = HostPool("page_first", layers=2, heads=1, head_dim=4, page=2, pages=4)
    pool.kv_buffer.normal_()
    keys = sglang_page_hashes([1, 2, 3, 4, 5, 6], 2)
    rank0 = _backend(store, pool, tp_rank=0, tp_size=2)
    rank1 = _backend(store, pool, tp_rank=1, tp_size=2)
    assert rank0.batch_set([keys[0], keys[2]], [pool.get_data_page(0), pool.get_data_page(2)])
    assert rank0.batch_exists(keys) == 1  # leading hits only: page 1 is missing
    assert rank1.batch_exists(keys) == 0  # another TP shard's pages are other keys
    assert rank1.get(keys[0]) is None
    assert rank0.exists(keys[2]) and not rank1.exists(keys[2])


def test_zero_copy_v1_path(store: TieredStore) -> None:
    pool = HostPool("page_first_direct", layers=2, heads=2, head_dim=4, page=4, pages=6)
    pool.kv_buffer.normal_()
    keys = sglang_page_hashes(list(range(100, 112)), 4)
    b = _backend(store, pool, interface_v1=1)
    src = torch.tensor([8, 9, 10, 11, 0, 1, 2, 3, 16, 17, 18, 19])
    assert b.batch_set_v1(keys, src) == [True] * 3
    before = [pool.token_kv(int(i)).clone() for i in src]
    pool.kv_buffer.zero_()
    dst = torch.arange(4, 16)
    assert b.batch_get_v1([*keys, "f" * 64], torch.arange(4, 20)) == [True, True, True, False]
    for i, slot in enumerate(dst.tolist()):
        assert torch.equal(pool.token_kv(slot), before[i])
    assert b.batch_get_v1(keys, torch.arange(5)) == [False] * 3  # wrong index count: refused, not misread


def test_v1_set_reports_bad_pages_instead_of_raising(store: TieredStore) -> None:
    """A page the host pool cannot hand out whole is refused (False) like batch_set does, the others stored."""
    pool = HostPool("layer_first", layers=2, heads=2, head_dim=4, page=4, pages=3)
    pool.kv_buffer.normal_()
    keys = sglang_page_hashes(list(range(8)), 4)
    b = _backend(store, pool, interface_v1=1)
    # the second page starts 2 slots before the end of the pool: get_data_page gives half a page
    assert b.batch_set_v1(keys, torch.tensor([0, 1, 2, 3, 10, 11, 12, 13])) == [True, False]
    assert b.exists(keys[0]) and not b.exists(keys[1])


@pytest.mark.parametrize("layout", MLA_LAYOUTS)
def test_mla_pages_and_single_writer(store: TieredStore, layout: str) -> None:
    pool = HostPool(layout, layers=2, heads=1, head_dim=10, page=2, pages=3, dtype=torch.bfloat16, mla=True)
    pool.kv_buffer.copy_(torch.randn(pool.kv_buffer.shape))
    keys = sglang_page_hashes([7, 7, 8, 8], 2)
    follower = _backend(store, pool, tp_rank=1, tp_size=2, mla=True, writer=False)
    assert follower.batch_set(keys, [pool.get_data_page(0), pool.get_data_page(2)])
    assert follower.batch_exists(keys) == 0  # non-writer ranks do not write replicated MLA pages
    leader = _backend(store, pool, tp_rank=0, tp_size=2, mla=True)
    assert leader.batch_set(keys, [pool.get_data_page(0), pool.get_data_page(2)])
    assert follower.batch_exists(keys) == 2  # MLA keys carry no TP rank: every rank reads them
    other = HostPool("layer_first", layers=2, heads=1, head_dim=10, page=2, pages=3, dtype=torch.bfloat16, mla=True)
    r = _backend(store, other, tp_rank=1, tp_size=2, mla=True)
    for i, page in enumerate(r.batch_get(keys)):
        assert page is not None
        other.set_from_flat_data_page(2 + 2 * i, page)
    for tok in range(4):
        assert torch.equal(other.token_kv(2 + tok), pool.token_kv(tok))


def test_refuses_fp8_and_unknown_layouts(store: TieredStore) -> None:
    pool = HostPool("layer_first", layers=1, heads=1, head_dim=4, page=2, pages=2)
    pool.dtype = torch.float8_e4m3fn
    with pytest.raises(ValueError, match="kvfuse stores"):
        _backend(store, pool)
    pool = HostPool("layer_first", layers=1, heads=1, head_dim=4, page=2, pages=2)
    pool.layout = "page_unified"
    with pytest.raises(ValueError, match="unsupported SGLang host layout"):
        _backend(store, pool)


@pytest.mark.slow
def test_fused_kv_export_is_an_sglang_prefix_hit(smollm2: LoadedModel, store: TieredStore, tmp_path: Path) -> None:
    """kvfuse prefills a prompt, exports it; SGLang's own lookup path (hash → batch_exists → batch_get →
    set_from_flat_data_page) then yields exactly the fused KV, for every TP rank of a TP=3 deployment."""
    engine_store = TieredStore.from_config(StoreConfig(cpu_bytes=64 << 20))
    engine = Engine(smollm2, engine_store)
    doc = "The Eiffel Tower is in Paris. It was finished in 1889 and is 330 metres tall. " * 2
    result = engine.prefill(PrefillRequest((PromptSegment(doc, "chunk"), PromptSegment("How tall is it?"))))
    fused = result.fused
    ids = fused.token_ids.tolist()
    page = 16
    model = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert fused.stats.reused_tokens == fused.stats.recomputed_tokens == 0  # a dense prefill: exact KV
    exported = export_fused_kv(
        store, fused, ids, model_name=model, page_size=page, dtype=torch.float32, tp_size=3, namespace="t",
        exact=True,
    )
    n_pages = (len(ids) - 1) // page
    assert len(exported) == n_pages >= 2 and exported.tokens == n_pages * page
    layers, _, _heads, _, head_dim = fused.kv.shape
    for rank in range(3):
        pool = HostPool("page_first", layers=layers, heads=1, head_dim=head_dim, page=page, pages=n_pages + 1)
        backend = _backend(store, pool, tp_rank=rank, tp_size=3)
        keys = sglang_page_hashes(ids, page)  # what SGLang computes for the incoming request
        assert backend.batch_exists(keys) == n_pages
        pages = backend.batch_get(keys[:n_pages], [pool.get_dummy_flat_data_page() for _ in range(n_pages)])
        for i, flat in enumerate(pages):
            assert flat is not None
            pool.set_from_flat_data_page(i * page, flat)
        for tok in range(n_pages * page):
            assert torch.equal(pool.token_kv(tok), fused.kv[:, :, rank : rank + 1, tok]), (rank, tok)
    engine_store.close()
