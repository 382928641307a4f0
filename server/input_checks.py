"""Checks of a request's raw JSON that no single field's schema expresses.

A JSON string may carry a lone UTF-16 surrogate as an escape (``"\\ud800"``): valid JSON, but not Unicode
text. Python keeps it in the ``str``; the tokenizer then fails (a ``TypeError``), and so would any attempt
to encode it as UTF-8 (a response echoing it, a log line). :func:`refuse_lone_surrogates` runs as a route
dependency after authentication and before the body is validated, and answers 400 naming the field.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from server.auth import TenantDep
from server.errors import APIError


def _printable(key: str) -> str:
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def find_lone_surrogate(value: Any, path: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """The path (keys and list indices) of the first string, or mapping key, that is not valid Unicode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            here = (*path, _printable(str(key)))
            if isinstance(key, str) and find_lone_surrogate(key) is not None:
                return here
            found = find_lone_surrogate(item, here)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = find_lone_surrogate(item, (*path, str(i)))
            if found is not None:
                return found
    return None


async def refuse_lone_surrogates(request: Request, _: TenantDep) -> None:
    """Route dependency: a JSON body with a lone surrogate anywhere gets a 400 naming the field."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return
    if not request.headers.get("content-type", "").split(";")[0].strip().endswith("json"):
        return
    try:
        body = await request.json()  # already parsed (and cached) by FastAPI for routes with a JSON body
    except Exception:
        return  # malformed JSON: FastAPI's own validation answers it
    path = find_lone_surrogate(body)
    if path is not None:
        param = ".".join(path) or None
        raise APIError(
            400,
            f"{param or 'body'}: text contains a lone UTF-16 surrogate (such as \\ud800), which is not valid "
            "Unicode; send valid UTF-8 text",
            param,
        )
