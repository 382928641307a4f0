"""Tenant-scoped chunk-API keys: a keyed, invertible mapping between public and stored keys.

Stored chunk keys are content addressed and already include the tenant namespace (``kvstore.keys``), so
one tenant's prompts never hit another's KV. The raw-key chunk API (``GET/PUT/HEAD/DELETE
/v1/chunks/{key}``) must also keep tenants apart, even when a key leaks or is guessed. So the service
never shows stored keys: the public key of stored key ``K`` for tenant ``T`` is ``E = P_T(K)``, where
``P_T`` is a 128-bit pseudorandom permutation (a 4-round Feistel network whose round function is keyed
BLAKE2b over the server secret, the tenant and the round; Luby-Rackoff makes it a strong PRP).

- ``POST /v1/chunks`` returns ``P_T(K)``; ``GET/PUT/HEAD/DELETE`` act on ``P_T^-1(E)``.
- Tenant B presenting A's public key reaches ``P_B^-1(P_A(K))``: an unrelated random key (404).
- Without the secret no one can produce a public key that maps onto another tenant's stored key, so a
  PUT can never overwrite another tenant's (or its own prompts') KV except through keys the service
  handed out for that tenant.

Stateless: nothing to persist besides the secret (``<data_dir>/secret``, created on first start), and
two services sharing the secret and tenant names accept each other's public keys (blob migration).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from pathlib import Path

from kvstore.keys import ChunkKey

log = logging.getLogger(__name__)
_ROUNDS = 4


class KeyMapper:
    """Public <-> stored chunk keys per tenant (see module docstring)."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the key secret must be at least 16 bytes")
        self._secret = hashlib.blake2b(secret, digest_size=32).digest()

    def _round(self, tenant: str, i: int, half: bytes) -> bytes:
        h = hashlib.blake2b(key=self._secret, digest_size=8, person=b"kvfuse-keymap\x00\x00\x00")
        h.update(tenant.encode())
        h.update(b"\x00" + bytes([i]) + half)
        return h.digest()

    @staticmethod
    def _xor(a: bytes, b: bytes) -> bytes:
        return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(8, "little")

    def public(self, tenant: str, key: ChunkKey) -> str:
        """The hex key a tenant sees for stored ``key``."""
        left, right = key.digest[:8], key.digest[8:]
        for i in range(_ROUNDS):
            left, right = right, self._xor(left, self._round(tenant, i, right))
        return (left + right).hex()

    def stored(self, tenant: str, public_hex: str) -> ChunkKey:
        """The stored key behind a tenant's public hex key; ValueError when it is not 32 hex digits."""
        digest = ChunkKey.from_hex(public_hex.lower()).digest
        left, right = digest[:8], digest[8:]
        for i in reversed(range(_ROUNDS)):
            left, right = self._xor(right, self._round(tenant, i, left)), left
        return ChunkKey(left + right)


def load_secret(configured: str | None, data_dir: Path) -> bytes:
    """The configured secret, else ``<data_dir>/secret`` (created with mode 0600 on first use); an
    unwritable data dir gets an ephemeral secret (public keys then change on restart; logged)."""
    if configured:
        return configured.encode()
    path = data_dir / "secret"
    try:
        if path.is_file():
            return path.read_bytes()
        data_dir.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_hex(32).encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secret)
        return secret
    except FileExistsError:
        return path.read_bytes()
    except OSError as exc:
        log.warning("cannot keep the key secret in %s (%s); chunk keys will change on restart", path, exc)
        return secrets.token_hex(32).encode()
