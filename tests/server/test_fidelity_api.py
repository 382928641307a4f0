"""The default path keeps the answer over HTTP: auto on the README's request shape, immediate reuse of a
request sent twice, fidelity options and the fidelity view in /v1/stats and /metrics."""

from __future__ import annotations

import httpx

from tests.server.conftest import ADMIN_KEY, Service, assert_error, chat, wait_writebacks

README_DOCS = ["Paris is the capital and largest city of France, on the Seine.",
               "Berlin is the capital of Germany and its largest city, on the Spree."]
QUESTION = "What are the capitals of France and Germany?"


def test_short_documents_reordered_keep_the_dense_answer(bob: httpx.Client) -> None:
    """The README example, then the same documents reordered: auto answers exactly as dense does."""
    chat(bob, QUESTION, documents=README_DOCS, max_tokens=16)
    wait_writebacks(bob)
    moved = list(reversed(README_DOCS))
    auto = chat(bob, QUESTION, documents=moved, max_tokens=16)
    dense = chat(bob, QUESTION, documents=moved, max_tokens=16, kvfuse={"mode": "dense"})
    assert auto["choices"][0]["message"]["content"] == dense["choices"][0]["message"]["content"]
    info = auto["kvfuse"]
    assert info["mode"] in ("prefix", "dense") and info["reused_tokens"] == 0 and info["recomputed_tokens"] == 0
    assert "short prompt" in (info["fallback_reason"] or "")


def test_identical_request_twice_is_served_from_cache(bob: httpx.Client) -> None:
    body = {"documents": ["The lighthouse on the northern cape was built in 1871 and is painted red."],
            "max_tokens": 4}
    first = chat(bob, "When was the lighthouse built?", **body)
    second = chat(bob, "When was the lighthouse built?", **body)  # no pause: nothing written back yet
    info = second["kvfuse"]
    assert info["mode"] == "prefix" and info["exact_tokens"] == info["prompt_tokens"] - 1
    assert second["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]


def test_fidelity_options_and_stats(bob: httpx.Client, service: Service) -> None:
    ok = chat(bob, QUESTION, documents=README_DOCS, kvfuse={"mode": "auto", "fidelity_target": 0.99})
    assert ok["kvfuse"]["mode"] in ("prefix", "dense")
    bad = bob.post("/v1/chat/completions", json={"model": "default", "messages": [{"role": "user", "content": "x"}],
                                                 "kvfuse": {"fidelity_target": 1.5}})
    assert "fidelity_target" in str(assert_error(bad, 400)["param"]) + str(assert_error(bad, 400)["message"])
    view = bob.get("/v1/stats").json()["fidelity"]
    assert view["target"] == 0.95 and view["guard_sample_rate"] == service.engine.config.guard.sample_rate
    assert isinstance(view["guard"], dict)
    with service.client(ADMIN_KEY) as admin:
        assert "fidelity" in admin.get("/v1/stats").json()
    metrics = httpx.get(f"{service.url}/metrics").text
    assert "kvfuse_requests" in metrics
