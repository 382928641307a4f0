"""One token accounting everywhere: the engine's ``BlendStats`` and ``summary()``, the service's ``kvfuse``
block and usage, and the client's ``ReuseInfo`` report the same counts, and they add up to
``prompt_tokens`` in every mode."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from blending.accounting import TOKEN_FIELDS, TokenAccounting
from blending.fused import BlendStats
from connectors.client import ReuseInfo
from server.schemas import KVFuseInfo
from tests.server.conftest import DOCS, chat, wait_writebacks


def _check(info: dict[str, Any], usage: dict[str, Any] | None = None) -> ReuseInfo:
    exact, reused, recomputed, computed = (info[k] for k in TOKEN_FIELDS[1:])
    assert min(exact, reused, recomputed, computed) >= 0, info
    assert info["cached_tokens"] == exact + reused + recomputed, info
    assert info["prompt_tokens"] == info["cached_tokens"] + computed, info
    if info["mode"] == "dense":
        assert info["computed_tokens"] == info["prompt_tokens"] or info["requested_mode"] != "dense", info
    if usage is not None:
        assert usage["prompt_tokens"] == info["prompt_tokens"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == info["cached_tokens"]
    parsed = ReuseInfo.from_dict(info)  # the client validates the same way
    assert parsed.as_dict() == info
    return parsed


def test_the_counts_add_up_in_every_mode(alice: httpx.Client) -> None:
    docs = ["Accounting document one: the red ferry leaves the north pier every hour on the hour.",
            "Accounting document two: the blue tram climbs the hill to the observatory twice a day."]  # fmt: skip
    question = "When does the red ferry leave?"
    chat(alice, question, documents=docs)
    wait_writebacks(alice)
    seen: dict[str, set[str]] = {}
    for i, mode in enumerate(("dense", "naive", "blend", "auto", "anchor", "hybrid", "anchor", "hybrid")):
        note = f"Request {i} note: this one is about something else entirely, number {i}."  # new: no exact prefix
        body = chat(alice, question, documents=[note, *docs[::-1]], kvfuse={"mode": mode}, max_tokens=2)
        info = _check(body["kvfuse"], body["usage"])
        seen.setdefault(mode, set()).add(info.mode)
        if mode in ("naive", "blend"):
            assert info.mode == mode and info.reused_tokens > 0, info
            assert info.recomputed_tokens == 0 if mode == "naive" else info.recomputed_tokens > 0, info
        if mode == "dense":
            assert info.cached_tokens == 0 and info.computed_tokens == info.prompt_tokens
        wait_writebacks(alice)
    again = chat(alice, question, documents=docs, kvfuse={"mode": "blend"}, max_tokens=2)
    info = _check(again["kvfuse"], again["usage"])  # the first (computed) prompt again: an exact hit
    assert info.exact_tokens > 0 and info.reused_tokens == info.recomputed_tokens == 0, info
    print("modes used per requested mode:", seen)


def test_the_counts_add_up_on_every_endpoint(alice: httpx.Client) -> None:
    docs = [DOCS[0], DOCS[2]]
    done = alice.post("/v1/completions", json={"prompt": "Paris:", "documents": docs, "max_tokens": 2,
                                               "temperature": 0, "kvfuse": {"mode": "blend"}})  # fmt: skip
    assert done.status_code == 200, done.text
    _check(done.json()["kvfuse"], done.json()["usage"])
    body = {"messages": [{"role": "user", "content": "Where is Paris?"}], "documents": docs[::-1],
            "continuation": " In France.", "kvfuse": {"mode": "naive"}}  # fmt: skip
    scored = alice.post("/v1/logprobs", json=body)
    assert scored.status_code == 200, scored.text
    _check(scored.json()["kvfuse"], scored.json()["usage"])
    stream = {"messages": body["messages"], "documents": docs, "max_tokens": 2, "stream": True}
    with alice.stream("POST", "/v1/chat/completions", json=stream) as r:
        last = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")][-1]
    _check(last["kvfuse"], last["usage"])


def test_one_type_refuses_counts_that_do_not_add_up() -> None:
    ok = {"prompt_tokens": 10, "exact_tokens": 2, "reused_tokens": 5, "recomputed_tokens": 1, "computed_tokens": 2}
    assert TokenAccounting(**ok).cached_tokens == 8
    assert BlendStats(total_tokens=10, **{k: v for k, v in ok.items() if k != "prompt_tokens"}).cached_tokens == 8
    report = {**ok, "mode": "blend", "ttft_ms": 1.0}
    assert KVFuseInfo(**report).model_dump()["cached_tokens"] == 8
    for bad in ({**ok, "computed_tokens": 3}, {**ok, "cached_tokens": 7}, {**ok, "reused_tokens": -1}):
        with pytest.raises(ValidationError):
            TokenAccounting(**bad)
        with pytest.raises(ValidationError):
            ReuseInfo.from_dict({**bad, "mode": "blend", "ttft_ms": 1.0})
    with pytest.raises(ValidationError):
        BlendStats(total_tokens=10, computed_tokens=9)
    assert "cached_tokens" in KVFuseInfo.model_json_schema(mode="serialization")["properties"]
