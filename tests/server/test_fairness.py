"""Fair model scheduling over real HTTP: a short request of one tenant is not stuck behind another tenant's
long prefill or scoring; a request that cannot get the model before its deadline gets a 503; queue time is
reported apart from TTFT."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from blending.engine import Engine
from blending.model import LoadedModel
from blending.scheduler import tenant
from kvstore import StoreConfig, TieredStore
from server.app import create_app
from server.config import Limits, Settings
from server.embedded import BackgroundServer
from tests.server.conftest import KEYS, Service, assert_error

CHUNK = 32  # tokens between two turns offered to other tenants (small: the test model is fast)
LONG = " ".join(f"The {i}th lantern by the harbour wall was lit at dusk." for i in range(50))  # ~600 tokens


@pytest.fixture(scope="module")
def fair_service(smollm2: LoadedModel, tmp_path_factory: pytest.TempPathFactory,
                 single_thread_torch: None) -> Iterator[Service]:  # fmt: skip
    root = tmp_path_factory.mktemp("kvfuse-fair")
    store = TieredStore.from_config(StoreConfig(cpu_bytes=256 << 20))
    engine = Engine(smollm2, store)
    limits = Limits(max_prompt_tokens=2048, max_completion_tokens=16)
    settings = Settings(data_dir=root, api_keys=KEYS, limits=limits, prefill_chunk_tokens=CHUNK)
    with BackgroundServer(create_app(engine, settings)) as server:
        yield Service(server.url, engine, settings, root)
    store.close()


def _short(client: httpx.Client) -> tuple[float, dict[str, Any]]:
    body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2, "temperature": 0,
            "kvfuse": {"mode": "dense"}}  # fmt: skip
    t0 = time.monotonic()
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return time.monotonic() - t0, r.json()["kvfuse"]


LONG_REQUESTS = {
    "long continuation (teacher-forced scoring)": {
        "messages": [{"role": "user", "content": "Describe the harbour."}], "continuation": LONG,
        "top_logprobs": 0, "kvfuse": {"mode": "dense"}},
    "long prompt (dense prefill)": {
        "messages": [{"role": "user", "content": LONG}], "continuation": " Yes.", "top_logprobs": 0,
        "kvfuse": {"mode": "dense"}},
}  # fmt: skip


@pytest.mark.parametrize("kind", list(LONG_REQUESTS))
def test_a_short_chat_runs_while_another_tenant_runs_a_long_request(fair_service: Service, kind: str) -> None:
    lock = fair_service.engine.model_lock
    with fair_service.client("sk-alice") as alice, fair_service.client("sk-bob") as bob:
        idle, _ = _short(bob)  # also warms the code paths
        done: dict[str, float] = {}

        def long_request() -> None:
            t0 = time.monotonic()
            r = alice.post("/v1/logprobs", json=LONG_REQUESTS[kind])
            assert r.status_code == 200, r.text
            done["long_s"], done["long_end"] = time.monotonic() - t0, time.monotonic()

        worker = threading.Thread(target=long_request)
        worker.start()
        deadline = time.monotonic() + 60
        while lock.holder() != "alice":  # alice's request is computing
            assert time.monotonic() < deadline and worker.is_alive(), "the long request never took the model"
            time.sleep(0.005)
        busy, info = _short(bob)
        short_end = time.monotonic()
        worker.join(300)
    assert "long_s" in done
    assert short_end < done["long_end"], (busy, done)  # bob did not wait for alice's request to finish
    assert busy < 0.5 * done["long_s"], (busy, idle, done)
    assert lock.yields > 0
    assert 0 <= info["queue_ms"] <= info["ttft_ms"]


def test_a_request_that_cannot_get_the_model_in_time_gets_503(fair_service: Service) -> None:
    engine: Engine = fair_service.engine
    settings = fair_service.settings
    old, settings.request_deadline_s = settings.request_deadline_s, 0.3
    try:
        with fair_service.client("sk-bob") as bob:
            with tenant("maintenance"), engine.model_lock:  # the model is busy and never yields
                t0 = time.monotonic()
                r = bob.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                           "max_tokens": 1})  # fmt: skip
                waited = time.monotonic() - t0
            error = assert_error(r, 503)
            assert error["type"] == "overloaded" and "request_deadline_s" in error["message"]
            assert int(r.headers["retry-after"]) >= 1 and 0.25 < waited < 10
            assert engine.model_lock.waiting() == 0  # the refused request left the queue
            _, info = _short(bob)  # the same connection, the model free again: served
            assert info["queue_ms"] < 250
    finally:
        settings.request_deadline_s = old
