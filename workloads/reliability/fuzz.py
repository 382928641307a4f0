"""Schema fuzzing: schemathesis generates requests from the service's own OpenAPI schema.

Every operation is fuzzed with schema-conforming (positive) and schema-violating (negative) cases under a
mix of credentials (alice, bob, none, a wrong key). Each response must be below 500, and every error a
JSON body of the documented shape (``{"error": {"message", "type", "param"}}``); the service must still
answer ``/healthz`` afterwards. Requests go over real HTTP to the live service.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections import Counter
from typing import Any

import requests
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from workloads.reliability.service import TENANT_KEYS, Harness
from workloads.reliability.tally import Tally

AUTHS: list[dict[str, str]] = [
    {"Authorization": f"Bearer {TENANT_KEYS['alice']}"},
    {"Authorization": f"Bearer {TENANT_KEYS['bob']}"},
    {},
    {"Authorization": "Bearer sk-wrong"},
]


def check_response(tally: Tally, method: str, path: str, status: int, headers: Any, content: bytes) -> None:
    """Count a 5xx or an error that is not the documented JSON shape."""
    where = f"{method} {path} -> {status}"
    if status >= 500:
        tally.fail("errors", f"{where}: {content[:200]!r}")
        return
    if status < 400 or method == "HEAD":
        return
    if not str(headers.get("content-type", "")).startswith("application/json"):
        tally.fail("errors", f"{where}: non-JSON error ({headers.get('content-type')})")
        return
    try:
        error = json.loads(content)["error"]
        ok = isinstance(error["message"], str) and isinstance(error["type"], str) and "param" in error
    except (ValueError, KeyError, TypeError):
        ok = False
    tally.check(ok, "errors", f"{where}: error body not in the documented shape: {content[:200]!r}")


def _operations(schema: Any) -> list[Any]:
    return [result.ok() for result in schema.get_all_operations()]


def run_fuzz(harness: Harness, *, examples: int = 1000, seed_value: int = 0, deadline_s: float = 600.0) -> Tally:
    """Send at least ``examples`` generated requests spread over all operations (both generation modes)."""
    import schemathesis
    from schemathesis import GenerationMode

    tally = Tally("fuzz (schemathesis)")
    start = time.perf_counter()
    schema = schemathesis.openapi.from_dict(harness.app.openapi())
    operations = _operations(schema)
    per_endpoint: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    session = requests.Session()
    stop_at = time.monotonic() + deadline_s

    def send(case: Any, auth: dict[str, str]) -> None:
        if time.monotonic() > stop_at:
            return
        label = f"{case.method.upper()} {case.operation.path}"
        try:
            response = case.call(base_url=harness.url, session=session, headers=auth, timeout=120)
        except Exception as exc:  # a dropped connection or a timeout is a failed request
            tally.requests += 1
            tally.fail("errors", f"{label}: {type(exc).__name__}: {exc}")
            return
        tally.requests += 1
        per_endpoint[label] += 1
        statuses[response.status_code] += 1
        if case.meta is not None and not case.meta.generation.mode.is_positive:
            tally.faults += 1  # a deliberately schema-violating request
        check_response(tally, case.method.upper(), case.operation.path, response.status_code,
                       {k.lower(): v[0] for k, v in response.headers.items()}, response.content)  # fmt: skip

    # A real chunk of alice's, so that fuzzed GET/HEAD/PUT/DELETE also reach stored data, not only 400s.
    warmed = session.post(f"{harness.url}/v1/chunks", json={"texts": ["Fuzzing target chunk."]}, headers=AUTHS[0])
    tally.requests += 1
    real_key = warmed.json()["keys"][0] if warmed.status_code == 200 else "0" * 32
    rounds = 0
    while tally.requests < examples and time.monotonic() < stop_at and rounds < 4:
        per_op = max(5, math.ceil((examples - tally.requests) / (2.5 * len(operations))) + 2)
        for i, op in enumerate(operations):
            for j, mode in enumerate((GenerationMode.POSITIVE, GenerationMode.NEGATIVE)):
                strategy = op.as_strategy(generation_mode=mode)
                _run(strategy, send, per_op, seed_value + 1000 * rounds + 10 * i + j)
                if "{key}" in op.path:
                    strategy = op.as_strategy(generation_mode=mode, path_parameters={"key": real_key})
                    _run(strategy, send, per_op, seed_value + 1000 * rounds + 10 * i + j + 5)
        rounds += 1
    health = session.get(f"{harness.url}/healthz", timeout=30)
    tally.requests += 1
    tally.check(health.status_code == 200, "errors", f"service not healthy after fuzzing: {health.status_code}")
    tally.seconds = time.perf_counter() - start
    tally.notes = {
        "operations": len(operations),
        "per_endpoint": dict(sorted(per_endpoint.items())),
        "statuses": dict(sorted(statuses.items())),
    }
    missing = [f"{op.method.upper()} {op.path}" for op in operations]
    missing = [m for m in missing if not per_endpoint[m]]
    tally.check(not missing, "bound", f"operations never fuzzed: {missing}")
    return tally


def _run(strategy: Any, send: Any, max_examples: int, seed_value: int) -> None:
    @seed(seed_value)
    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        derandomize=False,
    )
    @given(case=strategy, auth=st.sampled_from(AUTHS))
    def fuzz(case: Any, auth: dict[str, str]) -> None:
        send(case, auth)

    with contextlib.suppress(Unsatisfiable):  # nothing to violate (no parameters, in negative mode)
        fuzz()
