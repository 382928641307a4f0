"""Schemathesis against the service's own OpenAPI schema: >= 1,000 requests, no 5xx, JSON 4xx errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from blending.model import LoadedModel
from tests.reliability.conftest import assert_clean
from workloads.reliability.fuzz import check_response
from workloads.reliability.service import running_service
from workloads.reliability.tally import Tally

pytest.importorskip("schemathesis")


@pytest.mark.slow
def test_schemathesis_1000_requests(smollm2: LoadedModel, tmp_path: Path) -> None:
    from workloads.reliability.fuzz import run_fuzz

    with running_service(smollm2, tmp_path) as h:
        tally = run_fuzz(h, examples=1000)
    assert_clean(tally, min_requests=1000, min_faults=200)
    assert len(tally.notes["per_endpoint"]) == tally.notes["operations"] >= 13
    assert 200 in tally.notes["statuses"] and 400 in tally.notes["statuses"]


def test_fuzz_found_regressions(smollm2: LoadedModel, tmp_path: Path) -> None:
    """Requests that once answered 500 (found by the fuzzer): a temperature so small that logits / T
    overflows, and seeds outside the 64-bit range of a torch generator."""
    base = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    cases = [{"temperature": 5e-324}, {"temperature": 1e-30}, {"seed": 2**70, "temperature": 0.7},
             {"seed": -(2**70), "temperature": 0.7}, {"seed": -1, "temperature": 0.7}]  # fmt: skip
    with running_service(smollm2, tmp_path) as h, h.client("alice") as c:
        for fields in cases:
            for path in ("/v1/chat/completions", "/v1/completions"):
                body = {**base, **fields} if "chat" in path else {"prompt": "Hi", "max_tokens": 2, **fields}
                r = c.post(path, json=body)
                assert r.status_code == 200, (path, fields, r.text)


def test_check_response_flags_bad_errors() -> None:
    tally = Tally("t")
    check_response(tally, "GET", "/x", 500, {"content-type": "application/json"}, b'{"error": {}}')
    check_response(tally, "GET", "/x", 400, {"content-type": "text/html"}, b"<html>")
    check_response(tally, "GET", "/x", 404, {"content-type": "application/json"}, b'{"detail": "x"}')
    check_response(tally, "HEAD", "/x", 404, {}, b"")
    ok = b'{"error": {"message": "m", "type": "t", "param": null}}'
    check_response(tally, "GET", "/x", 404, {"content-type": "application/json"}, ok)
    assert tally.errors == 3
