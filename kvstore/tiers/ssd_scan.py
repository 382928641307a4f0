"""The SSD tier's start-up scan: which complete blob files a directory holds (partial ones are removed)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from kvstore.codec import PREFIX_SIZE, header_nbytes, peek_header
from kvstore.errors import CodecError, from_newer_build
from kvstore.keys import ChunkKey
from kvstore.tiers.fileio import unlink_quiet

SUFFIX = ".kvf"
TMP_SUFFIX = ".tmp"


@dataclass
class ScanResult:
    """``found``: (mtime ns, key, size) of every valid blob; ``corrupt``: files removed; ``dirs``: shard dirs."""

    found: list[tuple[int, ChunkKey, int]] = field(default_factory=list)
    corrupt: int = 0
    dirs: set[str] = field(default_factory=set)


def valid_file(path: str, size: int) -> bool:
    """Whether ``path`` starts with a codec header describing a blob of exactly ``size`` bytes."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(PREFIX_SIZE)
            head = prefix + f.read(max(0, header_nbytes(prefix) - PREFIX_SIZE))
        return peek_header(head).total_nbytes == size
    except (OSError, CodecError) as exc:
        return from_newer_build(exc)  # a newer build's blob: kept, its size is that build's to check


def scan_blobs(root: str) -> ScanResult:
    """Walk ``root/<2 hex>/<key hex>.kvf``; leftover temp files and truncated or misplaced blobs are removed."""
    out = ScanResult()
    for sub in os.scandir(root):
        if not (sub.is_dir() and len(sub.name) == 2):
            continue
        out.dirs.add(sub.path)
        for entry in os.scandir(sub.path):
            name = entry.name
            if name.endswith(TMP_SUFFIX):
                unlink_quiet(entry.path)
                out.corrupt += 1
                continue
            if not name.endswith(SUFFIX):
                continue
            try:
                key = ChunkKey.from_hex(name[: -len(SUFFIX)])
            except ValueError:
                continue
            st = entry.stat()
            if key.hex[:2] != sub.name or not valid_file(entry.path, st.st_size):
                unlink_quiet(entry.path)
                out.corrupt += 1
                continue
            out.found.append((st.st_mtime_ns, key, st.st_size))
    return out
