"""Store tier benchmark: put/get throughput and latency per tier, against the raw medium and (optionally)
LMCache, all measured side by side in the same run.

For each blob size and tier, every iteration runs the tier's ``put``/``get``, the plain medium moving
the same bytes (``memcpy`` into / out of warm memory for CPU; a file write / read with the same fsync
policy for SSD; plain redis-py ``SET``/``GET`` for Redis) and, with ``--peer lmcache`` where LMCache is
importable, LMCache's matching backend through its own ``StorageManager`` (see
:mod:`workloads.bench_store_lmcache`), on the same blobs, directory and redis-server; the three take turns
at going first, so that none always follows the same one. Ratios:
``ratio_vs_raw`` (tier / raw medium) and ``ratio_vs_lmcache`` (tier / LMCache). Without LMCache there is
no peer column: no number is shown that was not measured in this run.

For SSD and Redis it also prefetches the stored blobs into a CPU tier above (``TieredStore.prefetch``)
and reports the CPU-tier get that follows.

    kvfuse bench store [--quick] [--peer lmcache] [--json out.json] [--redis-url URL] [--ssd-dir DIR]
    python -m workloads.bench_store ...   (the same command)
"""

from __future__ import annotations

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
import torch

from kvstore import KeySpace, KVChunk, MemoryTier, RedisTier, SSDTier, Tier, TieredStore
from kvstore.codec import encode
from kvstore.redis_local import LocalRedis, redis_server_binary
from kvstore.tiers.ssd import FsyncPolicy
from workloads import bench_store_lmcache as peer_mod
from workloads.bench_store_raw import RawMedium, drop_page_cache
from workloads.cli import Steps, bench_table, run_bench


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
DEFAULT_SIZES = ("smollm2-135m-bf16", "llama3-8b-bf16")
QUICK_SIZES = ("tiny-fp32", "small-bf16")
TIERS = ("cpu", "ssd", "redis")
PEERS = ("none", "lmcache")
FLOOR = 0.8  # tier throughput must be >= FLOOR x raw medium


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


def _timed(fn: Callable[..., object], *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


_Op = tuple[str, Callable[..., object], tuple[Any, ...]]


def _rotated(ops: list[_Op], i: int, times: dict[str, list[float]] | None) -> None:
    """Time ``ops`` in turn, starting with the ``i``-th (mod their number): no side always runs right after
    the same other one, whose traffic leaves the caches (and, on a small machine, the cores) in a state that
    would favour or cost whatever follows, every time."""
    k = i % len(ops)
    for name, fn, args in ops[k:] + ops[:k]:
        t = _timed(fn, *args)
        if times is not None:
            times[name].append(t)


def _make_tier(
    kind: str, nbytes: int, iterations: int, *, ssd_dir: str, fsync: str, redis_url: str | None
) -> Tier:
    budget = (iterations + 4) * (nbytes + (1 << 20))
    if kind == "cpu":
        return MemoryTier(budget, prefault=True)  # a pre-allocated pool, faulted in before timing
    if kind == "ssd":
        return SSDTier(os.path.join(ssd_dir, "tier"), budget, fsync=cast(FsyncPolicy, fsync), prefault=True)
    assert redis_url is not None  # read buffers faulted in before timing, as in a server that has run a while
    return RedisTier(redis_url, budget, namespace=f"bench-{uuid.uuid4().hex[:8]}", prefault=True)


def _make_peer(kind: str, shape: BlobShape, count: int, peer: str, **where: Any) -> peer_mod.LMCachePeer | None:
    if peer != "lmcache":
        return None
    variant = peer_mod.BACKENDS[kind][0]
    peer_dir = os.path.join(where["ssd_dir"], "lmcache")
    os.makedirs(peer_dir, exist_ok=True)
    return peer_mod.LMCachePeer(kind, variant, shape, count=count, ssd_dir=peer_dir, redis_url=where["redis_url"])


def _prefetch(tier: Tier, keys: list[Any], nbytes: int, budget: int) -> dict[str, Any]:
    """Prefetch ``keys`` from ``tier`` into a CPU tier above it, then time the CPU-tier gets."""
    store = TieredStore([MemoryTier(budget, prefault=True), tier])
    t_prefetch = [_timed(lambda k=k: store.prefetch([k]).result()) for k in keys]
    t_get = [_timed(store.get, k) for k in keys]
    got = store.get(keys[-1])
    if got is None or store.tiers[0].get(keys[-1]) is None:
        raise RuntimeError("prefetch did not promote into the CPU tier")
    return {"prefetch": _summary(t_prefetch, nbytes), "cpu_get": _summary(t_get, nbytes), "_store": store}


def _ratio(a: dict[str, float], b: dict[str, float]) -> float:
    return a["gbps"] / b["gbps"]


def bench_one(
    kind: str, size: str, shape: BlobShape, iterations: int, warmup: int, cold: bool, peer: str = "none",
    **where: Any,
) -> dict[str, Any]:
    """Interleaved tier / raw medium / peer timings for one tier and blob size.

    ``cold``: SSD reads (tier, raw and peer alike) start with the file evicted from the page cache.
    """
    chunk = make_chunk(shape)
    blob = encode(chunk)
    n = iterations + warmup
    keys = [KeySpace("bench", size).chunk_key([i]) for i in range(n)]
    tier = _make_tier(kind, len(blob), n, **where)
    raw = RawMedium(kind, len(blob), **where)
    lmc = _make_peer(kind, shape, n, peer, **where)
    src = chunk.kv.contiguous()
    out = torch.empty_like(src)
    names = ("put", "get", "raw_put", "raw_get", "peer_put", "peer_get")
    times: dict[str, list[float]] = {name: [] for name in names}
    store: TieredStore | None = None
    prefetch: dict[str, Any] | None = None
    try:
        for i in range(n):
            raw.prepare(i, len(blob))
        for i, key in enumerate(keys):
            puts: list[_Op] = [("put", tier.put, (key, chunk)), ("raw_put", raw.put, (i, blob))]
            if lmc is not None:
                puts.append(("peer_put", lmc.put, (i, src)))
            _rotated(puts, i, times if i >= warmup else None)
        for i, key in enumerate(keys):
            if cold and isinstance(tier, SSDTier):
                drop_page_cache(tier.path_of(key))
                drop_page_cache(raw.path(i))
                if lmc is not None:
                    drop_page_cache(lmc.backend._key_to_path(lmc.key(i)))
            gets: list[_Op] = [("get", tier.get, (key,)), ("raw_get", raw.get, (i,))]
            if lmc is not None:
                gets.append(("peer_get", lmc.get, (i, out)))
            _rotated(gets, i, times if i >= warmup else None)
        got = tier.get(keys[-1])
        if got is None or not torch.equal(got.kv, chunk.kv):
            raise RuntimeError(f"{kind} tier returned wrong data in the benchmark")
        if lmc is not None and not torch.equal(out, src):
            raise RuntimeError(f"LMCache {lmc.location} returned wrong data in the benchmark")
        if kind != "cpu":
            prefetch = _prefetch(tier, keys[warmup:], len(blob), (n + 4) * (len(blob) + (1 << 20)))
            store = prefetch.pop("_store")
    finally:
        for key in keys:
            tier.delete(key)
        (store or tier).close()
        raw.close()
        if lmc is not None:
            lmc.close()
    nbytes = len(blob)
    s = {name: _summary(t, nbytes) for name, t in times.items() if t}
    vs_raw = {"put": _ratio(s["put"], s["raw_put"]), "get": _ratio(s["get"], s["raw_get"])}
    result: dict[str, Any] = {
        "size": size,
        "bytes": nbytes,
        "tier": kind,
        "put": s["put"],
        "get": s["get"],
        "zero_copy_get": kind == "cpu",
        "raw": {"put": s["raw_put"], "get": s["raw_get"]},
        "ratio_vs_raw": vs_raw,
        "floor": FLOOR,
        "floor_ok": bool(vs_raw["put"] >= FLOOR and vs_raw["get"] >= FLOOR),
        "prefetch": prefetch,
        "lmcache": None,
        "ratio_vs_lmcache": None,
    }
    if lmc is not None:
        result["lmcache"] = {"backend": lmc.location, "put": s["peer_put"], "get": s["peer_get"]}
        result["ratio_vs_lmcache"] = {"put": _ratio(s["put"], s["peer_put"]), "get": _ratio(s["get"], s["peer_get"])}
    return result


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
    peer: str = "none",
    steps: Steps | None = None,
    repeat: int = 1,
) -> dict[str, Any]:
    """Benchmark ``tiers`` on blobs of ``sizes``; starts a local redis-server when none is given; ``steps``
    follows the (size, tier) runs. ``repeat`` > 1: that many rounds over every size and tier, each result
    then the median of its rounds (see :func:`_combine`), so that one noisy round does not decide."""
    steps = steps or Steps()
    if repeat < 1:
        raise ValueError("repeat must be >= 1")
    unknown = [s for s in sizes if s not in SIZES] + [t for t in tiers if t not in TIERS]
    if unknown or peer not in PEERS:
        raise ValueError(f"unknown sizes/tiers/peer: {unknown or peer}; sizes: {sorted(SIZES)}, tiers: {TIERS}")
    notes: list[str] = []
    peer_version: str | None = None
    if peer == "lmcache":
        if peer_mod.available():
            peer_version = f"lmcache {peer_mod.version()}"
        else:
            notes.append("no peer column: LMCache is not importable (scripts/test-lmcache.sh builds a venv with it)")
            peer = "none"
    rounds: dict[tuple[str, str], list[dict[str, Any]]] = {}
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
        steps.begin(repeat * len(sizes) * len(tiers))
        for n in range(repeat):
            for size, kind in ((size, kind) for size in sizes for kind in tiers):
                steps.now(f"{size} {kind}" + (f" ({n + 1}/{repeat})" if repeat > 1 else ""))
                cold = ssd_cache == "cold"
                got = bench_one(kind, size, SIZES[size], iterations, warmup, cold, peer, **where)
                rounds.setdefault((size, kind), []).append(got)
                steps.done()
    results = [runs[0] if len(runs) == 1 else _combine(runs) for runs in rounds.values()]
    if peer_version and fsync == "always":
        notes.append("LMCache never fsyncs: compare SSD with --fsync never for the same durability")
    return {
        "meta": {
            "iterations": iterations,
            "warmup": warmup,
            "repeat": repeat,
            "fsync": fsync,
            "ssd_cache": ssd_cache,
            "ssd_dir": ssd_dir or "(temp dir)",
            "peer": peer_version,
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "notes": notes,
        },
        "results": results,
    }


def _median_of(values: list[Any]) -> Any:
    """Field by field median of equally shaped values (numbers, and dicts of them); anything else, or
    values all equal: the first."""
    first = values[0]
    if isinstance(first, dict):
        return {k: _median_of([v[k] for v in values]) for k in first}
    if isinstance(first, float | int) and not isinstance(first, bool) and any(v != first for v in values):
        return float(np.median(values))
    return first


def _combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from rounds of the same tier and size: the median of every figure, each ratio the median
    of the rounds' ratios (not a ratio of medians); the rounds' ratios are kept under ``rounds``."""
    out: dict[str, Any] = _median_of(runs)
    out["floor_ok"] = bool(out["ratio_vs_raw"]["put"] >= FLOOR and out["ratio_vs_raw"]["get"] >= FLOOR)
    out["rounds"] = [{k: r[k] for k in ("ratio_vs_raw", "ratio_vs_lmcache")} for r in runs]
    return out


def _gbps(side: dict[str, float]) -> str:
    return f"{side['gbps']:.2f}"


def _ratio_cell(x: float, floor: float) -> str:
    return f"[green]{x:.2f}[/]" if x >= floor else f"[red]{x:.2f}[/]"


_SHORT = {"LocalCPUBackend": "CPU", "LocalDiskBackend": "disk", "RemoteBackend": "RESP"}  # fits 80 columns


def render(report: dict[str, Any], console: Any = None) -> None:
    """Print the results as rich tables that fit 80 columns: throughput against the raw medium, latency
    and prefetch, and (with a measured peer) against LMCache."""
    from rich.console import Console

    console = console or Console()
    results, peer = report["results"], report["meta"]["peer"]
    sizes = {r["size"]: f"{r['bytes'] / 1e6:.1f} MB" for r in results}
    put_get = ["put", "raw put", "×raw", "get", "raw get", "×raw"]
    tput = bench_table("kvfuse store tiers vs the raw medium, GB/s", "size", ["tier", *put_get], labels=2)
    lat = bench_table("latency, ms; prefetch into a CPU tier then CPU get, GB/s", "size",
                      ["tier", "put p50/p99", "get p50/p99", "prefetch → get"], labels=2)
    vs_peer = bench_table(f"store tiers vs {peer}, GB/s", "size", ["tier", "LMCache", *put_get[:1],
                          "LMCache put", "×LMC", "get", "LMCache get", "×LMC"], labels=2)
    for r in results:
        label, zc = (r["size"], r["tier"]), "*" if r["zero_copy_get"] else ""
        ratio, raw = r["ratio_vs_raw"], r["raw"]
        tput.add_row(*label, _gbps(r["put"]), _gbps(raw["put"]), _ratio_cell(ratio["put"], FLOOR),
                     _gbps(r["get"]) + zc, _gbps(raw["get"]), _ratio_cell(ratio["get"], FLOOR))
        pf = r["prefetch"]
        lat.add_row(*label, *(f"{r[op]['p50_ms']:.1f}/{r[op]['p99_ms']:.1f}" for op in ("put", "get")),
                    "-" if pf is None else f"{_gbps(pf['prefetch'])} → {pf['cpu_get']['gbps']:.0f}")
        if peer:
            lm, vs = r["lmcache"], r["ratio_vs_lmcache"]
            vs_peer.add_row(*label, _SHORT.get(lm["backend"], lm["backend"]), _gbps(r["put"]), _gbps(lm["put"]),
                            _ratio_cell(vs["put"], 1.0),
                            _gbps(r["get"]) + zc, _gbps(lm["get"]), _ratio_cell(vs["get"], 1.0))
    for table in (tput, lat, vs_peer) if peer else (tput, lat):
        console.print(table)
    console.print("sizes: " + ", ".join(f"{name} = {mb}" for name, mb in sizes.items()) + f"; ×raw floor {FLOOR}")
    if report["meta"].get("repeat", 1) > 1:
        console.print(f"medians of {report['meta']['repeat']} rounds; each ratio: the median of the rounds' ratios")
    console.print(
        "* CPU tier get is zero-copy (returns views of its arena); raw CPU = memcpy into/out of warm memory. "
        "Prefetch: the blob promoted from SSD/Redis into a CPU tier, then that CPU-tier get."
    )
    if peer:
        console.print("LMCache: LocalCPU / LocalDisk / native RESP via its StorageManager, copy in and out included.")
    for note in report["meta"]["notes"]:
        console.print(f"note: {note}")


def main(argv: list[str] | None = None) -> int:
    """``python -m workloads.bench_store``: the ``kvfuse bench store`` command."""
    return run_bench("store", argv)


if __name__ == "__main__":
    raise SystemExit(main())
