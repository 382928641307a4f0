"""Store tier benchmark: put/get throughput and latency per tier, against the raw medium in the same run.

For each blob size and tier it measures the tier's ``put``/``get`` and, interleaved with it, the plain
medium moving the same bytes: a tensor ``clone`` (CPU), a file write (+fsync, same policy) / read (SSD),
plain redis-py ``SET``/``GET`` (Redis). LMCache 0.5.6's published numbers are shown as a peer column.

    python -m workloads.bench_store [--quick] [--json out.json] [--redis-url redis://...] [--ssd-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import redis
import torch

from kvstore import KeySpace, KVChunk, MemoryTier, RedisTier, SSDTier, Tier
from kvstore.codec import encode
from kvstore.redis_local import LocalRedis, redis_server_binary
from kvstore.tiers.ssd import FsyncPolicy


@dataclass(frozen=True)
class BlobShape:
    """One 256-token chunk of a model: ``[layers, 2, kv_heads, tokens, head_dim]`` in ``dtype``."""

    layers: int
    kv_heads: int
    tokens: int
    head_dim: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.layers * 2 * self.kv_heads * self.tokens * self.head_dim * self.dtype.itemsize


SIZES: dict[str, BlobShape] = {
    "smollm2-135m-bf16": BlobShape(30, 3, 256, 64, torch.bfloat16),  # 5.9 MB
    "smollm2-135m-fp32": BlobShape(30, 3, 256, 64, torch.float32),  # 11.8 MB
    "llama3-8b-bf16": BlobShape(32, 8, 256, 128, torch.bfloat16),  # 33.6 MB
    "tiny-fp32": BlobShape(2, 2, 64, 64, torch.float32),  # 64 KiB (--quick)
    "small-bf16": BlobShape(4, 4, 128, 128, torch.bfloat16),  # 1 MiB (--quick)
}
DEFAULT_SIZES = ("smollm2-135m-bf16", "smollm2-135m-fp32", "llama3-8b-bf16")
QUICK_SIZES = ("tiny-fp32", "small-bf16")
TIERS = ("cpu", "ssd", "redis")
FLOOR = 0.8  # tier throughput must be >= FLOOR x raw medium

# LMCache 0.5.6 reference (GB/s put, get) per blob size: 5.9 MB and 33.6 MB chunks.
LMCACHE_REFERENCE: dict[str, dict[str, tuple[float, float]]] = {
    "cpu": {"5.9MB": (21.7, 27.7), "33.6MB": (12.2, 12.9)},  # LocalCPU
    "ssd": {"5.9MB": (3.2, 7.4), "33.6MB": (3.2, 5.4)},  # LocalDisk
    "redis": {"5.9MB": (2.3, 2.2), "33.6MB": (1.2, 1.1)},  # native RESP client
    "redis-py": {"5.9MB": (1.16, 0.61), "33.6MB": (0.62, 0.34)},  # its redis-py connector
}


def _lmcache_size(nbytes: int) -> str | None:
    for label, ref in (("5.9MB", 5.9e6), ("33.6MB", 33.6e6)):
        if abs(nbytes - ref) / ref < 0.03:
            return label
    return None


def make_chunk(shape: BlobShape, seed: int = 0) -> KVChunk:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(shape.layers, 2, shape.kv_heads, shape.tokens, shape.head_dim, generator=g)
    return KVChunk(kv.to(shape.dtype), torch.arange(shape.tokens), "bench")


def _summary(seconds: list[float], nbytes: int) -> dict[str, float]:
    arr = np.asarray(seconds)
    return {
        "gbps": float(nbytes * len(arr) / arr.sum() / 1e9),
        "p50_ms": float(np.percentile(arr, 50) * 1e3),
        "p99_ms": float(np.percentile(arr, 99) * 1e3),
    }


def drop_page_cache(path: str) -> None:
    """Evict a file's (clean) pages from the page cache so the next read hits the device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _timed(fn: Callable[..., object], *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


class _RawMedium:
    """The plain medium, moving the same bytes as the tier."""

    def __init__(self, kind: str, *, ssd_dir: str, fsync: str, redis_url: str | None) -> None:
        self.kind, self.ssd_dir, self.fsync = kind, ssd_dir, fsync
        self.client = redis.Redis.from_url(redis_url) if redis_url else None
        self._held: dict[int, object] = {}

    def put(self, i: int, chunk: KVChunk, blob: bytes) -> None:
        if self.kind == "cpu":
            self._held[i] = chunk.kv.clone()
        elif self.kind == "ssd":
            with open(self.path(i), "wb") as f:
                f.write(blob)
                if self.fsync == "always":
                    os.fsync(f.fileno())
        else:
            assert self.client is not None
            self.client.set(f"bench-raw:{i}", blob)

    def path(self, i: int) -> str:
        return os.path.join(self.ssd_dir, f"raw-{i}.bin")

    def get(self, i: int) -> object:
        if self.kind == "cpu":
            held = self._held[i]
            assert isinstance(held, torch.Tensor)
            return held.clone()
        if self.kind == "ssd":
            with open(self.path(i), "rb") as f:
                return f.read()
        assert self.client is not None
        return self.client.get(f"bench-raw:{i}")

    def close(self) -> None:
        self._held.clear()
        if self.client is not None:
            keys = list(self.client.scan_iter(match="bench-raw:*"))
            if keys:
                self.client.delete(*keys)
            self.client.close()


def _make_tier(
    kind: str, nbytes: int, iterations: int, *, ssd_dir: str, fsync: str, redis_url: str | None
) -> Tier:
    budget = (iterations + 4) * (nbytes + (1 << 20))
    if kind == "cpu":
        return MemoryTier(budget)
    if kind == "ssd":
        return SSDTier(os.path.join(ssd_dir, "tier"), budget, fsync=cast(FsyncPolicy, fsync))
    assert redis_url is not None
    return RedisTier(redis_url, budget, namespace=f"bench-{uuid.uuid4().hex[:8]}")


def bench_one(
    kind: str, size: str, shape: BlobShape, iterations: int, warmup: int, cold: bool, **where: Any
) -> dict[str, Any]:
    """Interleaved tier vs raw-medium timings for one tier and blob size.

    ``cold``: SSD reads (tier and raw alike) start with the file evicted from the page cache.
    """
    chunk = make_chunk(shape)
    blob = encode(chunk)
    keys = [KeySpace("bench", size).chunk_key([i]) for i in range(iterations + warmup)]
    tier = _make_tier(kind, len(blob), iterations + warmup, **where)
    raw = _RawMedium(kind, **where)
    times: dict[str, list[float]] = {"put": [], "get": [], "raw_put": [], "raw_get": []}
    try:
        for i, key in enumerate(keys):
            t_put = _timed(tier.put, key, chunk)
            t_raw_put = _timed(raw.put, i, chunk, blob)
            if i >= warmup:
                times["put"].append(t_put)
                times["raw_put"].append(t_raw_put)
        for i, key in enumerate(keys):
            if cold and isinstance(tier, SSDTier):
                drop_page_cache(tier.path_of(key))
                drop_page_cache(raw.path(i))
            t_get = _timed(tier.get, key)
            t_raw_get = _timed(raw.get, i)
            if i >= warmup:
                times["get"].append(t_get)
                times["raw_get"].append(t_raw_get)
        got = tier.get(keys[-1])
        if got is None or not torch.equal(got.kv, chunk.kv):
            raise RuntimeError(f"{kind} tier returned wrong data in the benchmark")
    finally:
        for key in keys:
            tier.delete(key)
        tier.close()
        raw.close()
    nbytes = len(blob)
    tier_put, tier_get = _summary(times["put"], nbytes), _summary(times["get"], nbytes)
    raw_put, raw_get = _summary(times["raw_put"], nbytes), _summary(times["raw_get"], nbytes)
    label = _lmcache_size(nbytes)
    ref = LMCACHE_REFERENCE[kind].get(label) if label else None
    ratio_put, ratio_get = tier_put["gbps"] / raw_put["gbps"], tier_get["gbps"] / raw_get["gbps"]
    return {
        "size": size,
        "bytes": nbytes,
        "tier": kind,
        "put": tier_put,
        "get": tier_get,
        "raw": {"put": raw_put, "get": raw_get},
        "ratio_put": ratio_put,
        "ratio_get": ratio_get,
        "floor": FLOOR,
        "floor_ok": bool(ratio_put >= FLOOR and ratio_get >= FLOOR),
        "lmcache": None if ref is None else {"put_gbps": ref[0], "get_gbps": ref[1]},
    }


def run(
    sizes: Sequence[str] = DEFAULT_SIZES,
    tiers: Sequence[str] = TIERS,
    iterations: int = 10,
    *,
    warmup: int = 2,
    redis_url: str | None = None,
    ssd_dir: str | None = None,
    fsync: str = "always",
    ssd_cache: str = "cold",
) -> dict[str, Any]:
    """Benchmark ``tiers`` on blobs of ``sizes``; starts a local redis-server when none is given."""
    unknown = [s for s in sizes if s not in SIZES] + [t for t in tiers if t not in TIERS]
    if unknown:
        raise ValueError(f"unknown sizes/tiers: {unknown}; sizes: {sorted(SIZES)}, tiers: {TIERS}")
    notes: list[str] = []
    results: list[dict[str, Any]] = []
    with ExitStack() as stack:
        if "redis" in tiers and redis_url is None:
            if redis_server_binary() is None:
                notes.append("redis skipped: redis-server not installed and no --redis-url")
                tiers = [t for t in tiers if t != "redis"]
            else:
                server = LocalRedis().start()
                stack.callback(server.cleanup)
                redis_url = server.url
        directory = ssd_dir or tempfile.mkdtemp(prefix="kvfuse-bench-ssd-")
        if ssd_dir is None:
            stack.callback(shutil.rmtree, directory, True)
        work = tempfile.mkdtemp(prefix="run-", dir=directory)
        stack.callback(shutil.rmtree, work, True)
        where = {"ssd_dir": work, "fsync": fsync, "redis_url": redis_url}
        for size in sizes:
            for kind in tiers:
                cold = ssd_cache == "cold"
                results.append(bench_one(kind, size, SIZES[size], iterations, warmup, cold, **where))
    return {
        "meta": {
            "iterations": iterations,
            "warmup": warmup,
            "fsync": fsync,
            "ssd_cache": ssd_cache,
            "ssd_dir": ssd_dir or "(temp dir)",
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "notes": notes,
        },
        "lmcache_reference": {k: {s: list(v) for s, v in d.items()} for k, d in LMCACHE_REFERENCE.items()},
        "results": results,
    }


def render(report: dict[str, Any]) -> None:
    """Print the results as a rich table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="kvfuse store tiers vs raw medium (GB/s; latency ms p50/p99)")
    for col in (
        "size",
        "tier",
        "put",
        "raw put",
        "×raw",
        "get",
        "raw get",
        "×raw",
        "put ms",
        "get ms",
        "LMCache",
    ):
        table.add_column(col, justify="right" if col not in ("size", "tier") else "left")

    def ok(x: float) -> str:
        return f"[green]{x:.2f}[/]" if x >= FLOOR else f"[red]{x:.2f}[/]"

    for r in report["results"]:
        lm = r["lmcache"]
        table.add_row(
            f"{r['size']} ({r['bytes'] / 1e6:.1f} MB)",
            r["tier"],
            f"{r['put']['gbps']:.2f}",
            f"{r['raw']['put']['gbps']:.2f}",
            ok(r["ratio_put"]),
            f"{r['get']['gbps']:.2f}",
            f"{r['raw']['get']['gbps']:.2f}",
            ok(r["ratio_get"]),
            f"{r['put']['p50_ms']:.1f}/{r['put']['p99_ms']:.1f}",
            f"{r['get']['p50_ms']:.1f}/{r['get']['p99_ms']:.1f}",
            "-" if lm is None else f"{lm['put_gbps']}/{lm['get_gbps']}",
        )
    console = Console(width=max(150, shutil.get_terminal_size().columns))
    console.print(table)
    console.print(
        "CPU tier get is zero-copy (returns the stored tensors); raw CPU = tensor clone. "
        "LMCache column: LocalCPU / LocalDisk / native RESP client (its redis-py connector: "
        "1.16/0.61 | 0.62/0.34)."
    )
    for note in report["meta"]["notes"]:
        console.print(f"note: {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvfuse bench store", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(DEFAULT_SIZES), help=f"comma list of {sorted(SIZES)}")
    parser.add_argument("--tiers", default=",".join(TIERS), help="comma list of cpu,ssd,redis")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--redis-url", default=None, help="benchmark this server (default: start one)")
    parser.add_argument("--ssd-dir", default=None, help="directory on the disk to test (default: a temp dir)")
    parser.add_argument("--fsync", choices=("always", "never"), default="always")
    parser.add_argument(
        "--ssd-cache",
        choices=("cold", "warm"),
        default="cold",
        help="cold: SSD reads start with the file dropped from the page cache (reads hit the device)",
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--quick", action="store_true", help="tiny blobs, 3 iterations (smoke test)")
    args = parser.parse_args(argv)
    sizes = list(QUICK_SIZES) if args.quick else args.sizes.split(",")
    iterations, warmup = (3, 1) if args.quick else (args.iterations, args.warmup)
    report = run(
        sizes,
        args.tiers.split(","),
        iterations,
        warmup=warmup,
        redis_url=args.redis_url,
        ssd_dir=args.ssd_dir,
        fsync=args.fsync,
        ssd_cache=args.ssd_cache,
    )
    render(report)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
