"""Where each shared segment's anchor base came from: the registry anchor modes consult per request.

A base is the KV of a shared segment from the first context that computed it *and won its publication*
(first-writer-wins in the store). Knowing that origin lets a request in the very same context reuse the
base as is, and names the (origin, receiving context) pair that anchors are learned for. The registry is
per tenant, bounded and kept in memory: another instance sees an origin it did not publish as unknown.
"""

from __future__ import annotations

import threading
from collections import OrderedDict


class TenantRecent:
    """Per-tenant maps, least recent first, with one bound over all tenants: past it, the tenant holding the
    most entries (the writer on a tie) forgets its least recent one. Not thread-safe (its owner locks)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._maps: dict[str, OrderedDict[str, str]] = {}
        self._size = 0

    def get(self, namespace: str, key: str) -> str | None:
        entries = self._maps.get(namespace)
        return None if entries is None else entries.get(key)

    def setdefault(self, namespace: str, key: str, value: str) -> str:
        """The tenant's value for ``key``, set to ``value`` when there is none; the entry becomes the most
        recent. Returns the value kept (which the bound may already have forgotten: then ``value``)."""
        entries = self._maps.setdefault(namespace, OrderedDict())
        if key not in entries:
            entries[key] = value
            self._size += 1
        entries.move_to_end(key)
        self._trim(namespace)
        return entries.get(key, value)

    def set(self, namespace: str, key: str, value: str) -> None:
        """Set the tenant's value for ``key`` (replacing any), as its most recent entry."""
        entries = self._maps.setdefault(namespace, OrderedDict())
        if key not in entries:
            self._size += 1
        entries[key] = value
        entries.move_to_end(key)
        self._trim(namespace)

    def _trim(self, writer: str) -> None:
        while self._size > self.limit:
            victim = max(self._maps, key=lambda t: (len(self._maps[t]), t == writer))
            self._maps[victim].popitem(last=False)
            self._size -= 1
            if not self._maps[victim]:
                del self._maps[victim]

    def __len__(self) -> int:
        return self._size


class OriginRegistry:
    """Thread-safe map (tenant, base key) -> the context that computed the stored base, bounded by
    ``limit`` entries over all tenants (see :class:`TenantRecent`). Record an origin only for a base this
    instance published (the publication's winner): a base another writer stored came from elsewhere."""

    def __init__(self, limit: int) -> None:
        self._origins = TenantRecent(limit)
        self._lock = threading.Lock()

    def note(self, namespace: str, base_key: str, context: str) -> None:
        """Record ``context`` as the origin of the tenant's base, replacing an earlier one: called for a
        publication this instance won, so the stored base is now ``context``'s (an earlier base under the
        key was evicted since)."""
        with self._lock:
            self._origins.set(namespace, base_key, context)

    def get(self, namespace: str, base_key: str) -> str | None:
        """The tenant's origin of the base, None when unknown here."""
        with self._lock:
            return self._origins.get(namespace, base_key)

    def __len__(self) -> int:
        with self._lock:
            return len(self._origins)
