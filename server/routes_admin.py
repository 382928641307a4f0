"""Health, stats and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from server.auth import TenantDep
from server.state import StateDep

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
async def stats(_: TenantDep, state: StateDep) -> dict[str, Any]:
    """Store counters per tier (bytes, budget, hits, misses, evictions, errors) and totals, plus reuse
    totals: prompt/cached/reused/recomputed tokens, dense fallbacks and the estimated TTFT saved."""
    store = await run_in_threadpool(lambda: state.engine.store.stats().as_dict())
    return {
        "model": state.model_name,
        "store": store,
        "reuse": state.metrics.totals_dict(),
        "writeback_pending": state.pending_writebacks,
    }


@router.get("/metrics", response_class=Response)
async def metrics(state: StateDep) -> Response:
    """Prometheus text format: requests by route/status, TTFT by mode, token counters, tier gauges."""
    body = await run_in_threadpool(generate_latest, state.metrics.registry)
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)
