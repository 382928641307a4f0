"""A real kvfuse service on a free loopback port around the session's SmolLM2 model.

``service`` (package scope): uvicorn in a background thread, CPU + SSD store under a temporary directory,
three API keys (tenants ``alice``, ``bob``, ``carol``), an admin key and small limits. ``alice`` / ``bob``
are ``httpx`` clients.
Torch runs single-threaded while these tests run: the model is tiny and CI cores are shared.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from blending.engine import Engine
from blending.model import LoadedModel
from kvstore import StoreConfig, TieredStore
from server.app import create_app
from server.config import Limits, Settings
from server.embedded import BackgroundServer

KEYS = {"sk-alice": "alice", "sk-bob": "bob", "sk-carol": "carol"}  # carol sends nothing but isolation probes
ADMIN_KEY = "sk-admin"
LIMITS = Limits(max_body_bytes=4 << 20, max_documents=4, max_prompt_tokens=512, max_completion_tokens=16)


@dataclass
class Service:
    url: str
    engine: Engine
    settings: Settings
    data_dir: Path

    def client(self, api_key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=300)


@pytest.fixture(scope="package")
def single_thread_torch() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="package")
def service(
    smollm2: LoadedModel, tmp_path_factory: pytest.TempPathFactory, single_thread_torch: None
) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("kvfuse-service")
    store = TieredStore.from_config(StoreConfig(cpu_bytes=256 << 20, ssd_dir=str(root / "ssd"), ssd_fsync="never"))
    engine = Engine(smollm2, store)
    settings = Settings(data_dir=root, api_keys=KEYS, admin_keys=[ADMIN_KEY], limits=LIMITS)
    with BackgroundServer(create_app(engine, settings)) as server:
        yield Service(server.url, engine, settings, root)
    store.close()


@pytest.fixture(scope="package")
def alice(service: Service) -> Iterator[httpx.Client]:
    with service.client("sk-alice") as client:
        yield client


@pytest.fixture(scope="package")
def bob(service: Service) -> Iterator[httpx.Client]:
    with service.client("sk-bob") as client:
        yield client


DOCS = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was completed in 1889 and is "
    "330 metres tall.",
    "Mount Fuji is the highest mountain in Japan, rising to 3,776 metres. It is an active volcano about "
    "100 kilometres south-west of Tokyo.",
    "The Amazon is the largest river in the world by discharge volume. It flows through Brazil, Peru and "
    "Colombia into the Atlantic Ocean.",
]


def wait_writebacks(client: httpx.Client, timeout_s: float = 120.0) -> None:
    """Block until the service has stored what earlier requests computed (background writebacks)."""
    deadline = time.monotonic() + timeout_s
    while client.get("/v1/stats").json()["writeback_pending"]:
        assert time.monotonic() < deadline, "writebacks did not finish"
        time.sleep(0.05)


def assert_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """``response`` is a JSON error of ``status`` in the documented shape; returns the error object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and "param" in error
    return dict(error)


def chat(client: httpx.Client, question: str, **fields: Any) -> dict[str, Any]:
    """A greedy chat request (4 new tokens unless given); asserts 200 and returns the JSON."""
    body = {"model": "default", "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": 4, **fields}  # fmt: skip
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return dict(r.json())
