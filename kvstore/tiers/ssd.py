"""SSD tier: one codec blob per file, atomic write-then-rename, index rebuilt by scanning on start.

Layout: ``root/<first two hex digits>/<key hex>.kvf``. A write goes to a unique hidden temp file in the same
directory, is fsynced (``fsync="always"``, the default), renamed over the final name with ``os.replace`` and
the directory is fsynced, so after a crash a file is either the complete old blob, the complete new blob
or absent. ``fsync="never"`` skips both fsyncs: faster, and a crash can then leave a file that fails its
checksum, which is detected and removed like any corrupt file. Leftover temp files, truncated or corrupt
blobs are removed at start (counted in ``stats.corrupt``); a blob that fails its checksum on read is
removed and reported as a miss. One process owns a directory at a time (the index lives in memory), except
for put-if-absent: it publishes with ``os.link`` (fails if the name exists), atomically across processes.
Reads and batch writes use ``io_threads`` parallel file operations (SSDs need queue depth).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from kvstore.arena import HostArena
from kvstore.chunk import KVChunk
from kvstore.codec import EncodedBlob, decode_buffer, encode_parts, read_blob, verify
from kvstore.errors import CodecError, TierError, from_newer_build
from kvstore.keys import ChunkKey
from kvstore.tiers.base import BudgetedTier, Evicted, first_items
from kvstore.tiers.eviction import EvictionPolicy
from kvstore.tiers.fileio import fsync_dir, open_for_read, read_file, unlink_quiet, write_new_file
from kvstore.tiers.ssd_scan import SUFFIX, TMP_SUFFIX, scan_blobs

log = logging.getLogger(__name__)

FsyncPolicy = Literal["always", "never"]
__all__ = ["SUFFIX", "TMP_SUFFIX", "FsyncPolicy", "SSDTier"]


def _reason(exc: BaseException) -> str:
    """An I/O error without the file name (paths name keys, and keys are not logged)."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"[{errno.errorcode.get(exc.errno or 0, exc.errno)}] {exc.strerror}"
    return str(exc)


class SSDTier(BudgetedTier):
    """Blob files under ``root`` within ``budget_bytes`` (file sizes); see the module docstring."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        budget_bytes: int,
        *,
        fsync: FsyncPolicy = "always",
        policy: str | EvictionPolicy = "lru",
        io_threads: int = 4,
        read_buffer_bytes: int = 128 << 20,
        prefault: bool = False,
        name: str = "ssd",
    ) -> None:
        if fsync not in ("always", "never"):
            raise ValueError(f"fsync must be 'always' or 'never', got {fsync!r}")
        super().__init__(budget_bytes, policy)  # the index: key -> file size
        self.name = name
        self.root = os.fspath(root)
        self.fsync = fsync
        self._dirs: set[str] = set()
        self._buffers = HostArena(read_buffer_bytes)  # reads land in warm memory, reused once callers let go
        if prefault:  # now, rather than in the background as the first reads use them
            self._buffers.populate()
        self._pool = ThreadPoolExecutor(max(1, io_threads), thread_name_prefix=f"kvstore-{name}")
        os.makedirs(self.root, exist_ok=True)
        self._scan()

    # -- layout ---------------------------------------------------------------------------------------
    def path_of(self, key: ChunkKey) -> str:
        """The file a key's blob lives in."""
        h = key.hex
        return os.path.join(self.root, h[:2], h + SUFFIX)

    def _error(self, message: str) -> TierError:
        """The error of one failed operation, counted in ``stats.errors`` (raise it ``from`` its cause)."""
        self.stats.add(errors=1)
        return TierError(message)

    def _aside(self, path: str) -> str:
        head, tail = os.path.split(path)
        return os.path.join(head, f".{tail}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")

    # -- start-up scan --------------------------------------------------------------------------------
    def _scan(self) -> None:
        scan = scan_blobs(self.root)
        self._dirs |= scan.dirs
        corrupt = scan.corrupt
        with self._lock:
            for _, key, size in sorted(scan.found, key=lambda e: e[0]):
                self._account_locked(key, size, evict=False)
            victims = self._evict_locked()
        for victim in victims:
            unlink_quiet(self.path_of(victim))
        self.stats.add(corrupt=corrupt, evictions=len(victims))
        if corrupt:
            log.warning("ssd tier %s: removed %d corrupt or partial files at start", self.root, corrupt)
        log.info("ssd tier %s: %d blobs, %d bytes indexed", self.root, len(self._sizes), self._used)

    # -- reads ----------------------------------------------------------------------------------------
    def _forget(self, key: ChunkKey) -> None:
        """Drop ``key`` from the index after its file was found missing (unless a put restored it)."""
        with self._lock:
            if not os.path.exists(self.path_of(key)):
                self._unaccount_locked(key)

    def _discard_corrupt(self, key: ChunkKey, path: str, ino: int, exc: Exception) -> None:
        if from_newer_build(exc):  # a newer build's blob: a miss here, left for the builds that read it
            return
        with self._lock:
            try:
                if os.stat(path).st_ino == ino:  # not replaced by a concurrent put meanwhile
                    os.unlink(path)
                    self._unaccount_locked(key)
            except OSError:
                pass
        self.stats.add(corrupt=1)
        log.warning("ssd tier: removed corrupt blob %s… (%s)", key.hex[:8], type(exc).__name__)

    def _load(self, key: ChunkKey) -> tuple[KVChunk | None, int]:
        with self._lock:
            if key not in self._sizes:
                return None, 0
            self._policy.touch(key)
        path = self.path_of(key)
        try:
            with open_for_read(path) as (size, ino, read_at):
                try:  # verified as read: segments read and hashed on several cores, each while in cache
                    return read_blob(size, read_at, self._buffers.lease), size
                except CodecError as exc:
                    corrupt = exc
        except FileNotFoundError:
            self._forget(key)
            return None, 0
        except (OSError, EOFError) as exc:
            raise self._error(f"ssd read failed: {_reason(exc)}") from exc
        self._discard_corrupt(key, path, ino, corrupt)
        return None, 0

    def get(self, key: ChunkKey) -> KVChunk | None:
        return self.get_many([key])[0]

    def _load_or_error(self, key: ChunkKey) -> tuple[KVChunk | None, int, TierError | None]:
        try:
            return (*self._load(key), None)
        except TierError as exc:
            return None, 0, exc

    def get_many(self, keys: Sequence[ChunkKey]) -> list[KVChunk | None]:
        """Files are read in parallel (``io_threads``); a key whose read fails is a miss, unless all fail."""
        start = time.perf_counter()
        load = self._load_or_error
        loaded = [load(k) for k in keys] if len(keys) <= 1 else list(self._pool.map(load, keys))
        failed = [exc for _, _, exc in loaded if exc is not None]
        if failed and len(failed) == len(keys):
            raise failed[0]
        if failed:
            log.warning(
                "ssd tier: %d of %d reads failed, treated as misses: %s", len(failed), len(keys), failed[0]
            )
        out = [chunk for chunk, _, _ in loaded]
        hits = sum(c is not None for c in out)
        nbytes = sum(n for _, n, _ in loaded)
        self.stats.record_get(hits, len(out) - hits, nbytes, time.perf_counter() - start)
        return out

    def get_blob(self, key: ChunkKey) -> bytes | None:
        if not self.contains(key):
            return None
        path = self.path_of(key)
        try:
            with open(path, "rb") as f:
                blob = f.read()
                ino = os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            self._forget(key)
            return None
        except OSError as exc:
            raise self._error(f"ssd read failed: {_reason(exc)}") from exc
        try:
            verify(blob)
        except CodecError as exc:
            self._discard_corrupt(key, path, ino, exc)
            return None
        self.stats.record_get(1, 0, len(blob), 0.0)
        return blob

    # -- writes ---------------------------------------------------------------------------------------
    def _write_temp(self, path: str, pieces: Sequence[memoryview | bytes]) -> str:
        directory = os.path.dirname(path)
        if directory not in self._dirs:
            os.makedirs(directory, exist_ok=True)
            self._dirs.add(directory)
        tmp = self._aside(path)
        write_new_file(tmp, pieces, fsync=self.fsync == "always")
        return tmp

    def _admit_locked(self, key: ChunkKey, size: int) -> list[tuple[ChunkKey, str]]:
        """Index ``key``'s file of ``size`` bytes, moving victims' files aside to stay within budget (returned
        for :meth:`_drain`); the caller holds ``_lock``."""
        aside: list[tuple[ChunkKey, str]] = []
        for victim in self._account_locked(key, size):
            vpath, vaside = self.path_of(victim), self._aside(self.path_of(victim))
            with contextlib.suppress(OSError):
                os.replace(vpath, vaside)
                aside.append((victim, vaside))
        return aside

    def _stage(self, key: ChunkKey, enc: EncodedBlob) -> str:
        """Write ``enc`` to a fresh temp file next to ``key``'s final name; returns the temp path."""
        try:
            return self._write_temp(self.path_of(key), (enc.head, enc.payload))
        except OSError as exc:
            reason = errno.errorcode.get(exc.errno or 0, str(exc))
            raise self._error(f"ssd write failed ({reason}): {exc.strerror}") from exc

    def _published(self, key: ChunkKey, aside: list[tuple[ChunkKey, str]], size: int, start: float) -> list[Evicted]:
        """After a new file took its final name: make the name durable, drop victims, count the put."""
        if self.fsync == "always":
            try:
                fsync_dir(os.path.dirname(self.path_of(key)))
            except OSError as exc:  # the data is written; only its durability is in doubt
                log.warning("ssd tier: directory fsync failed: %s", exc.strerror)
        evicted = self._drain(aside)
        self.stats.add(evictions=len(aside))
        self.stats.record_put(1, size, time.perf_counter() - start)
        return evicted

    def put(self, key: ChunkKey, chunk: KVChunk, *, owned: bool = False) -> list[Evicted]:
        start = time.perf_counter()
        enc = encode_parts(chunk)
        size = enc.nbytes
        if self._over_budget(size):
            return [(key, chunk)]
        tmp = self._stage(key, enc)
        with self._lock:
            try:
                os.replace(tmp, self.path_of(key))
            except OSError as exc:
                unlink_quiet(tmp)
                raise self._error(f"ssd rename failed: {exc.strerror}") from exc
            aside = self._admit_locked(key, size)
        return self._published(key, aside, size, start)

    def _put_new(self, key: ChunkKey, chunk: KVChunk) -> tuple[bool, list[Evicted]]:
        """Publish ``chunk`` only if no file has ``key``'s name: ``os.link`` of a complete temp file fails
        when the name exists, atomically for every process using the directory. A loser indexes the file it
        found (written by another instance), so it reads the winner's bytes."""
        start = time.perf_counter()
        path = self.path_of(key)
        with self._lock:
            if key in self._sizes and os.path.exists(path):
                return False, []
        enc = encode_parts(chunk)
        size = enc.nbytes
        if self._over_budget(size):
            return False, [(key, chunk)]
        tmp = self._stage(key, enc)
        try:
            with self._lock:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    aside, won = self._adopt_locked(key, path), False
                except OSError as exc:
                    raise self._error(f"ssd link failed: {exc.strerror}") from exc
                else:
                    aside, won = self._admit_locked(key, size), True
        finally:
            unlink_quiet(tmp)
        if not won:
            return False, self._drain(aside)
        return True, self._published(key, aside, size, start)

    def _adopt_locked(self, key: ChunkKey, path: str) -> list[tuple[ChunkKey, str]]:
        """Index a file another writer published under ``key`` (if this tier does not know it yet)."""
        if key in self._sizes:
            return []
        try:
            size = os.stat(path).st_size
        except OSError:
            return []
        return self._admit_locked(key, size) if size <= self._budget else []

    def put_many_if_absent(
        self, items: Sequence[tuple[ChunkKey, KVChunk]], *, owned: bool = False
    ) -> tuple[list[bool], list[Evicted]]:
        """Distinct keys are published in parallel (``io_threads``); a repeated key's first item wins."""
        first = first_items(items)
        jobs = [items[j] for j in sorted(first.values())]
        results = [self._put_new(*kc) for kc in jobs] if len(jobs) <= 1 else list(
            self._pool.map(lambda kc: self._put_new(*kc), jobs))
        won = {key: ok for (key, _), (ok, _) in zip(jobs, results, strict=True)}
        stored = [won[key] and first[key] == j for j, (key, _) in enumerate(items)]
        return stored, [e for _, evicted in results for e in evicted]

    def put_many(self, items: Sequence[tuple[ChunkKey, KVChunk]], *, owned: bool = False) -> list[Evicted]:
        """Files are written in parallel (``io_threads``); the last item wins for a repeated key."""
        latest = dict(items)
        if len(latest) <= 1:
            return super().put_many(list(latest.items()), owned=owned)
        futures = [self._pool.submit(self.put, k, c) for k, c in latest.items()]
        evicted: list[Evicted] = []
        error: TierError | None = None
        for f in futures:
            try:
                evicted += f.result()
            except TierError as exc:
                error = error or exc
        if error is not None:
            raise error
        return evicted

    def _drain(self, aside: list[tuple[ChunkKey, str]]) -> list[Evicted]:
        """Load (when collecting) and delete files moved aside by eviction."""
        evicted: list[Evicted] = []
        for key, path in aside:
            if self.collect_evicted:
                with contextlib.suppress(OSError, EOFError, CodecError):
                    evicted.append((key, decode_buffer(read_file(path)[0])))
            unlink_quiet(path)
        return evicted

    # -- the rest -------------------------------------------------------------------------------------
    def delete(self, key: ChunkKey) -> bool:
        with self._lock:
            size = self._unaccount_locked(key)
            try:
                os.unlink(self.path_of(key))
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise self._error(f"ssd delete failed: {exc.strerror}") from exc
        return size is not None

    def close(self) -> None:
        self._pool.shutdown(wait=True)
