"""The page/block hashes SGLang and vLLM use for their prefix caches, reimplemented without importing them.

kvfuse writes KV *before* an engine sees a prompt (fused-KV export), so it has to compute the engine's own
keys. These functions reproduce them byte for byte; tests/connectors/data/*.json pins them with vectors
recorded from the engines' own functions (scripts/gen_engine_hash_vectors.py regenerates them).

SGLang 0.5.23 (``sglang.srt.mem_cache.utils.get_hash_str`` → ``cpp_utils/hash_binding.cpp``):
    ``digest_i = SHA-256(digest_{i-1} || page_i)``; page bytes are the token ids as little-endian uint32,
    or, when a page holds an id above 2**32-1, the byte 0xff followed by the ids as little-endian uint64.
    The first page has no prior digest unless the request is namespaced (``extra_key`` / ``cache_salt``:
    ``storage_namespace_seed``). A trailing partial page is hashed too. Keys are the hex digests.

vLLM 0.33.0 (``vllm.v1.core.kv_cache_utils.hash_block_tokens``, default ``prefix_caching_hash_algo``
``"sha256"``): ``hash_i = SHA-256(pickle((hash_{i-1}, tuple(block_i), extra_keys), protocol=5))`` with
``hash_{-1} = NONE_HASH = SHA-256(pickle(seed))``, seed ``"vllm-none-hash"`` unless ``PYTHONHASHSEED``
is set. Only full blocks are hashed. ``xxhash`` (pickle + xxh3_128) is supported too; the random
per-process seed vLLM then uses makes keys unshareable unless ``PYTHONHASHSEED`` is fixed.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import xxhash

__all__ = [
    "VLLM_DEFAULT_NONE_HASH_SEED",
    "sglang_namespace_seed",
    "sglang_page_hashes",
    "vllm_block_hashes",
    "vllm_hash_fn",
    "vllm_none_hash",
]

_UINT32_MAX = 2**32 - 1
VLLM_DEFAULT_NONE_HASH_SEED = "vllm-none-hash"


# -- SGLang ----------------------------------------------------------------------------------------------
def _sglang_page_bytes(page: Sequence[int]) -> bytes:
    if any(t < 0 for t in page):
        raise ValueError("token ids must be non-negative")
    if any(t > _UINT32_MAX for t in page):
        return b"\xff" + b"".join(int(t).to_bytes(8, "little") for t in page)
    return b"".join(int(t).to_bytes(4, "little") for t in page)


def sglang_namespace_seed(extra_key: str | None = None, cache_salt: str | None = None) -> str | None:
    """The prior hash SGLang seeds a storage chain with for a namespaced request (None when unnamespaced)."""
    if extra_key is None and cache_salt is None:
        return None
    digest = hashlib.sha256(b"sglang-cache-namespace-v1")
    for part in (extra_key, cache_salt):
        if part is None:
            digest.update(b"\x00")
            continue
        encoded = part.encode("utf-8")
        digest.update(b"\x01" + len(encoded).to_bytes(8, "little") + encoded)
    return digest.hexdigest()


def sglang_page_hashes(
    token_ids: Sequence[int],
    page_size: int,
    prior_hash: str | None = None,
    *,
    extra_key: str | None = None,
    cache_salt: str | None = None,
) -> list[str]:
    """SGLang's chained page keys for ``token_ids`` (one per page, the last one possibly partial).

    ``prior_hash``: the key of the page before ``token_ids`` (continuing a chain); without it the chain
    starts from the request namespace seed, as ``get_storage_hash_str`` does.
    """
    if page_size <= 0:
        raise ValueError("page_size must be positive")
    ids = [int(t) for t in token_ids]
    if prior_hash is None:
        prior_hash = sglang_namespace_seed(extra_key, cache_salt)
    prior = bytes.fromhex(prior_hash) if prior_hash else None
    if prior is not None and len(prior) != 32:
        raise ValueError("prior_hash must be 64 hex digits")
    keys: list[str] = []
    for start in range(0, len(ids), page_size):
        h = hashlib.sha256()
        if prior is not None:
            h.update(prior)
        h.update(_sglang_page_bytes(ids[start : start + page_size]))
        prior = h.digest()
        keys.append(prior.hex())
    return keys


# -- vLLM ------------------------------------------------------------------------------------------------
def _pickle(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def vllm_hash_fn(name: str = "sha256") -> Callable[[Any], bytes]:
    """vLLM's ``prefix_caching_hash_algo`` functions that need no extra package (``sha256``, ``xxhash``)."""
    if name == "sha256":
        return lambda obj: hashlib.sha256(_pickle(obj)).digest()
    if name == "xxhash":
        return lambda obj: xxhash.xxh3_128_digest(_pickle(obj))
    raise ValueError(f"unsupported vLLM hash algorithm {name!r}; kvfuse computes 'sha256' and 'xxhash'")


def vllm_none_hash(algo: str = "sha256", seed: str | None = None) -> bytes:
    """vLLM's ``NONE_HASH`` (the parent of the first block) for a deterministic seed.

    ``seed`` defaults to ``PYTHONHASHSEED`` when set, else vLLM's fixed default (sha256 only: vLLM draws a
    random seed for xxhash, so there it must be given).
    """
    if seed is None:
        seed = os.environ.get("PYTHONHASHSEED")
    if seed is None:
        if algo != "sha256":
            raise ValueError("vLLM seeds non-cryptographic hashes randomly: pass the PYTHONHASHSEED it runs with")
        seed = VLLM_DEFAULT_NONE_HASH_SEED
    return vllm_hash_fn(algo)(seed)


def vllm_block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    *,
    algo: str = "sha256",
    none_hash_seed: str | None = None,
    cache_salt: str | None = None,
    parent: bytes | None = None,
) -> list[bytes]:
    """vLLM's chained block hashes (full blocks only) for a text-only, LoRA-free request.

    ``cache_salt`` is mixed into the first block as vLLM's ``generate_block_hash_extra_keys`` does.
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    fn = vllm_hash_fn(algo)
    ids = [int(t) for t in token_ids]
    prev = parent if parent else vllm_none_hash(algo, none_hash_seed)
    out: list[bytes] = []
    for start in range(0, len(ids) - block_size + 1, block_size):
        extra: tuple[Any, ...] | None = None
        if start == 0 and parent is None and cache_salt:
            extra = (("cache_salt", cache_salt),)
        prev = fn((prev, tuple(ids[start : start + block_size]), extra))
        out.append(prev)
    return out
