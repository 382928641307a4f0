"""kill -9 during SSD writes: a child process writes blobs through the real SSD tier and logs each key
(fsynced) only after ``put`` returned; the parent SIGKILLs it at a random moment, reopens the directory and
checks that every acknowledged write reads back bit-exactly, that no temp file or torn blob survives the
reopen, and that the index matches the files on disk (count, sizes, ``used_bytes``).

Child: ``python -m workloads.reliability.ssd_crash DIR LOG FIRST``.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from kvstore import KeySpace, KVChunk, SSDTier, verify
from kvstore.tiers.ssd import SUFFIX, TMP_SUFFIX
from workloads.reliability.tally import Tally

SPACE = KeySpace("reliability-crash", "l4h2d64:float32", "crash")


def chunk_of(i: int) -> KVChunk:
    """Blob ``i``: 0.5–2.5 MiB of reproducible KV (big enough that a kill often lands mid-write)."""
    g = torch.Generator().manual_seed(i)
    tokens = 256 + (i * 37) % 1024
    kv = torch.randn(4, 2, 2, tokens, 64, generator=g)
    return KVChunk(kv, torch.arange(tokens), SPACE.fingerprint)


def child(root: str, log_path: str, first: int) -> None:
    tier = SSDTier(root, 1 << 40, fsync="always")
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    i = first
    while True:
        tier.put(SPACE.chunk_key([i]), chunk_of(i))
        os.write(fd, f"{i}\n".encode())
        os.fsync(fd)
        i += 1


def _acknowledged(log_path: Path) -> list[int]:
    if not log_path.exists():
        return []
    lines = log_path.read_text().split("\n")
    return [int(x) for x in lines[:-1] if x]  # the last line may be torn: an unacknowledged write


def _files(root: Path) -> tuple[list[Path], list[Path]]:
    blobs = [p for p in root.rglob("*") if p.is_file() and p.name.endswith(SUFFIX)]
    temps = [p for p in root.rglob("*") if p.is_file() and (p.name.endswith(TMP_SUFFIX) or p.name.startswith("."))]
    return blobs, temps


def run_ssd_crash(root: Path, kills: int = 3, seed_value: int = 0) -> Tally:
    tally = Tally("kill -9 during SSD writes")
    start = time.perf_counter()
    rng = random.Random(seed_value)
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / "acked.log"
    data = root / "kv"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torn_seen = 0
    for k in range(kills):
        first = 100_000 * (k + 1)
        proc = subprocess.Popen(
            [sys.executable, "-m", "workloads.reliability.ssd_crash", str(data), str(log_path), str(first)],
            env=env,
            cwd=Path(__file__).resolve().parents[2],
        )
        before = len(_acknowledged(log_path))
        deadline = time.monotonic() + 60
        while len(_acknowledged(log_path)) < before + 3 + rng.randrange(6) and time.monotonic() < deadline:
            if proc.poll() is not None:
                tally.fail("errors", f"the writer exited by itself with {proc.returncode}")
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.05))  # land anywhere inside the next write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        tally.faults += 1
        _, temps = _files(data)
        torn_seen += len(temps)
        tier = SSDTier(data, 1 << 40)  # reopen: scan, drop partial files, rebuild the index
        try:
            _check_reopened(tier, data, _acknowledged(log_path), tally)
        finally:
            tier.close()
    tally.seconds = time.perf_counter() - start
    tally.notes = {"kills": kills, "acknowledged": len(_acknowledged(log_path)), "temp_files_at_kill": torn_seen}
    return tally


def _check_reopened(tier: SSDTier, data: Path, acked: list[int], tally: Tally) -> None:
    for i in acked:
        tally.requests += 1
        got = tier.get(SPACE.chunk_key([i]))
        want = chunk_of(i)
        if got is None:
            tally.fail("lost", f"acknowledged write {i} is gone after kill -9")
        elif not torch.equal(got.kv, want.kv) or not torch.equal(got.positions, want.positions):
            tally.fail("wrong", f"acknowledged write {i} reads back different bytes")
    blobs, temps = _files(data)
    tally.check(not temps, "bound", f"temp files left after reopen: {[p.name for p in temps]}")
    on_disk = {p.name.removesuffix(SUFFIX): p.stat().st_size for p in blobs}
    stored_keys = tier.keys()
    indexed = {k.hex: os.path.getsize(tier.path_of(k)) for k in stored_keys}
    tally.check(on_disk == indexed, "bound", "the index does not match the files on disk")
    tally.check(tier.used_bytes == sum(on_disk.values()), "bound", "used_bytes does not match the file sizes")
    for p in blobs:  # no torn blob: every file left is a complete, valid blob
        tally.requests += 1
        try:
            verify(p.read_bytes())
        except Exception as exc:
            tally.fail("wrong", f"torn blob {p.name[:8]}… survived the reopen: {exc}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(1)
    child(sys.argv[1], sys.argv[2], int(sys.argv[3]))
