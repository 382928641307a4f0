"""Per request: tokenize the prompt's segments, look their KV up, and decide each segment's reuse."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import xxhash

from blending.fused import Reuse, SegmentInput
from kvstore.chunk import KVChunk
from kvstore.keys import ChunkKey, KeySpace

SegmentKind = Literal["prefix", "chunk", "text"]
Mode = Literal["auto", "dense", "naive", "blend", "anchor", "hybrid"]
MODES: tuple[str, ...] = ("auto", "dense", "naive", "blend", "anchor", "hybrid")


@dataclass(frozen=True)
class PromptSegment:
    """A piece of prompt text. ``prefix``: leading text reused only as an exact prefix (system prompt);
    ``chunk``: reusable anywhere (a document, a shared message); ``text``: always computed."""

    text: str
    kind: SegmentKind = "text"


@dataclass(frozen=True)
class KeySpaces:
    """The key spaces of one model, dtype and tenant."""

    fingerprint: str
    layout: str
    namespace: str

    def _space(self, context: str) -> KeySpace:
        return KeySpace(self.fingerprint, f"{self.layout}:{context}", self.namespace)

    def prefix_key(self, ids: torch.Tensor) -> ChunkKey:
        return self._space("prefix@0").chunk_key(ids.tolist())

    def base_key(self, ids: torch.Tensor) -> ChunkKey:
        """Key of a shared segment's anchor base: its KV from the first real context that computed it."""
        return self._space("anchor-base").chunk_key(ids.tolist())

    def chunk_key(self, ids: torch.Tensor, prefix_ids: torch.Tensor | None) -> ChunkKey:
        """Standalone key when ``prefix_ids`` is None, else the key of the chunk computed after them."""
        if prefix_ids is None or len(prefix_ids) == 0:
            return self._space("chunk").chunk_key(ids.tolist())
        tag = xxhash.xxh3_64_hexdigest(prefix_ids.numpy().astype("<i4").tobytes())
        return self._space(f"chunk@{tag}").chunk_key(ids.tolist())


@dataclass
class PlannedSegment:
    kind: SegmentKind
    token_ids: torch.Tensor
    key: ChunkKey | None = None  # where its KV is (or will be) stored
    fallback_key: ChunkKey | None = None  # standalone key tried when the prefix-context key misses
    cached: KVChunk | None = None

    @property
    def reuse(self) -> Reuse:
        if self.cached is None:
            return Reuse.FRESH
        return Reuse.EXACT if self.kind == "prefix" else Reuse.CACHED

    def as_input(self) -> SegmentInput:
        return SegmentInput(self.token_ids, self.reuse, self.cached)


@dataclass
class Plan:
    segments: list[PlannedSegment]
    prefix_ids: torch.Tensor | None
    shared_prefix: bool = False  # chunks are keyed (and must be computed) after the prefix
    anchored: bool = False  # chunks are keyed by their anchor base (anchor and hybrid modes)
    lookup_errors: list[str] = field(default_factory=list)

    @property
    def token_ids(self) -> torch.Tensor:
        return torch.cat([s.token_ids for s in self.segments])

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.segments)

    @property
    def exact_prefix_tokens(self) -> int:
        """Leading tokens whose cached KV is exact (a prefix hit)."""
        head = self.segments[0] if self.segments else None
        return len(head.token_ids) if head is not None and head.kind == "prefix" and head.cached is not None else 0

    @property
    def cached_chunk_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.segments if s.kind == "chunk" and s.cached is not None)

    @property
    def hits(self) -> int:
        return sum(1 for s in self.segments if s.cached is not None)

    @property
    def misses(self) -> list[PlannedSegment]:
        return [s for s in self.segments if s.key is not None and s.cached is None]

    def inputs(self) -> list[SegmentInput]:
        return [s.as_input() for s in self.segments]


def make_plan(
    segments: Sequence[tuple[SegmentKind, torch.Tensor]],
    spaces: KeySpaces,
    *,
    shared_prefix: bool,
    min_chunk_tokens: int,
) -> Plan:
    """Assign keys: the leading run of ``prefix`` segments forms one exact-prefix entry; each ``chunk``
    of at least ``min_chunk_tokens`` gets a key (computed after the prefix when ``shared_prefix``)."""
    planned: list[PlannedSegment] = []
    lead: list[torch.Tensor] = []
    for kind, ids in segments:
        if kind == "prefix" and len(planned) == 0:
            lead.append(ids)
            continue
        if kind == "prefix":
            kind = "text"  # a prefix after other text cannot be reused as a prefix
        planned.append(PlannedSegment(kind, ids))
    prefix_ids = torch.cat(lead) if lead else None
    if prefix_ids is not None and len(prefix_ids):
        planned.insert(0, PlannedSegment("prefix", prefix_ids, key=spaces.prefix_key(prefix_ids)))
    for seg in planned:
        if seg.kind != "chunk":
            continue
        if len(seg.token_ids) < min_chunk_tokens:
            seg.kind = "text"
            continue
        if shared_prefix and prefix_ids is not None:
            seg.key = spaces.chunk_key(seg.token_ids, prefix_ids)
            seg.fallback_key = spaces.chunk_key(seg.token_ids, None)
        else:
            seg.key = spaces.chunk_key(seg.token_ids, None)
    return Plan(planned, prefix_ids, shared_prefix and prefix_ids is not None)
