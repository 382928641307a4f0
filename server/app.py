"""The FastAPI application: ``create_app(engine, settings)``.

Routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/logprobs``, ``/v1/models`` (OpenAI
compatible, ``server.routes_openai``); ``/v1/chunks``, ``/v1/chunks/{key}``, ``/v1/prefetch`` (chunk
API, ``server.routes_chunks``); ``/healthz``, ``/v1/stats``, ``/metrics`` (``server.routes_admin``).

Blocking engine and store calls run in the threadpool, so HTTP and store I/O stay concurrent while the
engine serializes model execution; after a response the request's new KV is written back in a
background task.
"""

from __future__ import annotations

from fastapi import FastAPI

from blending.engine import Engine
from server import errors
from server.config import Settings
from server.middleware import ServiceMiddleware
from server.routes_admin import router as admin_router
from server.routes_chunks import router as chunks_router
from server.routes_openai import router as openai_router
from server.state import ServerState

DESCRIPTION = """KV-reuse sidecar: OpenAI-compatible completions whose reusable chunks (documents, content
parts with `cache_control`) take their KV from a tiered cache and are blended into the prompt.
Every response reports `usage.prompt_tokens_details.cached_tokens` and a `kvfuse` object."""


def create_app(engine: Engine, settings: Settings | None = None) -> FastAPI:
    """Build the service around a ready engine (its store included)."""
    settings = settings or Settings()
    state = ServerState.build(engine, settings)
    app = FastAPI(title="kvfuse", version="0.1.0", description=DESCRIPTION)
    app.state.kvfuse = state
    errors.install(app)
    app.include_router(openai_router)
    app.include_router(chunks_router)
    app.include_router(admin_router)
    app.add_middleware(ServiceMiddleware, max_body_bytes=settings.limits.max_body_bytes, metrics=state.metrics)
    return app
