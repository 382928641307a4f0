from __future__ import annotations

import threading
from pathlib import Path

import pytest

from kvstore.tiers.fileio import open_for_read, read_file


@pytest.mark.parametrize("size", [0, 1, 4097, 1 << 20])
def test_read_file(tmp_path: Path, size: int) -> None:
    data = bytes(range(256)) * (size // 256 + 1)
    path = tmp_path / "f"
    path.write_bytes(data[:size])
    buf, ino = read_file(str(path))
    assert bytes(buf.numpy()) == data[:size] and ino == path.stat().st_ino


def test_read_at_from_several_threads(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096
    path = tmp_path / "f"
    path.write_bytes(data)
    out = bytearray(len(data))
    view = memoryview(out)
    with open_for_read(str(path)) as (size, ino, read_at):
        assert (size, ino) == (len(data), path.stat().st_ino)
        parts = [(lo, min(size, lo + 100_000)) for lo in range(0, size, 100_000)]
        threads = [threading.Thread(target=read_at, args=(view[lo:hi], lo)) for lo, hi in parts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert bytes(out) == data


def test_read_at_past_the_end_is_an_eof(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    with open_for_read(str(path)) as (_, _, read_at), pytest.raises(EOFError):
        read_at(memoryview(bytearray(50)), 80)
