"""Small, careful file primitives for the SSD tier (vectored writes, exact reads, durable renames)."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator, Sequence

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


def read_exact_at(fd: int, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` from ``fd`` at ``offset`` (``pread``: safe from several threads at once); raises
    EOFError if the file ends first."""
    got = 0
    while got < buf.nbytes:
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n == 0:
            raise EOFError("file shrank while reading")
        got += n


@contextlib.contextmanager
def open_for_read(path: str) -> Iterator[tuple[int, int, Callable[[memoryview, int], None]]]:
    """``(size, inode, read_at)`` of the file at ``path``, open for the block: ``read_at(view, offset)`` fills
    ``view`` with the bytes at ``offset`` (from any thread; EOFError if the file shrank)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        yield st.st_size, st.st_ino, lambda view, offset: read_exact_at(fd, view, offset)
    finally:
        os.close(fd)


def read_file(path: str, alloc: Callable[[int], torch.Tensor] = empty_host) -> tuple[torch.Tensor, int]:
    """The whole file in a host buffer from ``alloc`` (uint8 tensor; default: a fresh one), and its inode."""
    with open_for_read(path) as (size, ino, read_at):
        buf = alloc(size)
        if size:
            read_at(buf.numpy().data, 0)
        return buf, ino


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
