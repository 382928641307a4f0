"""The backend against SGLang's real HiCacheStorage base class and StorageBackendFactory.

Runs where ``sglang.srt.mem_cache.hicache_storage`` imports (scripts/test-engines.sh builds such a venv:
sglang --no-deps + light deps + triton); skipped in the main CI, which cannot install SGLang.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

hicache = pytest.importorskip("sglang.srt.mem_cache.hicache_storage", reason="SGLang not importable (engines venv)")

from connectors.engine_hashes import sglang_page_hashes  # noqa: E402
from tests.connectors.test_sglang_storage import HostPool  # noqa: E402


def test_dynamic_backend_through_sglang_factory(tmp_path: Path) -> None:
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    cfg = hicache.HiCacheStorageConfig(
        tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1, is_mla_model=False,
        enable_storage_metrics=False, is_page_first_layout=True, model_name="m",
        extra_config={"backend_name": "kvfuse", "module_path": "connectors.sglang_storage",
                      "class_name": "KvfuseHiCacheStorage",
                      "kvfuse_store": {"cpu_bytes": 0, "ssd_dir": str(tmp_path), "ssd_fsync": "never"}},
    )
    pool = HostPool("page_first", layers=2, heads=2, head_dim=4, page=4, pages=3, dtype=torch.bfloat16)
    pool.kv_buffer.copy_(torch.randn(pool.kv_buffer.shape))
    backend = StorageBackendFactory.create_backend("dynamic", cfg, pool)
    assert isinstance(backend, hicache.HiCacheStorage)
    assert not getattr(type(backend), "__abstractmethods__", None)
    backend.register_mem_pool_host(pool)  # what the cache controller does next
    keys = sglang_page_hashes(list(range(8)), 4)
    assert backend.batch_set(keys, [pool.get_data_page(0), pool.get_data_page(4)])
    assert backend.batch_exists(keys) == 2
    page = backend.get(keys[1], pool.get_dummy_flat_data_page())
    assert page is not None and torch.equal(page, pool.get_data_page(4))
    backend.close()
