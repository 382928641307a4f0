"""Small, careful file primitives for the SSD tier (vectored writes, exact reads, durable renames)."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Sequence

import torch

from kvstore.hostmem import empty_host


def write_all(fd: int, pieces: Sequence[memoryview | bytes]) -> None:
    """Write every piece, in order, with as few ``writev`` calls as the kernel allows (no joining copy)."""
    views = [memoryview(p).cast("B") for p in pieces if len(p)]
    while views:
        n = os.writev(fd, views)
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def read_exact(fd: int, buf: memoryview) -> None:
    """Fill ``buf`` from ``fd``; raises EOFError if the file ends first."""
    got = 0
    while got < buf.nbytes:
        n = os.readv(fd, [buf[got:]])
        if n == 0:
            raise EOFError("file shrank while reading")
        got += n


def read_file(
    path: str,
    alloc: Callable[[int], torch.Tensor] = empty_host,
    consume: Callable[[torch.Tensor, int], object] | None = None,
    stripe: int = 1 << 20,
) -> tuple[torch.Tensor, int]:
    """The whole file in a host buffer from ``alloc`` (uint8 tensor; default: a fresh one), and its inode.

    With ``consume``, the file is read in stripes of ``stripe`` bytes and ``consume(buf, end)`` runs after
    each one lands (bytes ``[0, end)`` are in; at least once, even for an empty file), while that stripe is
    still in the CPU cache: with stripes about the size of an L2 cache, a checksum pass reads each from
    there instead of from memory (measured on a 5.9 MB blob: read plus hash 20% faster than a read, then a
    hash). ``consume`` may raise to stop reading.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        size, ino = st.st_size, st.st_ino
        buf = alloc(size)
        mv = buf.numpy().data if size else memoryview(b"")
        if consume is None:
            read_exact(fd, mv)
            return buf, ino
        end = 0
        while True:
            start, end = end, min(size, end + max(1, stripe))
            read_exact(fd, mv[start:end])
            consume(buf, end)
            if end >= size:
                return buf, ino
    finally:
        os.close(fd)


def preallocate(fd: int, nbytes: int) -> None:
    """Reserve the file's blocks before writing it: on ext4/xfs a write into allocated blocks skips
    delayed allocation and runs about 1.5-2x faster than a plain append (measured: 4.4 vs 3.0 GB/s for
    34 MB into the page cache). A file system without ``fallocate`` just writes as usual."""
    if nbytes <= 0:
        return
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


def write_new_file(path: str, pieces: Sequence[memoryview | bytes], fsync: bool) -> None:
    """Create ``path`` (must not exist) with ``pieces``; fsync it when asked. Removed again on failure."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        preallocate(fd, sum(len(memoryview(p).cast("B")) for p in pieces))
        write_all(fd, pieces)
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        unlink_quiet(path)
        raise
    os.close(fd)


def fsync_dir(path: str) -> None:
    """Make renames and unlinks in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quiet(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
