"""The FastAPI application: ``create_app(engine, settings)``.

Routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/logprobs``, ``/v1/models`` (OpenAI
compatible, ``server.routes_openai``); ``/v1/chunks``, ``/v1/chunks/{key}``, ``/v1/prefetch`` (chunk
API, ``server.routes_chunks``); ``/healthz``, ``/v1/stats``, ``/metrics`` (``server.routes_admin``);
``/openapi.json`` and ``/docs`` (need a key like every route but ``/healthz`` and ``/metrics``).

Blocking engine and store calls run in the threadpool, so HTTP and store I/O stay concurrent while the
engine's fair model lock (``blending.scheduler``) hands the model out in turns, round-robin across
tenants; after a response the request's new KV is written back in a background task.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from blending.engine import Engine
from server import errors
from server.auth import ScopeDep
from server.config import Settings
from server.middleware import ServiceMiddleware
from server.routes_admin import router as admin_router
from server.routes_chunks import router as chunks_router
from server.routes_openai import router as openai_router
from server.state import ServerState

DESCRIPTION = """KV-reuse sidecar: OpenAI-compatible completions whose reusable chunks (documents, content
parts with `cache_control`) take their KV from a tiered cache and are blended into the prompt.
Every response reports `usage.prompt_tokens_details.cached_tokens` and a `kvfuse` object."""


_SWAGGER = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui"
docs_router = APIRouter(include_in_schema=False)


@docs_router.get("/openapi.json")
async def openapi(request: Request, _: ScopeDep) -> JSONResponse:
    """The OpenAPI schema (any valid API key)."""
    return JSONResponse(request.app.openapi())


@docs_router.get("/docs")
async def docs(request: Request, _: ScopeDep) -> HTMLResponse:
    """Swagger UI with the schema inlined (a browser cannot send the key for a second request)."""
    spec = json.dumps(request.app.openapi()).replace("</", "<\\/")
    return HTMLResponse(
        f"""<!doctype html><html><head><title>kvfuse API</title><link rel="stylesheet" href="{_SWAGGER}.css">
</head><body><div id="swagger-ui"></div><script src="{_SWAGGER}-bundle.js"></script>
<script>SwaggerUIBundle({{spec: {spec}, dom_id: "#swagger-ui"}});</script></body></html>"""
    )


def create_app(engine: Engine, settings: Settings | None = None) -> FastAPI:
    """Build the service around a ready engine (its store included). The engine's model lock takes its
    chunk size from ``settings.prefill_chunk_tokens``."""
    settings = settings or Settings()
    engine.model_lock.chunk_tokens = settings.prefill_chunk_tokens
    state = ServerState.build(engine, settings)
    app = FastAPI(
        title="kvfuse", version="0.1.0", description=DESCRIPTION, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.kvfuse = state
    errors.install(app)
    app.include_router(openai_router)
    app.include_router(chunks_router)
    app.include_router(admin_router)
    app.include_router(docs_router)
    app.add_middleware(ServiceMiddleware, max_body_bytes=settings.limits.max_body_bytes, metrics=state.metrics)
    return app
