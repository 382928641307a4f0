"""API-key authentication: ``Authorization: Bearer <key>`` -> tenant namespace."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from server.errors import APIError
from server.state import StateDep

DEFAULT_TENANT = "default"


def resolve_tenant(api_keys: dict[str, str], authorization: str | None) -> str:
    """The tenant of a request. With no keys configured everyone is the single tenant ``default``;
    otherwise a missing or unknown key raises a 401 :class:`APIError`."""
    if not api_keys:
        return DEFAULT_TENANT
    if not authorization:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "malformed Authorization header: expected 'Bearer <key>'")
    tenant = None
    for key, name in api_keys.items():  # compare with every key in constant time
        if hmac.compare_digest(key.encode(), token.encode()):
            tenant = name
    if tenant is None:
        raise APIError(401, "invalid API key")
    return tenant


def _bearer(authorization: str | None) -> str | None:
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def is_admin(admin_keys: list[str], authorization: str | None) -> bool:
    """Whether the request carries one of the admin keys (compared in constant time)."""
    token = _bearer(authorization)
    if token is None:
        return False
    found = False
    for key in admin_keys:
        found |= hmac.compare_digest(key.encode(), token.encode())
    return found


def scope(request: Request, state: StateDep) -> str | None:
    """FastAPI dependency for service-wide views (``/v1/stats``): None (everything) for an admin key, or
    when no API keys are configured (one tenant); else the caller's tenant (401 without a valid key)."""
    settings = state.settings
    if not settings.api_keys or is_admin(settings.admin_keys, request.headers.get("authorization")):
        request.state.tenant = "admin" if settings.api_keys else DEFAULT_TENANT
        return None
    return tenant(request, state)


def tenant(request: Request, state: StateDep) -> str:
    """FastAPI dependency: the request's tenant (also recorded for the access log)."""
    name = resolve_tenant(state.settings.api_keys, request.headers.get("authorization"))
    request.state.tenant = name
    return name


TenantDep = Annotated[str, Depends(tenant)]
ScopeDep = Annotated[str | None, Depends(scope)]
