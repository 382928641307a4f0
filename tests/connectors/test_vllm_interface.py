"""The connector against vLLM's real KVConnectorBase_V1 (engines venv: vllm --no-deps + light deps).

Skipped in the main CI, which cannot install vLLM.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

base = pytest.importorskip("vllm.distributed.kv_transfer.kv_connector.v1.base", reason="vLLM not importable")


def test_connector_is_a_complete_kv_connector(tmp_path: Path) -> None:
    import connectors.vllm_connector as mod

    cls = mod.KvfuseConnector
    assert issubclass(cls, base.KVConnectorBase_V1)
    assert not cls.__abstractmethods__
    assert issubclass(mod.KvfuseConnectorMetadataV1, base.KVConnectorMetadata)
    cfg = SimpleNamespace(
        cache_config=SimpleNamespace(block_size=16, prefix_caching_hash_algo="sha256"),
        model_config=SimpleNamespace(model="m", dtype="bfloat16"),
        parallel_config=SimpleNamespace(tensor_parallel_size=1),
        kv_transfer_config=SimpleNamespace(
            kv_connector_extra_config={"kvfuse_store": {"cpu_bytes": 0, "ssd_dir": str(tmp_path)}}
        ),
    )
    conn = cls(cfg, base.KVConnectorRole.SCHEDULER, None)  # the base __init__ runs (sets role, config)
    assert conn.role == base.KVConnectorRole.SCHEDULER
    req = SimpleNamespace(request_id="r", prompt_token_ids=list(range(40)), kv_transfer_params=None,
                          cache_salt=None, num_computed_tokens=0)
    assert conn.get_num_new_matched_tokens(req, 0) == (0, False)
    meta = conn.build_connector_meta(SimpleNamespace(scheduled_new_reqs=[], num_scheduled_tokens={}))
    assert isinstance(meta, base.KVConnectorMetadata)
    conn.shutdown()
