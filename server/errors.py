"""OpenAI-style JSON errors: ``{"error": {"message", "type", "param"}}`` for every failure."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from blending.scheduler import QueueTimeout
from kvstore.errors import CodecError

log = logging.getLogger("kvfuse.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    422: "invalid_blob_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """Raised by handlers; rendered as a JSON error with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type = type or _TYPES.get(status, "invalid_request_error")


def error_response(
    status: int, message: str, param: str | None = None, type: str | None = None, headers: Any = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": type or _TYPES.get(status, "error"), "param": param}}
    return JSONResponse(body, status_code=status, headers=headers)


_FIELD = re.compile(r"[a-z_][a-z0-9_]*|[0-9]+")
_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _loc(loc: tuple[Any, ...]) -> str | None:
    """``body.documents.0.Document.id`` -> ``documents.0.id``: the request path, without the union member
    tags pydantic adds (``str``, ``Document``, ``function-after[...]``)."""
    parts = [str(p) for p in loc[1:] if _FIELD.fullmatch(str(p)) and str(p) not in _TYPE_TAGS] if loc else []
    if loc and loc[0] != "body":
        parts.insert(0, str(loc[0]))
    return ".".join(parts) or None


def _relevant(errors: list[Any]) -> Any:
    """The error to report: a value's own error (``must be a finite number``) before a union member's type
    mismatch (``Input should be a valid string``), the most specific (deepest) first."""
    def rank(e: Any) -> tuple[bool, int]:
        return str(e.get("type", "")).endswith("_type"), -len(_loc(tuple(e.get("loc", ()))) or "")

    return min(errors, key=rank)


def _msg(error: Any) -> str:
    """Pydantic's message without the ``Value error, `` prefix of our own validators."""
    return str(error.get("msg", "invalid value")).removeprefix("Value error, ")


def retry_after_s(exc: QueueTimeout) -> int:
    """The ``Retry-After`` of a 503 for a request that could not get a turn: 1 s per request waiting, 1-60 s."""
    return max(1, min(60, exc.waiting))


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into the JSON error shape (never an HTML page)."""

    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.message, exc.param, exc.type, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        first = _relevant(errors) if errors else {"msg": "invalid request", "loc": ()}
        param = _loc(tuple(first.get("loc", ())))
        if first.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON body: {first.get('msg')}", None)
        if param is None:
            return error_response(400, "the request body must be a JSON object", None)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return error_response(400, f"{param or 'body'}: {_msg(first)}{more}", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), None, headers=exc.headers)

    @app.exception_handler(CodecError)
    async def _codec(_: Request, exc: CodecError) -> JSONResponse:
        return error_response(422, f"invalid blob ({type(exc).__name__}): {exc}", "body")

    @app.exception_handler(QueueTimeout)
    async def _busy(_: Request, exc: QueueTimeout) -> JSONResponse:
        headers = {"Retry-After": str(retry_after_s(exc))}
        return error_response(503, f"{exc} (request_deadline_s)", None, "overloaded", headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}", None)
