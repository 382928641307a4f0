"""Health, stats and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from server.auth import ScopeDep
from server.state import ServerState, StateDep

router = APIRouter(tags=["admin"])


@router.get("/healthz")
async def healthz(state: StateDep) -> dict[str, Any]:
    """Liveness and a summary: model, fingerprint, tiers available (no auth)."""
    tiers = await run_in_threadpool(lambda: state.engine.store.stats().as_dict()["tiers"])
    return {
        "status": "ok",
        "model": state.model_name,
        "fingerprint": state.engine.fingerprint,
        "reuse_supported": state.engine.adapter is not None,
        "tiers": {t["name"]: t["available"] for t in tiers},
    }


@router.get("/v1/stats")
async def stats(scope: ScopeDep, state: StateDep) -> dict[str, Any]:
    """Reuse totals (prompt/exact/reused/recomputed/computed/cached tokens, queue time, dense fallbacks,
    estimated TTFT saved) and pending writebacks of the caller's tenant. Store tiers: availability only.
    An admin key (``admin_keys``), or a service without API keys, sees the whole service: every tier's
    counters (bytes, budget, hits, misses, evictions, errors), the totals over all tenants and per tenant."""
    store = await run_in_threadpool(lambda: state.engine.store.stats().as_dict())
    out: dict[str, Any] = {"model": state.model_name, "scope": "service" if scope is None else "tenant"}
    if scope is None:
        out["store"] = store
        out["reuse"] = state.metrics.totals_dict()
        out["tenants"] = {t: state.metrics.totals_dict(t) for t in sorted(state.metrics.by_tenant)}
    else:
        out["tenant"] = scope
        out["store"] = {"tiers": [{k: t[k] for k in ("name", "kind", "available")} for t in store["tiers"]]}
        out["reuse"] = state.metrics.totals_dict(scope)
    out["writeback_pending"] = state.pending(scope)
    out["fidelity"] = fidelity_view(state, scope)
    return out


def fidelity_view(state: ServerState, scope: str | None) -> dict[str, Any]:
    """auto's target and calibration (model-wide), and the guard's running kept answers and agreement per mode: the
    caller's tenant only, or pooled over all tenants for the service view."""
    engine = state.engine
    cal = engine.calibration() if engine.adapter is not None else None
    guard = engine.guard.snapshot(scope) if engine.guard is not None else {}
    return {"target": engine.config.policy.fidelity_target, "calibration": cal.as_dict() if cal else None,
            "guard_sample_rate": engine.config.guard.sample_rate, "guard": guard}


@router.get("/metrics", response_class=Response)
async def metrics(state: StateDep) -> Response:
    """Prometheus text format: requests by route/status, TTFT by mode, token counters, tier gauges."""
    body = await run_in_threadpool(generate_latest, state.metrics.registry)
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)
