"""The chunk API: warm chunks, and get/put/head/delete/prefetch their KV blobs by (tenant-scoped) key.

Keys in this API are public keys (``server.tenancy``): opaque 32-hex handles that only the tenant they
were issued to can use. Blobs are ``kvstore.codec`` blobs of the served model.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from starlette.concurrency import run_in_threadpool

from blending.adapter import UnsupportedModelError
from kvstore.codec import peek_header
from kvstore.errors import CodecError
from kvstore.keys import ChunkKey
from server.auth import TenantDep
from server.errors import APIError
from server.generation import check_model
from server.input_checks import refuse_lone_surrogates
from server.routes_openai import ERRORS
from server.schemas import ChunksRequest, ChunksResponse, PrefetchRequest
from server.state import ServerState, StateDep

router = APIRouter(tags=["chunks"], dependencies=[Depends(refuse_lone_surrogates)])
BLOB = {"content": {"application/octet-stream": {}}, "description": "a kvstore codec blob"}


def _key(state: ServerState, tenant_name: str, key: str) -> ChunkKey:
    try:
        return state.keys.stored(tenant_name, key)
    except ValueError as exc:
        raise APIError(400, f"bad chunk key: {exc}", "key") from exc


def _check_layout(state: ServerState, blob: bytes) -> None:
    """Refuse blobs whose shape or dtype is not this model's KV layout (before anything is stored)."""
    hdr = peek_header(blob)
    layout = f"l{hdr.num_layers}h{hdr.num_kv_heads}d{hdr.head_dim}:{hdr.dtype}"
    if layout != state.engine.layout:
        raise CodecError(f"blob layout {layout} does not match the model's {state.engine.layout}")


@router.post("/v1/chunks", response_model=ChunksResponse, responses=ERRORS)
async def warm_chunks(body: ChunksRequest, tenant_name: TenantDep, state: StateDep) -> ChunksResponse:
    """Precompute and store the KV of ``texts`` (computed after the chat prefix of ``prefix``, so later
    chat requests with that system prompt reuse them); returns one public key per text."""
    check_model(state, body.model)
    limit = state.settings.limits.max_documents
    if len(body.texts) > limit:
        raise APIError(400, f"{len(body.texts)} texts; the limit is {limit}", "texts", "too_many_documents")
    if any(not t for t in body.texts):
        raise APIError(400, "texts must not be empty strings", "texts")
    prefix = (body.prefix or "") if body.raw_prefix else state.renderer.chat_prefix(body.prefix)
    engine, max_tokens = state.engine, state.settings.limits.max_prompt_tokens

    def warm() -> tuple[list[ChunkKey], list[int]]:
        tokens = [len(engine.tokenize(t)) for t in body.texts]
        if max(tokens) > max_tokens:
            raise APIError(
                400, f"a text has {max(tokens)} tokens; the limit is {max_tokens}", "texts", "prompt_too_long"
            )
        try:
            return engine.warm(body.texts, tenant_name, prefix or None), tokens
        except UnsupportedModelError as exc:
            raise APIError(400, f"chunk KV is not available for this model: {exc}") from exc

    keys, tokens = await run_in_threadpool(warm)
    return ChunksResponse(
        keys=[state.keys.public(tenant_name, k) for k in keys],
        tokens=tokens,
        prefix_tokens=len(engine.tokenize(prefix)) if prefix else 0,
    )


@router.get("/v1/chunks/{key}", response_class=Response, responses={200: BLOB, **ERRORS})
async def get_chunk(key: str, tenant_name: TenantDep, state: StateDep) -> Response:
    """The chunk's codec blob (``application/octet-stream``); 404 when absent."""
    blob = await run_in_threadpool(state.engine.store.get_blob, _key(state, tenant_name, key))
    if blob is None:
        raise APIError(404, f"no chunk {key}", "key")
    return Response(content=blob, media_type="application/octet-stream")


@router.head("/v1/chunks/{key}", response_class=Response)
async def head_chunk(key: str, tenant_name: TenantDep, state: StateDep) -> Response:
    """200 when the chunk is stored (in any tier), else 404 (no body)."""
    found = await run_in_threadpool(state.engine.store.contains, _key(state, tenant_name, key))
    return Response(status_code=200 if found else 404)


@router.put(
    "/v1/chunks/{key}",
    responses={200: {"description": "stored"}, 422: ERRORS[400], **ERRORS},
    openapi_extra={"requestBody": {"required": True, **BLOB}},
)
async def put_chunk(key: str, request: Request, tenant_name: TenantDep, state: StateDep) -> dict[str, Any]:
    """Upload a codec blob. Validated (magic, version, checksums, model fingerprint, KV layout) before
    anything is stored: a bad blob gets 422 with the reason and leaves what is stored untouched."""
    stored = _key(state, tenant_name, key)
    blob = await request.body()

    def put() -> int:
        _check_layout(state, blob)
        chunk = state.engine.store.put_blob(stored, blob, expected_fingerprint=state.engine.fingerprint)
        return chunk.num_tokens

    tokens = await run_in_threadpool(put)
    return {"key": key, "tokens": tokens, "bytes": len(blob)}


@router.delete("/v1/chunks/{key}", responses=ERRORS)
async def delete_chunk(key: str, tenant_name: TenantDep, state: StateDep) -> dict[str, Any]:
    """Remove the chunk from every tier; 404 when no tier had it."""
    if not await run_in_threadpool(state.engine.store.delete, _key(state, tenant_name, key)):
        raise APIError(404, f"no chunk {key}", "key")
    return {"key": key, "deleted": True}


@router.post("/v1/prefetch", responses=ERRORS)
async def prefetch(body: PrefetchRequest, tenant_name: TenantDep, state: StateDep) -> dict[str, Any]:
    """Promote chunks into the top tier in the background (``wait``: report how many were found)."""
    if len(body.keys) > 4096:
        raise APIError(400, f"{len(body.keys)} keys; at most 4096 per request", "keys")
    keys = [_key(state, tenant_name, k) for k in body.keys]
    future = state.engine.store.prefetch(keys)
    if not body.wait:
        return {"scheduled": len(keys)}
    found = await run_in_threadpool(future.result)
    return {"scheduled": len(keys), "found": found}
