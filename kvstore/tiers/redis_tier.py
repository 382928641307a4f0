"""Redis tier: blobs in Redis (single server or cluster), large blobs striped over parallel connections.

Key layout (``P`` = ``{key_prefix}:{namespace}:``)::

    P{<key hex>}               the whole codec blob (when it fits one stripe), or a manifest
    P{<key hex>}:<gen>:<i>     payload part i of a striped blob; <gen>: unique per write (redis_atomic)

A manifest (``KVFM`` + msgpack: codec head, part count/size, payload length, gen) is written with
``SET ... GET`` only after every part is stored, so a manifest is never visible without its parts; the
reply names the previous generation, whose parts are then deleted. ``put_if_absent`` writes the main key
with ``SET ... NX`` instead (a loser unlinks its own parts). Readers fetch the manifest, then the parts in
parallel, reassemble and verify the codec checksums; a missing part (expired, evicted by Redis) is a clean
miss, and the cleanup that follows deletes only the value that was read (compare-and-delete), never a
newer one. The hash tag ``{<key hex>}`` keeps a blob's keys on one cluster slot.

Budget: the tier tracks the bytes of blobs it wrote itself and evicts its own keys (by policy) beyond
``budget_bytes``. Redis' ``maxmemory`` (with an ``allkeys-*`` policy) is the hard bound for the server,
which other clients share. Needs Redis >= 6.2 (``SET ... GET``, ``GETDEL``) with Lua scripting.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import cast

import numpy as np
from redis.cluster import RedisCluster

from kvstore.arena import HostArena
from kvstore.chunk import KVChunk
from kvstore.codec import MAGIC, EncodedBlob, decode, decode_buffer, encode_parts, peek_header
from kvstore.errors import CodecError, TierError, from_newer_build
from kvstore.keys import ChunkKey
from kvstore.tiers.base import BudgetedTier, Evicted, first_items
from kvstore.tiers.eviction import EvictionPolicy
from kvstore.tiers.redis_atomic import CompareAndDelete, unique_gen
from kvstore.tiers.redis_client import make_client, translate_errors
from kvstore.tiers.redis_fastpath import get_into
from kvstore.tiers.redis_layout import KeyLayout, Manifest, StripedRead, is_manifest, parts_wrong_size, stripe_plan

log = logging.getLogger(__name__)

_PART_TTL_MARGIN_MS = 60_000


class RedisTier(BudgetedTier):
    """Chunks as codec blobs in Redis; see the module docstring for layout and guarantees."""

    def __init__(
        self,
        url: str,
        budget_bytes: int,
        *,
        cluster: bool = False,
        namespace: str = "default",
        key_prefix: str = "kvfuse",
        ttl_s: float | None = None,
        stripe_bytes: int = 2 << 20,
        io_threads: int = 4,
        read_buffer_bytes: int = 128 << 20,
        prefault: bool = False,
        connect_timeout_s: float = 0.5,
        timeout_s: float = 5.0,
        policy: str | EvictionPolicy = "lru",
        name: str = "redis",
    ) -> None:
        for part in (namespace, key_prefix):
            if not part or any(c in part for c in "{}*?[] "):
                raise ValueError(f"invalid redis key prefix/namespace {part!r}")
        if stripe_bytes < 4096 or io_threads < 1 or budget_bytes < 0:
            raise ValueError("stripe_bytes >= 4096, io_threads >= 1, budget_bytes >= 0 required")
        super().__init__(budget_bytes, policy)  # the index: the blobs this tier wrote, key -> blob size
        self.name = name
        self.url = url
        self.layout = KeyLayout(f"{key_prefix}:{namespace}:")
        self.ttl_ms = None if ttl_s is None else max(1, int(ttl_s * 1000))
        self.stripe_bytes = int(stripe_bytes)
        self.client = make_client(
            url,
            cluster=cluster,
            connect_timeout_s=connect_timeout_s,
            timeout_s=timeout_s,
            max_connections=4 * io_threads + 8,
        )
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix=f"kvstore-{name}")
        self._cad = CompareAndDelete(self.client)
        self._io_threads = io_threads
        self._buffers = HostArena(read_buffer_bytes)  # striped reads land in warm, reused memory
        if prefault:  # now, rather than in the background as the first reads use them
            self._buffers.populate()
        self._writes = 0  # counts accounted writes; _written[key] is the count at key's latest write
        self._written: dict[ChunkKey, int] = {}

    def main_key(self, key: ChunkKey) -> bytes:
        """The Redis key holding ``key``'s blob or manifest."""
        return self.layout.main_key(key)

    # -- reads ----------------------------------------------------------------------------------------
    def _mget(self, names: list[bytes]) -> list[bytes | None]:
        if isinstance(self.client, RedisCluster):
            return cast(list[bytes | None], list(self.client.mget_nonatomic(names)))
        if len(names) <= 2:
            return cast(list[bytes | None], list(self.client.mget(names)))
        step = math.ceil(len(names) / self._io_threads)
        groups = [names[i : i + step] for i in range(0, len(names), step)]
        return [cast(bytes | None, v) for vals in self._pool.map(self.client.mget, groups) for v in vals]

    def _fetch_part(self, job: StripedRead, i: int) -> None:
        start = job.head_len + i * job.part_size
        end = min(start + job.part_size, job.buf.numel())
        if not get_into(self.client, job.names[i], job.buf.numpy().data[start:end]):
            job.missing = True
            job.bad_parts.append(i)  # list.append is atomic: parts load in parallel

    def _parts_wrong_size(self, job: StripedRead) -> bool:
        return parts_wrong_size(self.client, job)

    def _drop_read(self, key: ChunkKey, value: bytes, parts: Sequence[bytes] | None = None) -> None:
        """Delete the value read under ``key`` and its parts (``None``: those its manifest names, if any),
        unless another writer replaced it since."""
        with contextlib.suppress(TierError), translate_errors(self.client, "delete", self.stats):
            if self._cad(self.main_key(key), value, parts or ()) and parts is None and is_manifest(value):
                self._delete_parts(key, value)
        self._forget(key)

    def _drop_corrupt(self, key: ChunkKey, exc: Exception, value: bytes, parts: Sequence[bytes] | None = None) -> None:
        if from_newer_build(exc):  # a newer build's blob: a miss here, left for the builds that read it
            return
        self.stats.add(corrupt=1)
        log.warning("redis tier: dropping corrupt blob %s… (%s)", key.hex[:8], exc)
        self._drop_read(key, value, parts)

    def get(self, key: ChunkKey) -> KVChunk | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[ChunkKey]) -> list[KVChunk | None]:
        start = time.perf_counter()
        out, nbytes = self._read_many(keys)
        hits = sum(c is not None for c in out)
        self.stats.record_get(hits, len(out) - hits, nbytes, time.perf_counter() - start)
        return out

    def _read_many(self, keys: Sequence[ChunkKey]) -> tuple[list[KVChunk | None], int]:
        """The blobs of ``keys`` (``None``: a miss) and the bytes read, without counting a get."""
        out: list[KVChunk | None] = [None] * len(keys)
        nbytes = 0
        writes_before = self._writes  # a miss must not unaccount a put that lands after this read
        with translate_errors(self.client, "get", self.stats):
            values = self._mget([self.main_key(k) for k in keys]) if keys else []
            jobs: list[StripedRead] = []
            for i, (key, value) in enumerate(zip(keys, values, strict=True)):
                try:
                    if value is None:
                        self._forget(key, unless_written_after=writes_before)
                    elif value[: len(MAGIC)] == MAGIC:
                        out[i] = decode(value)
                        nbytes += len(value)
                    elif is_manifest(value):
                        m = Manifest.parse(value)
                        hdr = peek_header(m.head)  # checksummed: sizes below are trustworthy
                        if hdr.payload_offset != len(m.head) or hdr.payload_nbytes != m.payload_nbytes:
                            raise CodecError("manifest does not match its blob header")
                        buf = self._buffers.lease(len(m.head) + m.payload_nbytes)
                        buf.numpy()[: len(m.head)] = np.frombuffer(m.head, dtype=np.uint8)
                        names = self.layout.part_names(key, m.gen, m.nparts)
                        jobs.append(StripedRead(i, key, names, m.part_size, len(m.head), buf, value))
                    else:
                        raise CodecError("value is neither a blob nor a manifest")
                except CodecError as exc:
                    self._drop_corrupt(key, exc, value or b"")
            futures = [
                self._pool.submit(self._fetch_part, job, p) for job in jobs for p in range(len(job.names))
            ]
            for f in futures:
                f.result()
        for job in jobs:
            if job.missing and self._parts_wrong_size(job):
                self._drop_corrupt(job.key, CodecError("a part has the wrong size"), job.value, job.names)
                continue
            if job.missing:  # a part expired or was evicted by Redis: drop the orphaned manifest too
                log.info("redis tier: blob %s lost a part; miss", job.key.hex[:8])
                self._drop_read(job.key, job.value, job.names)
                continue
            try:
                out[job.index] = decode_buffer(job.buf)
                nbytes += job.buf.numel()
            except CodecError as exc:
                self._drop_corrupt(job.key, exc, job.value, job.names)
        with self._lock:
            for key, chunk in zip(keys, out, strict=True):
                if chunk is not None and key in self._sizes:
                    self._policy.touch(key)
        return out, nbytes

    # -- writes ---------------------------------------------------------------------------------------
    def _delete_remote(self, key: ChunkKey) -> bool:
        with translate_errors(self.client, "delete", self.stats):
            old = cast(bytes | None, self.client.getdel(self.main_key(key)))
            if old is not None and is_manifest(old):
                self._delete_parts(key, old)
        return old is not None

    def _delete_parts(self, key: ChunkKey, manifest: bytes, keep_gen: str | None = None) -> None:
        try:
            m = Manifest.parse(manifest)
        except CodecError:
            return
        if m.gen != keep_gen and m.nparts:
            self.client.unlink(*self.layout.part_names(key, m.gen, m.nparts))

    def _set_values(self, parts: list[tuple[bytes, memoryview]], px: int | None) -> None:
        """``SET`` of several parts in one pipeline on one pooled connection (values sent without copies)."""
        pipe = self.client.pipeline(transaction=False)
        for name, value in parts:
            pipe.set(name, value, px=px)
        pipe.execute()

    def _submit_parts(
        self, key: ChunkKey, enc: EncodedBlob
    ) -> tuple[str, bytes, list[bytes], list[Future[None]]]:
        """Start writing ``enc``'s payload parts under a generation of their own; returns (gen, manifest,
        part names, futures)."""
        gen = unique_gen(enc.checksum)
        n, ps = stripe_plan(enc.payload.nbytes, self.stripe_bytes)
        names = self.layout.part_names(key, gen, n)
        px = None if self.ttl_ms is None else self.ttl_ms + _PART_TTL_MARGIN_MS
        groups = min(n, self._io_threads)
        parts = [(names[i], enc.payload[i * ps : (i + 1) * ps]) for i in range(n)]
        futures = [self._pool.submit(self._set_values, parts[g::groups], px) for g in range(groups)]
        return gen, Manifest(gen, n, ps, enc.payload.nbytes, enc.head).to_bytes(), names, futures

    def put(self, key: ChunkKey, chunk: KVChunk, *, owned: bool = False) -> list[Evicted]:
        return self.put_many([(key, chunk)], owned=owned)

    def put_many(self, items: Sequence[tuple[ChunkKey, KVChunk]], *, owned: bool = False) -> list[Evicted]:
        """Parts of every striped blob go out in parallel; then all main keys (whole small blobs and
        manifests) in one pipeline of ``SET ... GET``, whose replies name superseded parts to delete."""
        start = time.perf_counter()
        evicted: list[Evicted] = []
        sizes: dict[ChunkKey, int] = {}
        mains: list[tuple[ChunkKey, bytes, str | None]] = []  # (key, value, gen)
        futures: list[Future[None]] = []
        with translate_errors(self.client, "put", self.stats):
            for key, chunk in items:
                enc = encode_parts(chunk)
                if self._over_budget(enc.nbytes):
                    evicted.append((key, chunk))
                    continue
                sizes[key] = enc.nbytes
                if enc.nbytes <= self.stripe_bytes:
                    mains.append((key, enc.to_bytes(), None))
                else:
                    gen, manifest, _, parts = self._submit_parts(key, enc)
                    futures += parts
                    mains.append((key, manifest, gen))
            for f in futures:
                f.result()
            if mains:
                pipe = self.client.pipeline(transaction=False)
                for key, value, _ in mains:
                    pipe.set(self.main_key(key), value, px=self.ttl_ms, get=True)
                olds = pipe.execute()
                for (key, _, new_gen), old in zip(mains, olds, strict=True):
                    if isinstance(old, bytes) and is_manifest(old):
                        self._delete_parts(key, old, keep_gen=new_gen)
        victims = self._account(sizes)
        evicted += self._evict(victims)
        self.stats.record_put(len(sizes), sum(sizes.values()), time.perf_counter() - start)
        return evicted

    def put_many_if_absent(
        self, items: Sequence[tuple[ChunkKey, KVChunk]], *, owned: bool = False
    ) -> tuple[list[bool], list[Evicted]]:
        """``SET NX`` of each main key, after its parts: of all clients of the server exactly one stores a
        key. A loser (or a failed call) unlinks the parts it wrote, of its own generation."""
        start = time.perf_counter()
        first = first_items(items)
        stored = [False] * len(items)
        evicted: list[Evicted] = []
        mains: list[tuple[int, bytes, list[bytes], int]] = []  # (item index, value, own part names, size)
        futures: list[Future[None]] = []
        won: list[bool] = []
        with translate_errors(self.client, "put", self.stats):
            todo = sorted(first.values())
            present = self.contains_many([items[j][0] for j in todo])  # no uploads for keys already there
            try:
                for j in (j for j, p in zip(todo, present, strict=True) if not p):
                    enc = encode_parts(items[j][1])
                    if self._over_budget(enc.nbytes):
                        evicted.append(items[j])
                    elif enc.nbytes <= self.stripe_bytes:
                        mains.append((j, enc.to_bytes(), [], enc.nbytes))
                    else:
                        _, manifest, names, parts = self._submit_parts(items[j][0], enc)
                        futures += parts
                        mains.append((j, manifest, names, enc.nbytes))
                wait(futures)
                for f in futures:
                    f.result()
                pipe = self.client.pipeline(transaction=False)
                for j, value, _, _ in mains:
                    pipe.set(self.main_key(items[j][0]), value, px=self.ttl_ms, nx=True)
                won = [bool(r) for r in pipe.execute()] if mains else []
            finally:
                lost = [n for i, (_, _, names, _) in enumerate(mains) if i >= len(won) or not won[i] for n in names]
                if lost:
                    with contextlib.suppress(Exception):
                        self.client.unlink(*lost)
        winners = {items[j][0]: size for (j, _, _, size), ok in zip(mains, won, strict=True) if ok}
        for (j, _, _, _), ok in zip(mains, won, strict=True):
            stored[j] = ok
        evicted += self._evict(self._account(winners))
        self.stats.record_put(len(winners), sum(winners.values()), time.perf_counter() - start)
        return stored, evicted

    def _account(self, sizes: dict[ChunkKey, int]) -> list[ChunkKey]:
        """Track newly written blobs; returns the keys to evict to stay within budget."""
        with self._lock:
            victims = [victim for key, size in sizes.items() for victim in self._account_locked(key, size)]
            self._writes += 1
            for key in sizes:
                if key in self._sizes:
                    self._written[key] = self._writes
            return victims

    def _evict(self, victims: list[ChunkKey]) -> list[Evicted]:
        if not victims:
            return []
        evicted: list[Evicted] = []
        if self.collect_evicted:  # a demotion, not a get: not counted as hits
            chunks, _ = self._read_many(victims)
            evicted = [(k, c) for k, c in zip(victims, chunks, strict=True) if c is not None]
        for key in victims:
            with self._lock:  # a put of the victim accounted since it was chosen: its blob stays
                if key in self._sizes:
                    continue
            self._delete_remote(key)
        self.stats.add(evictions=len(victims))
        return evicted

    def _forget(self, key: ChunkKey, unless_written_after: int | None = None) -> None:
        with self._lock:
            if unless_written_after is not None and self._written.get(key, 0) > unless_written_after:
                return
            self._unaccount_locked(key)

    def _unaccount_locked(self, key: ChunkKey) -> int | None:
        self._written.pop(key, None)
        return super()._unaccount_locked(key)

    # -- the rest: presence and keys come from the server (other clients write it too) -----------------
    def contains(self, key: ChunkKey) -> bool:
        return self.contains_many([key])[0]

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        if not keys:
            return []
        with translate_errors(self.client, "contains", self.stats):
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(self.main_key(key))
            return [bool(n) for n in pipe.execute()]

    def delete(self, key: ChunkKey) -> bool:
        self._forget(key)
        return self._delete_remote(key)

    def keys(self) -> list[ChunkKey]:
        out: list[ChunkKey] = []
        with translate_errors(self.client, "keys", self.stats):
            for name in self.client.scan_iter(match=self.layout.scan_pattern, count=1000):
                key = self.layout.key_of(name)
                if key is not None:
                    out.append(key)
        return out

    def ping(self) -> bool:
        """Whether the server answers (never raises)."""
        with contextlib.suppress(Exception):
            return bool(self.client.ping())
        return False

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with contextlib.suppress(Exception):  # best effort
            self.client.close()
