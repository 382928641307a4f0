"""A real kvfuse service for reliability scenarios: engine + tiered store + uvicorn on a loopback port.

Two tenants (``alice``, ``bob``), small request limits so that fuzzed or concurrent requests stay cheap on a
CPU, and the store tiers the scenario asks for (CPU, SSD under ``root``, optionally Redis).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from blending.anchors import AnchorConfig
from blending.engine import Engine, EngineConfig
from blending.model import LoadedModel, ModelSpec, load_model
from kvstore import ChunkKey, MemoryTier, StoreConfig, TieredStore
from server.app import create_app
from server.config import Limits, Settings
from server.embedded import BackgroundServer
from server.state import ServerState

API_KEYS = {"sk-rel-alice": "alice", "sk-rel-bob": "bob"}
TENANT_KEYS = {tenant: key for key, tenant in API_KEYS.items()}
LIMITS = Limits(max_body_bytes=2 << 20, max_documents=4, max_prompt_tokens=256, max_completion_tokens=4)

DOCS = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was completed in 1889 and is "
    "330 metres tall.",
    "Mount Fuji is the highest mountain in Japan, rising to 3,776 metres. It is an active volcano about "
    "100 kilometres south-west of Tokyo.",
    "The Amazon is the largest river in the world by discharge volume. It flows through Brazil, Peru and "
    "Colombia into the Atlantic Ocean.",
]
QUESTION = "Which of these is the tallest, and where is it?"


def load_default_model() -> LoadedModel:
    """The embedded default model (SmolLM2-135M-Instruct, float32, CPU)."""
    return load_model(ModelSpec())


@dataclass
class Harness:
    url: str
    engine: Engine
    store: TieredStore
    settings: Settings
    root: Path
    app: FastAPI

    def client(self, tenant: str | None = "alice", timeout: float = 120.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {TENANT_KEYS[tenant]}"} if tenant else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def tier(self, name: str) -> Any:
        return next(t for t in self.store.tiers if t.name == name)

    def clear_memory(self, keys: list[ChunkKey] | None = None) -> None:
        """Drop ``keys`` (default: everything) from the memory tiers, so reads must come from SSD / Redis."""
        for tier in self.store.tiers:
            if isinstance(tier, MemoryTier):
                for key in tier.keys() if keys is None else keys:
                    tier.delete(key)

    @property
    def state(self) -> ServerState:
        state: ServerState = self.app.state.kvfuse
        return state

    def wait_writebacks(self, timeout_s: float = 120.0) -> None:
        """Block until the background writebacks of earlier requests have stored their KV."""
        state = self.state
        deadline = time.monotonic() + timeout_s
        while state.pending_writebacks:
            if time.monotonic() > deadline:
                raise TimeoutError("writebacks did not finish")
            time.sleep(0.02)


@contextmanager
def running_service(
    loaded: LoadedModel,
    root: Path,
    *,
    cpu_bytes: int = 64 << 20,
    ssd_bytes: int = 256 << 20,
    redis_url: str | None = None,
    redis_bytes: int = 256 << 20,
    limits: Limits = LIMITS,
    log_level: str = "warning",
    anchors: AnchorConfig | None = None,
) -> Iterator[Harness]:
    """A started service; the store is closed and the server stopped on exit."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = StoreConfig(
        cpu_bytes=cpu_bytes,
        ssd_dir=str(root / "kv") if ssd_bytes else None,
        ssd_bytes=ssd_bytes,
        ssd_fsync="never",
        redis_url=redis_url,
        redis_bytes=redis_bytes,
        redis_namespace=f"rel{int(time.time() * 1e6)}",
        redis_connect_timeout_s=0.2,
        redis_timeout_s=1.0,
        redis_stripe_bytes=64 << 10,
        retry_backoff_s=0.2,
        max_backoff_s=0.5,
    )
    store = TieredStore.from_config(cfg)
    config = EngineConfig(max_prompt_tokens=limits.max_prompt_tokens * 4, anchors=anchors or AnchorConfig())
    engine = Engine(loaded, store, config)
    settings = Settings(data_dir=root, api_keys=API_KEYS, limits=limits, key_secret="reliability-secret-0123456789")
    app = create_app(engine, settings)
    logging.getLogger("kvfuse.access").setLevel(logging.WARNING if log_level == "warning" else logging.DEBUG)
    try:
        with BackgroundServer(app) as server:
            yield Harness(server.url, engine, store, settings, root, app)
    finally:
        store.close()


def chat_body(documents: list[str], question: str = QUESTION, mode: str = "blend", **extra: Any) -> dict[str, Any]:
    """A greedy, 4-token chat request with ``documents`` under reuse ``mode``."""
    return {
        "model": "default",
        "messages": [{"role": "user", "content": question}],
        "documents": documents,
        "temperature": 0,
        "max_tokens": 4,
        "kvfuse": {"mode": mode},
        **extra,
    }


def logprobs_body(documents: list[str], continuation: str, mode: str) -> dict[str, Any]:
    return {
        "model": "default",
        "messages": [{"role": "user", "content": QUESTION}],
        "documents": documents,
        "continuation": continuation,
        "top_logprobs": 1,
        "kvfuse": {"mode": mode},
    }
