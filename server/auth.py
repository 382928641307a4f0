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


def tenant(request: Request, state: StateDep) -> str:
    """FastAPI dependency: the request's tenant (also recorded for the access log)."""
    name = resolve_tenant(state.settings.api_keys, request.headers.get("authorization"))
    request.state.tenant = name
    return name


TenantDep = Annotated[str, Depends(tenant)]
