"""The raw media that ``kvfuse bench store`` compares each tier with, moving the same bytes in the same run."""

from __future__ import annotations

import os

import numpy as np
import redis
import torch

from kvstore.hostmem import empty_host


def drop_page_cache(path: str) -> None:
    """Evict a file's (clean) pages from the page cache so the next read hits the device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class RawMedium:
    """The plain medium, moving the same bytes as the tier."""

    def __init__(self, kind: str, nbytes: int, *, ssd_dir: str, fsync: str, redis_url: str | None) -> None:
        self.kind, self.ssd_dir, self.fsync = kind, ssd_dir, fsync
        self.client = redis.Redis.from_url(redis_url) if redis_url else None
        self._held: dict[int, torch.Tensor] = {}
        self._out = empty_host(nbytes)
        self._out.fill_(0)  # warm: the raw copy out never pays page faults

    def put(self, i: int, blob: bytes) -> None:
        if self.kind == "cpu":  # memcpy into warm memory (the buffer was faulted in before timing)
            np.copyto(self._held[i].numpy(), np.frombuffer(blob, dtype=np.uint8))
        elif self.kind == "ssd":
            with open(self.path(i), "wb") as f:
                f.write(blob)
                if self.fsync == "always":
                    os.fsync(f.fileno())
        else:
            assert self.client is not None
            self.client.set(f"bench-raw:{i}", blob)

    def prepare(self, i: int, nbytes: int) -> None:
        if self.kind == "cpu":
            self._held[i] = empty_host(nbytes)
            self._held[i].fill_(0)

    def path(self, i: int) -> str:
        return os.path.join(self.ssd_dir, f"raw-{i}.bin")

    def get(self, i: int) -> object:
        if self.kind == "cpu":  # memcpy out into warm memory
            np.copyto(self._out.numpy(), self._held[i].numpy())
            return self._out
        if self.kind == "ssd":  # one read into warm memory, as the tier reads into its warm buffers
            with open(self.path(i), "rb", buffering=0) as f:
                n = f.readinto(self._out.numpy().data)
            if n != self._out.numel():
                raise RuntimeError(f"raw read got {n} of {self._out.numel()} bytes")
            return self._out
        assert self.client is not None
        return self.client.get(f"bench-raw:{i}")

    def close(self) -> None:
        self._held.clear()
        if self.client is not None:
            keys = list(self.client.scan_iter(match="bench-raw:*"))
            if keys:
                self.client.delete(*keys)
            self.client.close()
