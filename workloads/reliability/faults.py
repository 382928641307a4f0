"""Tier faults behind a running service: Redis killed and restarted under load; SSD read-only or full.

- Redis outage: clients run the checked request mix (chat, uploads, downloads, prefetch) against a
  CPU + Redis service; Redis is killed a third of the way in and restarted at two thirds. No request may
  fail, every answer must match its reference, every acknowledged upload must read back, and the Redis tier
  must rejoin (available again, new writes reach it, reads are served from it).
- SSD read-only / full (see :mod:`workloads.reliability.fsfaults` for the mechanisms): while the fault
  lasts, uploads and warm-ups still succeed (the SSD write fails cleanly and is counted), chats answer, and
  blobs already on SSD are still served from it; afterwards no temp file is left, the index matches the
  files, and SSD writes work again.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

from blending.model import LoadedModel
from kvstore import SSDTier, verify
from kvstore.redis_local import LocalRedis
from kvstore.tiers.ssd import SUFFIX, TMP_SUFFIX
from workloads.reliability.fsfaults import file_size_limit, grow_fs, read_only, small_fs
from workloads.reliability.ops import Ops, start_clients
from workloads.reliability.service import Harness, running_service
from workloads.reliability.tally import Tally

MIX = {"chat": 2.0, "upload": 3.0, "download": 3.0, "prefetch": 1.0}


def run_redis_outage(loaded: LoadedModel, root: Path, redis: LocalRedis, seconds: float = 12.0) -> Tally:
    tally = Tally("Redis killed + restarted under load")
    start = time.perf_counter()
    with running_service(loaded, root, cpu_bytes=512 << 20, ssd_bytes=0, redis_url=redis.url) as h:
        ops = Ops(h, tally)
        ops.prepare(prompts=2)
        stop = threading.Event()
        threads = start_clients(ops, 4, stop, MIX, seed_value=1)
        time.sleep(seconds / 3)
        redis.kill()
        tally.faults += 1
        time.sleep(seconds / 3)
        redis.restart()
        time.sleep(seconds / 3)
        stop.set()
        for t in threads:
            t.join()
        rejoined = _wait_rejoin(h, tally, ops)
        tally.check(rejoined, "bound", "the Redis tier did not rejoin within 15 s")
        ops.verify_acked()
        report = h.store.stats().tier("redis")
        tally.check(report.stats.errors + report.skipped > 0, "bound", "the outage was never noticed by the tier")
        tally.notes = {**ops.counts, "redis_errors": report.stats.errors, "redis_skipped": report.skipped}
    tally.seconds = time.perf_counter() - start
    return tally


def _wait_rejoin(h: Harness, tally: Tally, ops: Ops) -> bool:
    """Upload until a new blob reaches Redis, then read it back from Redis alone."""
    redis = h.tier("redis")
    rng = random.Random(7)
    deadline = time.monotonic() + 15
    with h.client("alice") as c:
        while time.monotonic() < deadline:
            before = set(ops.acked)
            ops.upload(c, rng)
            new = [k for k in ops.acked if k not in before]
            if new and h.store.stats().tier("redis").available:
                stored = h.state.keys.stored("alice", new[0])
                if redis.contains(stored):
                    h.clear_memory([stored])
                    r = c.get(f"/v1/chunks/{new[0]}")
                    tally.requests += 1
                    return r.status_code == 200 and r.content == ops.acked[new[0]]
            time.sleep(0.2)
    return False


def _ssd_files(path: Path) -> tuple[list[Path], list[Path]]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return [p for p in files if p.name.endswith(SUFFIX)], [p for p in files if p.name.endswith(TMP_SUFFIX)]


def _exercise(h: Harness, ops: Ops, tally: Tally, rng: random.Random) -> None:
    """Requests during the fault: writes must succeed (memory keeps them), reads must still hit SSD."""
    ssd = h.tier("ssd")
    errors_before = ssd.stats.snapshot().errors
    on_ssd = ssd.keys()
    with h.client("alice") as c:
        for _ in range(6):
            ops.upload(c, rng)
        ops.warm(c, rng)
        ops.chat(c, rng)
        ops.prefetch(c, rng)
        hits_before = ssd.stats.snapshot().hits
        h.clear_memory(on_ssd)
        for blob_key in on_ssd:  # reads continue: every blob on SSD before the fault is still served
            tally.requests += 1
            tally.check(h.store.get(blob_key) is not None, "lost", "a blob on SSD could not be read during the fault")
        tally.check(ssd.stats.snapshot().hits - hits_before >= len(on_ssd), "bound", "reads were not served by SSD")
        ops.chat(c, rng)
    failed_writes = ssd.stats.snapshot().errors - errors_before
    tally.faults += failed_writes
    tally.check(failed_writes > 0, "bound", "no SSD write failed: the fault was not effective")
    tally.check(h.store.stats().tier("ssd").available, "bound", "a failed write took the SSD tier out")


def _after(h: Harness, ops: Ops, tally: Tally, kv: Path, rng: random.Random) -> None:
    blobs, temps = _ssd_files(kv)
    tally.check(not temps, "bound", f"{len(temps)} temp files left behind by failed writes")
    ssd: SSDTier = h.tier("ssd")
    stored_keys = ssd.keys()
    indexed = {k.hex for k in stored_keys}
    tally.check(indexed == {p.name.removesuffix(SUFFIX) for p in blobs}, "bound", "SSD index differs from the files")
    for p in blobs:
        tally.requests += 1
        try:
            verify(p.read_bytes())
        except Exception as exc:
            tally.fail("wrong", f"a blob on SSD is damaged after the fault: {exc}")
    errors = ssd.stats.snapshot().errors
    with h.client("alice") as c:
        ops.upload(c, rng)
    tally.check(ssd.stats.snapshot().errors == errors, "bound", "SSD writes still fail after the fault ended")
    ops.verify_acked()


def run_ssd_faults(loaded: LoadedModel, root: Path) -> Tally:
    tally = Tally("SSD read-only + full")
    start = time.perf_counter()
    rng = random.Random(3)
    mechanisms: dict[str, str | None] = {}
    with running_service(loaded, root / "ro", cpu_bytes=512 << 20) as h:
        ops = Ops(h, tally)
        ops.prepare(prompts=1)
        with read_only(root / "ro" / "kv") as how:
            mechanisms["read-only"] = how
            if how is not None:
                _exercise(h, ops, tally, rng)
        if how is not None:
            _after(h, ops, tally, root / "ro" / "kv", rng)
    kv = root / "full" / "kv"
    with small_fs(kv, 24 << 20) as how:
        mechanisms["full"] = how or "RLIMIT_FSIZE"
        with running_service(loaded, root / "full", cpu_bytes=512 << 20) as h:
            ops = Ops(h, tally)
            ops.prepare(prompts=1)
            if how is not None:
                with h.client("alice") as c:  # fill the file system up (the tier's budget is far larger)
                    for _ in range(40):
                        ops.upload(c, rng)
                _exercise(h, ops, tally, rng)
                grow_fs(kv, 512 << 20)
            else:
                with file_size_limit(256 << 10):
                    _exercise(h, ops, tally, rng)
            _after(h, ops, tally, kv, rng)
    tally.notes = {"mechanisms": mechanisms}
    tally.check(all(mechanisms.values()), "bound", f"a fault could not be injected here: {mechanisms}")
    tally.seconds = time.perf_counter() - start
    return tally
