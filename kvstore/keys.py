"""Content-addressed chunk keys: 128-bit xxh3 over (model, KV layout, tenant, token ids)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

_SEP = b"\x1f"


@dataclass(frozen=True, order=True)
class ChunkKey:
    """A 128-bit key; prints as 32 hex digits and parses back with :meth:`from_hex`."""

    digest: bytes

    def __post_init__(self) -> None:
        if len(self.digest) != 16:
            raise ValueError(f"a chunk key is 16 bytes, got {len(self.digest)}")

    @property
    def hex(self) -> str:
        return self.digest.hex()

    @classmethod
    def from_hex(cls, text: str) -> ChunkKey:
        """Parse 32 hex digits; raises ValueError on anything else."""
        if len(text) != 32:
            raise ValueError(f"a chunk key is 32 hex digits, got {len(text)} characters")
        try:
            return cls(bytes.fromhex(text))
        except ValueError as exc:
            raise ValueError(f"not a hex chunk key: {text!r}") from exc

    def __str__(self) -> str:
        return self.hex


def _tokens_bytes(token_ids: Sequence[int] | np.ndarray) -> bytes:
    arr = np.asarray(token_ids, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError("token ids must be one-dimensional")
    if arr.size and (arr.min() < -(2**31) or arr.max() >= 2**31):
        raise ValueError("token id out of int32 range")
    return arr.astype("<i4").tobytes()


def _fields(fields: Sequence[bytes]) -> bytes:
    return b"".join(len(f).to_bytes(4, "little") + f for f in fields)


@dataclass(frozen=True)
class KeySpace:
    """Everything besides the tokens that a key depends on.

    ``fingerprint``: model identity; ``layout``: KV layout + dtype tag (e.g. ``"l30h3d64:float32"``);
    ``namespace``: the tenant. Two key spaces that differ in any field never produce the same key.
    """

    fingerprint: str
    layout: str
    namespace: str = "default"

    def _seed_bytes(self, kind: bytes) -> bytes:
        """The key-space fields, each length-prefixed, so no two different spaces (and no space plus
        tokens) serialize alike; a plain separator let a field containing it mimic another split."""
        fields = [b"kvfuse/v2", kind, self.fingerprint.encode(), self.layout.encode(), self.namespace.encode()]
        return _fields(fields)

    def engine_key(self, engine: str, engine_hash: bytes | str, scope: str = "") -> ChunkKey:
        """Storage key of a page/block that an inference engine names by its own hash (an SGLang page hash
        with its shard suffix, a vLLM block hash, an LMCache chunk key string).

        The engine's hash is taken as given (kvfuse never changes an engine's keys, it only derives its own
        storage key from them), within this key space (model fingerprint, layout including the KV dtype,
        tenant), the engine's name and a ``scope`` (e.g. an exact prefix vs the KV prepared for one request).
        Every field is length-prefixed, as in :meth:`chunk_key`.
        """
        raw = engine_hash.encode() if isinstance(engine_hash, str) else bytes(engine_hash)
        h = xxhash.xxh3_128(self._seed_bytes(b"engine"))
        h.update(_fields([engine.encode(), scope.encode(), raw]))
        return ChunkKey(h.digest())

    def chunk_key(self, token_ids: Sequence[int] | np.ndarray) -> ChunkKey:
        """Position-independent key of a chunk: the same tokens give the same key anywhere in a prompt."""
        h = xxhash.xxh3_128(self._seed_bytes(b"chunk"))
        h.update(_SEP)
        h.update(_tokens_bytes(token_ids))
        return ChunkKey(h.digest())

    def prefix_keys(self, token_ids: Sequence[int] | np.ndarray, page_size: int) -> list[ChunkKey]:
        """Prefix-chained keys, one per full page: page i's key depends on every token before it.

        A trailing partial page gets no key.
        """
        if page_size <= 0:
            raise ValueError("page_size must be positive")
        arr = np.asarray(token_ids, dtype=np.int64)
        keys: list[ChunkKey] = []
        parent = self._seed_bytes(b"prefix")
        for start in range(0, len(arr) - page_size + 1, page_size):
            h = xxhash.xxh3_128(parent)
            h.update(_SEP)
            h.update(_tokens_bytes(arr[start : start + page_size]))
            key = ChunkKey(h.digest())
            keys.append(key)
            parent = key.digest
        return keys
