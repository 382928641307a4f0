"""The hot prompt cache: what a request just computed, reusable by the very next request.

After a prefill the prompt's KV is already in memory. Its leading *exact* part (every token computed
densely over an exact past: a dense prefill, or the exact prefix and fresh text before the first reused
chunk) is kept here at once, so an identical prompt, a prompt that extends it (the next chat turn, the
next agent of a chain) or a prompt that contains one of its documents hits without waiting for any
background write-back to the store. Entries are per tenant: one tenant's prompts are never matched,
counted or evicted by another's traffic (each namespace has its own byte quota).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import xxhash

from kvstore.chunk import KVChunk


def token_digest(ids: torch.Tensor) -> str:
    """Content digest of a token sequence (what a chunk span is found by)."""
    return xxhash.xxh3_128_hexdigest(ids.to(torch.int64).numpy().astype("<i8").tobytes())


@dataclass
class HotPrompt:
    """The exact leading part of one computed prompt: ``kv`` ``[L, 2, H, n, D]`` for ``token_ids`` ``[n]``
    at positions 0..n-1; ``spans``: chunk digest -> (start, stop, digest of the segment before it)."""

    token_ids: torch.Tensor
    kv: torch.Tensor
    fingerprint: str
    spans: dict[str, tuple[int, int, str]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


@dataclass(frozen=True)
class PrefixHit:
    """``length`` leading tokens of a new prompt whose exact KV is known (positions 0..length-1)."""

    length: int
    chunk: KVChunk


class HotPromptCache:
    """Bounded per namespace (``bytes_per_namespace``) and in the number of namespaces held (the least
    recently used namespace is dropped whole). Thread-safe; tensors are never modified after insertion."""

    def __init__(self, bytes_per_namespace: int = 512 << 20, max_namespaces: int = 64) -> None:
        self.bytes_per_namespace = bytes_per_namespace
        self.max_namespaces = max_namespaces
        self._spaces: OrderedDict[str, OrderedDict[int, HotPrompt]] = OrderedDict()
        self._next = 0
        self._lock = threading.Lock()

    def put(self, namespace: str, prompt: HotPrompt) -> None:
        if prompt.nbytes > self.bytes_per_namespace or len(prompt.token_ids) == 0:
            return
        with self._lock:
            entries = self._spaces.setdefault(namespace, OrderedDict())
            self._spaces.move_to_end(namespace)
            for key, old in list(entries.items()):  # a prompt that this one extends adds nothing
                n = len(old.token_ids)
                if n <= len(prompt.token_ids) and torch.equal(old.token_ids, prompt.token_ids[:n]):
                    del entries[key]
            self._next += 1
            entries[self._next] = prompt
            while sum(p.nbytes for p in entries.values()) > self.bytes_per_namespace:
                entries.popitem(last=False)
            while len(self._spaces) > self.max_namespaces:
                self._spaces.popitem(last=False)

    def longest_prefix(self, namespace: str, ids: torch.Tensor, fingerprint: str) -> PrefixHit | None:
        """The longest exact KV prefix of ``ids`` among this namespace's prompts (None below 1 token)."""
        with self._lock:
            entries = list(self._spaces.get(namespace, {}).items())
        best: tuple[int, int, HotPrompt] | None = None
        for key, entry in entries:
            if entry.fingerprint != fingerprint:
                continue
            m = min(len(entry.token_ids), len(ids))
            same = (entry.token_ids[:m] == ids[:m]).to(torch.int8)
            n = m if bool(same.all()) else int(torch.argmin(same))
            if n > 0 and (best is None or n > best[0]):
                best = (n, key, entry)
        if best is None:
            return None
        n, key, entry = best
        self._touch(namespace, key)
        return PrefixHit(n, KVChunk(entry.kv[:, :, :, :n], torch.arange(n), fingerprint))

    def find_chunk(self, namespace: str, digest: str, before: str, fingerprint: str) -> KVChunk | None:
        """A chunk's KV as computed inside a recent prompt, preferring one after the same predecessor."""
        with self._lock:
            entries = list(self._spaces.get(namespace, {}).items())
        found: tuple[int, HotPrompt, tuple[int, int, str]] | None = None
        for key, entry in reversed(entries):  # newest first
            span = entry.spans.get(digest)
            if span is None or entry.fingerprint != fingerprint:
                continue
            if found is None or (span[2] == before and found[2][2] != before):
                found = (key, entry, span)
        if found is None:
            return None
        key, entry, (start, stop, _) = found
        self._touch(namespace, key)
        return KVChunk(entry.kv[:, :, :, start:stop], torch.arange(start, stop), fingerprint)

    def _touch(self, namespace: str, key: int) -> None:
        with self._lock:
            entries = self._spaces.get(namespace)
            if entries is not None and key in entries:
                entries.move_to_end(key)

    def bytes_used(self, namespace: str) -> int:
        with self._lock:
            return sum(p.nbytes for p in self._spaces.get(namespace, {}).values())

    def clear(self) -> None:
        with self._lock:
            self._spaces.clear()
