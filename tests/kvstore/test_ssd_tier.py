from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from kvstore import SSDTier, TierError
from kvstore.codec import encode
from tests.kvstore.conftest import assert_same, key, make_chunk


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_layout_and_atomic_files(tmp_path: Path) -> None:
    tier = SSDTier(tmp_path, 1 << 20)
    chunk = make_chunk(8)
    tier.put(key(1), chunk)
    path = Path(tier.path_of(key(1)))
    assert path.parent.name == key(1).hex[:2] and path.name == key(1).hex + ".kvf"
    assert _files(tmp_path) == [path]  # no temp files left behind
    assert path.read_bytes() == encode(chunk)


def test_restart_rebuilds_index(tmp_path: Path) -> None:
    chunks = {key(i): make_chunk(8, torch.bfloat16, seed=i) for i in range(4)}
    tier = SSDTier(tmp_path, 1 << 20)
    for i, (k, c) in enumerate(chunks.items()):
        tier.put(k, c)
        os.utime(tier.path_of(k), ns=(time.time_ns(), 1_000_000_000 * (1000 + i)))  # distinct mtimes
    used = tier.used_bytes
    tier.close()

    again = SSDTier(tmp_path, 1 << 20)
    assert again.used_bytes == used and set(again.keys()) == set(chunks)
    for k, c in chunks.items():
        assert_same(again.get(k), c)
    again.close()

    # a smaller budget at start evicts the oldest files first
    one = used // 4
    small = SSDTier(tmp_path, 2 * one)
    assert set(small.keys()) == {key(2), key(3)}
    assert len(_files(tmp_path)) == 2
    assert small.stats.snapshot().evictions == 2


def test_start_removes_temp_truncated_and_corrupt_files(tmp_path: Path) -> None:
    tier = SSDTier(tmp_path, 1 << 20)
    for i in range(3):
        tier.put(key(i), make_chunk(8, seed=i))
    p0, p1 = Path(tier.path_of(key(0))), Path(tier.path_of(key(1)))
    p0.write_bytes(p0.read_bytes()[:-5])  # truncated payload
    p1.write_bytes(b"\0" * 100)  # garbage header
    (p0.parent / f".{key(0).hex}.kvf.abc.tmp").write_bytes(b"partial")
    (p0.parent / "README").write_text("not ours")  # unknown files are left alone
    again = SSDTier(tmp_path, 1 << 20)
    assert set(again.keys()) == {key(2)}
    assert again.stats.snapshot().corrupt == 3
    assert not p0.exists() and not p1.exists() and (p0.parent / "README").exists()


def test_corrupt_payload_detected_on_read(tmp_path: Path) -> None:
    tier = SSDTier(tmp_path, 1 << 20)
    tier.put(key(1), make_chunk(8))
    tier.put(key(2), make_chunk(8, seed=2))
    path = Path(tier.path_of(key(1)))
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(data)
    assert tier.get(key(1)) is None
    assert tier.stats.snapshot().corrupt == 1
    assert not path.exists() and not tier.contains(key(1))
    assert tier.get(key(2)) is not None
    assert tier.used_bytes == os.path.getsize(tier.path_of(key(2)))


def test_file_removed_behind_our_back_is_a_miss(tmp_path: Path) -> None:
    tier = SSDTier(tmp_path, 1 << 20)
    tier.put(key(1), make_chunk(8))
    os.unlink(tier.path_of(key(1)))
    assert tier.get(key(1)) is None and tier.used_bytes == 0


def test_disk_full_raises_tier_error_and_reads_continue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tier = SSDTier(tmp_path, 1 << 20)
    tier.put(key(1), make_chunk(8))

    def full(fd: int, buffers: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", full)
    with pytest.raises(TierError, match="ENOSPC"):
        tier.put(key(2), make_chunk(8, seed=2))
    monkeypatch.undo()
    assert tier.get(key(1)) is not None and not tier.contains(key(2))
    assert [p.name for p in _files(tmp_path)] == [key(1).hex + ".kvf"]  # temp file cleaned up
    assert tier.stats.snapshot().errors == 1


def test_read_only_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tier = SSDTier(tmp_path, 1 << 20)
    tier.put(key(1), make_chunk(8))
    real_open = os.open

    def ro_open(path: str, flags: int, *args: int) -> int:
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", ro_open)
    with pytest.raises(TierError, match="EROFS"):
        tier.put(key(2), make_chunk(8))
    assert tier.get(key(1)) is not None


def test_fsync_never_and_bad_policy(tmp_path: Path) -> None:
    tier = SSDTier(tmp_path, 1 << 20, fsync="never")
    tier.put(key(1), make_chunk(8))
    assert tier.get(key(1)) is not None
    with pytest.raises(ValueError):
        SSDTier(tmp_path, 1 << 20, fsync="sometimes")  # type: ignore[arg-type]


def test_batch_read_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kvstore.tiers.ssd as ssd_module

    tier = SSDTier(tmp_path, 1 << 20)
    tier.put_many([(key(i), make_chunk(8, seed=i)) for i in range(3)])
    real = ssd_module.open_for_read
    bad = tier.path_of(key(1))

    def flaky(path: str) -> Any:
        if path == bad:
            raise OSError(errno.EIO, "Input/output error")
        return real(path)

    monkeypatch.setattr(ssd_module, "open_for_read", flaky)
    got = tier.get_many([key(0), key(1), key(2)])
    assert [g is not None for g in got] == [True, False, True]  # one bad read is one miss
    with pytest.raises(TierError, match="Input/output"):
        tier.get(key(1))  # when every read of a call fails, the call fails
    assert tier.stats.snapshot().errors == 2 and tier.contains(key(1))


def test_put_many_parallel_last_wins(tmp_path: Path) -> None:
    tier = SSDTier(tmp_path, 1 << 20, io_threads=3)
    items = [(key(i % 4), make_chunk(8, seed=i)) for i in range(10)]
    tier.put_many(items)
    for i in range(4):
        assert_same(tier.get(key(i)), make_chunk(8, seed=max(j for j in range(10) if j % 4 == i)))
    assert tier.used_bytes == sum(os.path.getsize(tier.path_of(key(i))) for i in range(4))


def test_a_huge_sparse_file_is_a_corrupt_miss_not_an_allocation(tmp_path: Path) -> None:
    tier = SSDTier(tmp_path, 1 << 20)
    tier.put(key(0), make_chunk(8))
    os.truncate(tier.path_of(key(0)), 4 << 40)  # 4 TiB, its header still the blob's: checked before allocating
    assert tier.get(key(0)) is None
    assert tier.stats.snapshot().corrupt == 1 and not os.path.exists(tier.path_of(key(0)))


def _with_version(blob: bytes, version: int) -> bytes:
    return blob[:4] + version.to_bytes(2, "little") + blob[6:]


def test_a_newer_builds_blob_is_left_in_place(tmp_path: Path) -> None:
    """Builds of two format versions may share a directory (an upgrade, a rollback): a blob of a newer
    version is a miss here, not corruption; one of an unknown older version is removed as corrupt."""
    tier = SSDTier(tmp_path, 1 << 20)
    for i in range(3):
        tier.put(key(i), make_chunk(8, seed=i))
    newer, older = Path(tier.path_of(key(0))), Path(tier.path_of(key(1)))
    newer.write_bytes(_with_version(newer.read_bytes(), 99))
    older.write_bytes(_with_version(older.read_bytes(), 0))
    assert tier.get(key(0)) is None and newer.exists()
    assert tier.get(key(1)) is None and not older.exists()
    assert tier.stats.snapshot().corrupt == 1
    tier.close()
    again = SSDTier(tmp_path, 1 << 20)  # the start-up scan keeps it too
    assert newer.exists() and again.contains(key(0)) and again.get(key(0)) is None
    assert_same(again.get(key(2)), make_chunk(8, seed=2))
