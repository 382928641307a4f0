"""Real file-system faults for the SSD tier: a read-only directory and a full file system.

The sandbox and CI usually run as root, which ignores permission bits (``chmod 0555`` would not stop a
write), so these use mechanisms that bind root too, best first:

- read-only: a read-only bind mount over the directory (``EROFS``); else the immutable attribute on the
  directory tree (``chattr +i``, ``EPERM``); else, when not root, ``chmod 0555``.
- full: a small ``tmpfs`` mounted on the directory (a real ``ENOSPC``); else ``RLIMIT_FSIZE`` for the whole
  process with ``SIGXFSZ`` ignored (writes past the limit fail with ``EFBIG``).

Each context manager yields the mechanism's name, or ``None`` when none is available here.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path


def _run(*args: str) -> bool:
    return subprocess.run(args, capture_output=True, check=False).returncode == 0


def _dirs(path: Path) -> list[Path]:
    return [path, *(p for p in path.rglob("*") if p.is_dir())]


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[str | None]:
    if _run("mount", "--bind", str(path), str(path)):
        if _run("mount", "-o", "remount,ro,bind", str(path)):
            try:
                yield "read-only bind mount (EROFS)"
            finally:
                _run("umount", str(path))
            return
        _run("umount", str(path))
    dirs = _dirs(path)
    if all(_run("chattr", "+i", str(d)) for d in dirs):
        try:
            yield "chattr +i on the directory tree (EPERM)"
        finally:
            for d in dirs:
                _run("chattr", "-i", str(d))
        return
    for d in dirs:
        _run("chattr", "-i", str(d))
    if os.geteuid() != 0:
        modes = {d: d.stat().st_mode for d in dirs}
        for d in dirs:
            d.chmod(0o555)
        try:
            yield "chmod 0555 (EACCES)"
        finally:
            for d, mode in modes.items():
                d.chmod(mode)
        return
    yield None


@contextlib.contextmanager
def small_fs(path: Path, size_bytes: int) -> Iterator[str | None]:
    """Mount a ``size_bytes`` tmpfs on ``path`` (which should be empty) for the duration."""
    path.mkdir(parents=True, exist_ok=True)
    if _run("mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)):
        try:
            yield f"tmpfs of {size_bytes >> 20} MiB (ENOSPC)"
        finally:
            _run("umount", "-l", str(path))
        return
    yield None


def grow_fs(path: Path, size_bytes: int) -> bool:
    """Resize the tmpfs mounted by :func:`small_fs` (frees the file system up again)."""
    return _run("mount", "-o", f"remount,size={size_bytes}", str(path))


@contextlib.contextmanager
def file_size_limit(limit_bytes: int) -> Iterator[str]:
    """``RLIMIT_FSIZE`` for this process: any file write past ``limit_bytes`` fails with ``EFBIG``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, hard))
    try:
        yield f"RLIMIT_FSIZE of {limit_bytes >> 10} KiB (EFBIG)"
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
