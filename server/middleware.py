"""ASGI middleware: request-body size limit, request metrics and one structured log line per request."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_response
from server.metrics import Metrics

access_log = logging.getLogger("kvfuse.access")
log = logging.getLogger("kvfuse.server")
_LOG_FIELDS = ("tenant", "mode", "cached_tokens", "prompt_tokens", "ttft_ms", "queue_ms", "fallback_reason")


class ServiceMiddleware:
    """Refuses bodies over ``max_body_bytes`` with 413 (by Content-Length, or while reading a chunked
    body), counts requests by route template and status, and logs one JSON line per request: route,
    status, tenant, mode, cached tokens, TTFT and duration (never API keys, prompts or KV)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state: dict[str, Any] = scope.setdefault("state", {})
        state["arrival"] = time.monotonic()  # TTFT and the scheduler's deadline run from here
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        started = [False]

        async def send_tracking(message: Message) -> None:
            started[0] = started[0] or message["type"] == "http.response.start"
            await send_wrapper(message)

        try:
            limited = await self._limit(scope, receive, send_tracking)
            if limited is not None:
                await self.app(scope, limited, send_tracking)
        except Exception as exc:
            # An unexpected error. Answer it here, without re-raising: uvicorn closes the connection of an
            # application that raised, which would reset a client's keep-alive connection after its 500.
            log.exception("unhandled error")
            if started[0]:
                raise  # the response is under way (a stream): it cannot be turned into an error any more
            await error_response(500, f"internal error: {type(exc).__name__}", None)(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(route=path, status=str(status[0])).inc()
            line: dict[str, Any] = {"method": scope["method"], "route": path, "status": status[0]}
            line.update({k: state[k] for k in _LOG_FIELDS if k in state})
            line["duration_ms"] = round((time.perf_counter() - start) * 1000, 2)
            access_log.info(json.dumps(line, default=str))

    async def _limit(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """The receive channel to use, or None when a 413 was already sent."""
        limit = self.max_body_bytes
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                too_big = False
            if too_big:
                await self._refuse(scope, receive, send, int(length))
                return None
            return receive
        if b"transfer-encoding" not in headers:
            return receive
        body, messages = 0, []
        while True:  # chunked body: read it here, counting, then replay it
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            body += len(message.get("body", b""))
            if body > limit:
                await self._refuse(scope, receive, send, body)
                return None
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        return replay

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: int) -> None:
        response = error_response(
            413, f"request body of {size}+ bytes exceeds the limit of {self.max_body_bytes} bytes", "body"
        )
        await response(scope, receive, send)
