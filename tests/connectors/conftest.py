"""A live kvfuse sidecar around the session's SmolLM2 model for the framework-adapter tests.

``kvfuse_url`` (package scope): uvicorn in a background thread on a free loopback port, CPU + SSD store
under a temporary directory, one local tenant (no API keys). ``kv`` is a :class:`KVFuseClient` on it and
``dead_url`` a loopback URL where nothing listens. Torch runs single-threaded (CI cores are shared).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from blending.engine import Engine
from blending.model import LoadedModel
from connectors.client import KVFuseClient
from kvstore import StoreConfig, TieredStore
from kvstore.redis_local import free_port
from server.app import create_app
from server.config import Limits, Settings
from server.embedded import BackgroundServer

LIMITS = Limits(max_body_bytes=4 << 20, max_documents=16, max_prompt_tokens=1024, max_completion_tokens=32)


@pytest.fixture(scope="package")
def kvfuse_url(smollm2: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("kvfuse-connectors")
    store = TieredStore.from_config(StoreConfig(cpu_bytes=256 << 20, ssd_dir=str(root / "ssd"), ssd_fsync="never"))
    try:
        with BackgroundServer(create_app(Engine(smollm2, store), Settings(data_dir=root, limits=LIMITS))) as server:
            yield server.url
    finally:
        store.close()
        torch.set_num_threads(threads)


@pytest.fixture(scope="package")
def kv(kvfuse_url: str) -> Iterator[KVFuseClient]:
    with KVFuseClient(kvfuse_url) as client:
        yield client


@pytest.fixture
def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def top1_agreement(a: dict, b: dict) -> float:
    """Share of teacher-forced positions where two /v1/logprobs responses have the same top-1 token."""
    tops = [
        (x["top_logprobs"][0]["id"], y["top_logprobs"][0]["id"]) for x, y in zip(a["tokens"], b["tokens"], strict=True)
    ]
    return sum(p == q for p, q in tops) / len(tops)
