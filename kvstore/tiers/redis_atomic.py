"""Atomic primitives of the Redis tier: per-write part generations and compare-and-delete.

- Part generations are unique per write (payload checksum + a random suffix), so no two writes ever share
  a payload part: a writer deletes only parts it created or parts of the exact manifest it replaced.
- Cleanup after a failed read (a lost part, a corrupt value) deletes the main key only if it still holds the
  value that was read (compared by SHA-1 inside a Lua script, atomically), then that value's parts. A newer
  value written meanwhile by another client, an acknowledged write, survives. All keys of one blob share a
  cluster hash tag, so the script runs on one slot.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

from kvstore.tiers.redis_client import RedisClient

# KEYS[1]: main key; KEYS[2..]: the parts of the value read; ARGV[1]: SHA-1 (hex) of the value read.
_COMPARE_AND_DELETE = """
local v = redis.call('GET', KEYS[1])
if (not v) or redis.sha1hex(v) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if #KEYS > 1 then redis.call('UNLINK', unpack(KEYS, 2)) end
return 1
"""


def unique_gen(checksum: int) -> str:
    """A part generation for one write: the payload checksum (for humans) and 32 random bits."""
    return f"{checksum:016x}{os.urandom(4).hex()}"


class CompareAndDelete:
    """``cad(main, value_read, parts) -> bool``: delete ``main`` (and ``parts``) only if it holds ``value_read``."""

    def __init__(self, client: RedisClient) -> None:
        self._script: Any = client.register_script(_COMPARE_AND_DELETE)

    def __call__(self, main: bytes, value_read: bytes, parts: Sequence[bytes] = ()) -> bool:
        digest = hashlib.sha1(value_read, usedforsecurity=False).hexdigest()
        return bool(self._script(keys=[main, *parts], args=[digest]))
