"""The Redis tier through the service (single local tenant, no keys), and health / stats / metrics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from blending.engine import Engine
from blending.model import LoadedModel
from kvstore import StoreConfig, TieredStore
from server.app import create_app
from server.config import Settings
from server.embedded import BackgroundServer
from tests.server.conftest import ADMIN_KEY, DOCS, Service, assert_error, chat, wait_writebacks


@pytest.fixture
def redis_service(
    smollm2: LoadedModel, redis_url: str, tmp_path: Path, single_thread_torch: None
) -> Iterator[httpx.Client]:
    store = TieredStore.from_config(StoreConfig(cpu_bytes=0, redis_url=redis_url))  # Redis is the only tier
    settings = Settings(data_dir=tmp_path)
    server = BackgroundServer(create_app(Engine(smollm2, store), settings))
    with server, httpx.Client(base_url=server.url, timeout=300) as client:
        yield client
    store.close()


def test_redis_tier_through_the_service(redis_service: httpx.Client) -> None:
    client = redis_service  # no API keys configured: one local tenant, no Authorization needed
    warmed = client.post("/v1/chunks", json={"texts": DOCS})
    assert warmed.status_code == 200, warmed.text
    key = warmed.json()["keys"][0]
    blob = client.get(f"/v1/chunks/{key}")
    assert blob.status_code == 200 and blob.content[:4] == b"KVFB"
    body = chat(client, "Which mountain is in Japan?", documents=[DOCS[2], DOCS[1], DOCS[0]], max_tokens=2)
    assert body["kvfuse"]["chunk_hits"] >= 3 and body["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    wait_writebacks(client)
    stats = client.get("/v1/stats").json()
    (redis,) = stats["store"]["tiers"]
    assert redis["kind"] == "RedisTier" and redis["available"]
    assert redis["hits"] >= 4 and redis["used_bytes"] > 0
    assert client.delete(f"/v1/chunks/{key}").status_code == 200
    assert client.head(f"/v1/chunks/{key}").status_code == 404
    assert client.put(f"/v1/chunks/{key}", content=blob.content).status_code == 200
    assert client.get(f"/v1/chunks/{key}").content == blob.content


def test_health_stats_metrics(alice: httpx.Client, service: Service) -> None:
    chat(alice, "Hello!", max_tokens=1)
    health = alice.get("/healthz").json()
    assert health["status"] == "ok" and health["model"] == "smollm2-135m-instruct"
    assert health["tiers"] == {"cpu": True, "ssd": True}
    assert alice.get("/v1/models").json()["data"][0]["id"] == health["model"]
    with service.client(ADMIN_KEY) as admin:
        stats = admin.get("/v1/stats").json()
    assert stats["scope"] == "service" and [t["name"] for t in stats["store"]["tiers"]] == ["cpu", "ssd"]
    for tier in stats["store"]["tiers"]:
        assert {"used_bytes", "budget_bytes", "hits", "misses", "evictions", "errors"} <= set(tier)
    reuse = stats["reuse"]
    assert reuse["requests"] >= 1 and reuse["prompt_tokens"] >= reuse["cached_tokens"] >= 0
    assert "ttft_saved_ms" in reuse and 0.0 <= reuse["reuse_rate"] <= 1.0 and reuse["queue_ms_total"] >= 0
    assert reuse["prompt_tokens"] == sum(reuse[k] for k in ("exact_tokens", "reused_tokens", "recomputed_tokens",
                                                            "computed_tokens"))  # fmt: skip
    metrics = alice.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for needle in (
        'kvfuse_requests_total{route="/v1/chat/completions",status="200"}',
        "kvfuse_ttft_seconds_bucket{",
        "kvfuse_queue_seconds_bucket{",
        "kvfuse_model_waiting ",
        "kvfuse_cached_tokens_total",
        "kvfuse_recomputed_tokens_total",
        'kvfuse_store_used_bytes{tier="cpu"}',
        'kvfuse_store_available{tier="ssd"} 1.0',
    ):
        assert needle in text, needle


def test_stats_are_scoped_to_the_caller(service: Service, alice: httpx.Client) -> None:
    with service.client("sk-carol") as carol, service.client(ADMIN_KEY) as admin:
        before = carol.get("/v1/stats").json()
        assert before["scope"] == "tenant" and before["tenant"] == "carol"
        alice_before = alice.get("/v1/stats").json()["reuse"]["requests"]
        chat(alice, "Count me for alice only.", max_tokens=1)
        after = carol.get("/v1/stats").json()
        assert after["reuse"] == before["reuse"]  # alice's traffic is not visible to carol
        mine = alice.get("/v1/stats").json()
        assert mine["tenant"] == "alice" and mine["reuse"]["requests"] == alice_before + 1
        for tier in mine["store"]["tiers"]:  # tier counters are service-wide: an admin's view only
            assert set(tier) == {"name", "kind", "available"}
        everything = admin.get("/v1/stats").json()
        assert everything["scope"] == "service" and everything["tenants"]["alice"] == mine["reuse"]
        assert everything["reuse"]["requests"] >= sum(t["requests"] for t in everything["tenants"].values())
        assert_error(admin.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}), 401)
        assert_error(service.client("sk-wrong").get("/v1/stats"), 401)
