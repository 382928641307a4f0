from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvstore.tiers.fileio import read_file


@pytest.mark.parametrize(("size", "stripe"), [(0, 4), (1, 4), (10, 4), (12, 4), (12, 1 << 20), (5000, 1)])
def test_read_file_in_stripes(tmp_path: Path, size: int, stripe: int) -> None:
    data = bytes(range(256)) * (size // 256 + 1)
    path = tmp_path / "f"
    path.write_bytes(data[:size])
    seen: list[tuple[int, bytes]] = []

    def consume(buf: torch.Tensor, end: int) -> None:
        seen.append((end, bytes(buf[:end].numpy())))

    buf, ino = read_file(str(path), consume=consume, stripe=stripe)
    assert bytes(buf.numpy()) == data[:size] and ino == path.stat().st_ino
    ends = [end for end, _ in seen]
    assert ends == ([*range(stripe, size, stripe), size] if size else [0])  # in order, at least once
    assert all(prefix == data[:end] for end, prefix in seen)  # each prefix had fully landed


def test_read_file_consume_stops_the_read(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    calls: list[int] = []

    def consume(buf: torch.Tensor, end: int) -> None:
        calls.append(end)
        raise ValueError("bad header")

    with pytest.raises(ValueError, match="bad header"):
        read_file(str(path), consume=consume, stripe=10)
    assert calls == [10]
