"""A pre-allocated host arena: one buffer, carved into blocks by a size-class allocator.

Why: a fresh multi-megabyte host buffer is faulted in page by page on its first write, which on virtual
machines runs at about 1 GB/s, several times slower than ``memcpy``. The arena maps its memory once
(page-locked where CUDA exists, otherwise anonymous memory with transparent huge pages), populates it ahead
of use in the background (``MADV_POPULATE_WRITE``, which never changes contents), and recycles blocks, so a
put is one copy into warm memory.

Blocks are handed out as *leases*: 1-D ``uint8`` tensors whose storage owns a private numpy view of the
block. Every tensor derived from a lease (``view``, slicing, ``KVChunk`` fields) shares that storage, so the
block returns to the free lists only when the last of them is gone: bytes that a caller still sees are
never reused. Nothing has to be released by hand; a lease dropped while unused is freed at once (CPython
reference counting). The free happens in a finalizer, which only appends to a queue; the allocator drains
that queue under its own lock, so a finalizer running inside a locked region cannot deadlock.

Allocator: free blocks are kept by start and by end (neighbours coalesce on free) and binned by size
class (4 classes per power of two, in units of :data:`ALIGN` bytes). An allocation scans its own class for
a block that fits, then takes any block of a larger class and splits it. Blocks of one size (the common
case: one model, one chunk size) are reused exactly, without fragmentation.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import mmap
import os
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import cast

import numpy as np
import torch

from kvstore.hostmem import empty_host

log = logging.getLogger(__name__)

ALIGN = 64  # block granularity: a cache line, enough for every KV dtype and for SIMD copies
_SUBCLASSES = 4
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14; not exported by the mmap module
_POPULATE_STEP = 32 << 20
_populator = ThreadPoolExecutor(1, thread_name_prefix="kvstore-arena-populate")


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return cast(Callable[[int, int, int], int], fn)


_madvise = _libc_madvise()


def _populate(mm: mmap.mmap, base: int, start: int, length: int) -> None:
    """Fault ``length`` bytes from page-aligned ``start`` of ``mm`` (mapped at ``base``) in, contents unchanged.
    Through libc, which ctypes calls without the GIL: ``mmap.madvise`` holds it throughout, and faulting
    32 MiB in takes about 30 ms on a VM, during which no other thread of the process ran."""
    if _madvise is None:
        mm.madvise(_MADV_POPULATE_WRITE, start, length)
    elif _madvise(base + start, length, _MADV_POPULATE_WRITE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _size_class(units: int) -> int:
    """Size class of a block of ``units`` x ALIGN bytes (monotonic in ``units``)."""
    if units < _SUBCLASSES:
        return units
    bits = units.bit_length()
    return bits * _SUBCLASSES + ((units >> (bits - 3)) & (_SUBCLASSES - 1))


class HostArena:
    """``capacity`` bytes of host memory and the blocks allocated from it; thread-safe."""

    def __init__(self, capacity: int, *, pin: bool = False, populate_ahead: int = 256 << 20) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity // ALIGN * ALIGN
        self.pinned = bool(pin and self.capacity)
        self._mmap: mmap.mmap | None = None
        self._array: np.ndarray
        if self.pinned:
            self._array = torch.empty(self.capacity, dtype=torch.uint8, pin_memory=True).numpy()
        elif self.capacity:
            self._mmap = mmap.mmap(-1, self.capacity)
            with contextlib.suppress(OSError, AttributeError):  # kernels without THP
                self._mmap.madvise(mmap.MADV_HUGEPAGE)
            self._array = np.frombuffer(self._mmap, dtype=np.uint8)
        else:
            self._array = np.empty(0, dtype=np.uint8)
        self._lock = threading.Lock()
        self._freed: collections.deque[tuple[int, int]] = collections.deque()
        self._free_start: dict[int, int] = {}  # start -> size
        self._free_end: dict[int, int] = {}  # end -> start
        self._bins: dict[int, set[int]] = {}  # size class -> starts of free blocks
        self._allocated = 0
        self._high_water = 0
        self._populated = 0
        self._populating = False
        self._ahead = max(0, populate_ahead)
        if self.capacity:
            self._insert_free(0, self.capacity)

    # -- accounting ---------------------------------------------------------------------------------
    @property
    def allocated_bytes(self) -> int:
        """Bytes in blocks not yet returned (stored entries, reservations and blocks still viewed)."""
        with self._lock:
            self._drain_locked()
            return self._allocated

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.allocated_bytes

    def owns(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s memory lies in this arena."""
        if not self.capacity or t.device.type != "cpu":
            return False
        base = int(self._array.ctypes.data)
        return base <= t.data_ptr() < base + self.capacity

    # -- allocation ---------------------------------------------------------------------------------
    @staticmethod
    def block_size(nbytes: int) -> int:
        """Arena bytes a request of ``nbytes`` occupies."""
        return max(ALIGN, -(-nbytes // ALIGN) * ALIGN)

    def alloc(self, nbytes: int) -> torch.Tensor | None:
        """A lease of ``nbytes`` (a 1-D uint8 tensor over a block), or ``None`` when no free block fits."""
        size = self.block_size(nbytes)
        with self._lock:
            self._drain_locked()
            start = self._take_locked(size)
            if start is None:
                return None
            self._allocated += size
            self._high_water = max(self._high_water, start + size)
            high_water = self._high_water
        self._schedule_populate(high_water + min(self._ahead, 8 * size))
        handle = self._array[start : start + size]
        finalizer = weakref.finalize(handle, self._freed.append, (start, size))
        finalizer.atexit = False
        lease = torch.from_numpy(handle)  # the storage keeps ``handle`` alive, and with it the block
        return lease[:nbytes]

    def lease(self, nbytes: int) -> torch.Tensor:
        """A lease from the arena, or a fresh host buffer when the arena has no free block that fits."""
        got = self.alloc(nbytes)
        return got if got is not None else empty_host(nbytes, self.pinned)

    def _take_locked(self, size: int) -> int | None:
        units = size // ALIGN
        cls = _size_class(units)
        for start in self._bins.get(cls, ()):
            if self._free_start[start] >= size:
                return self._split_locked(start, size)
        for c in sorted(c for c, starts in self._bins.items() if c > cls and starts):
            return self._split_locked(next(iter(self._bins[c])), size)
        return None

    def _split_locked(self, start: int, size: int) -> int:
        have = self._remove_free(start)
        if have > size:
            self._insert_free(start + size, have - size)
        return start

    def _insert_free(self, start: int, size: int) -> None:
        self._free_start[start] = size
        self._free_end[start + size] = start
        self._bins.setdefault(_size_class(size // ALIGN), set()).add(start)

    def _remove_free(self, start: int) -> int:
        size = self._free_start.pop(start)
        del self._free_end[start + size]
        cls = _size_class(size // ALIGN)
        self._bins[cls].discard(start)
        if not self._bins[cls]:
            del self._bins[cls]
        return size

    def _drain_locked(self) -> None:
        while self._freed:
            start, size = self._freed.popleft()
            self._allocated -= size
            before = self._free_end.get(start)
            if before is not None:
                size += start - before
                self._remove_free(before)
                start = before
            if start + size in self._free_start:
                size += self._remove_free(start + size)
            self._insert_free(start, size)

    # -- populating ahead of use --------------------------------------------------------------------
    def populate(self) -> None:
        """Fault the whole arena in now (blocking); contents are not changed."""
        self._populate_to(self.capacity)

    def _schedule_populate(self, target: int) -> None:
        """Fault pages in, in the background, up to ``target`` (a little ahead of the highest block used)."""
        if self._mmap is None:
            return
        target = min(self.capacity, target)
        with self._lock:
            if self._populating or target <= self._populated:
                return
            self._populating = True
        _populator.submit(self._populate_to, target, True)

    def _populate_to(self, target: int, background: bool = False) -> None:
        mm = self._mmap
        try:
            while mm is not None:
                with self._lock:
                    start = self._populated
                if start >= target:
                    break
                end = min(self.capacity, -(-min(target, start + _POPULATE_STEP) // mmap.PAGESIZE) * mmap.PAGESIZE)
                try:
                    _populate(mm, int(self._array.ctypes.data), start, end - start)
                except (OSError, ValueError):  # an old kernel: first touch will fault pages in
                    with self._lock:
                        self._populated = self.capacity
                    break
                with self._lock:
                    self._populated = max(self._populated, end)
        finally:
            if background:
                with self._lock:
                    self._populating = False
