"""Service benchmark: blob GET/PUT throughput over loopback, chat TTFT (p50/p99) at 1, 8 and 32
concurrent clients, dense vs reuse, and head-of-line latency (one tenant's 2-token chats while another
tenant's long ``/v1/logprobs`` runs, against idle), in one run against an in-process server on a free
loopback port.

TTFT is measured by the client: from sending a streaming chat request to its first content event.
Each request carries ``--docs`` documents drawn from a warmed pool in a shuffled order, so reuse means
blending cached chunks at new positions (not a prefix hit). Dense requests neither read nor write the
cache. Targets: 1 MB blob GET >= 300 MB/s; a short chat beside a long request <= 10x its idle latency.

    kvfuse bench server [--quick] [--json out.json] [--clients 1,8,32] [--requests N]
                        [--long-tokens 3500] [--chunk-tokens 64]
    python -m workloads.bench_server ...   (the same command)
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import secrets
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import torch

from blending.engine import Engine
from blending.model import ModelSpec, load_model
from kvstore import KVChunk, StoreConfig, TieredStore
from kvstore.chunk import SUPPORTED_DTYPES
from kvstore.codec import encode
from server.app import create_app
from server.config import Limits, Settings
from server.embedded import BackgroundServer
from workloads.cli import Steps, bench_table, run_bench

TARGET_GET_MB_S = 300.0
TARGET_HOL_RATIO = 10.0  # a short request beside a long one, over its idle latency
HOL_KEYS = {"sk-long": "long-tenant", "sk-short": "short-tenant"}
_WORDS = ("river", "city", "market", "bridge", "garden", "station", "museum", "harbour", "tower", "school",
          "forest", "island", "valley", "village", "engineer", "baker", "teacher", "doctor", "sailor")  # fmt: skip


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))] if ordered else 0.0


def _latency(ms: Sequence[float]) -> dict[str, float]:
    return {"p50_ms": _pct(ms, 0.5), "p99_ms": _pct(ms, 0.99), "mean_ms": statistics.fmean(ms) if ms else 0.0}


def make_documents(n: int, words: int, seed: int = 0) -> list[str]:
    """``n`` distinct synthetic passages of about ``words`` words."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        body = " ".join(rng.choice(_WORDS) for _ in range(words))
        docs.append(f"Passage {i}: the {rng.choice(_WORDS)} report says {body}.")
    return docs


def _blob(engine: Engine, target_bytes: int) -> tuple[bytes, int]:
    m = re.fullmatch(r"l(\d+)h(\d+)d(\d+):(\w+)", engine.layout)
    assert m, engine.layout
    layers, heads, dim, dtype = int(m[1]), int(m[2]), int(m[3]), SUPPORTED_DTYPES[m[4]]
    per_token = layers * 2 * heads * dim * dtype.itemsize
    tokens = max(1, round(target_bytes / per_token))
    kv = torch.randn(layers, 2, heads, tokens, dim).to(dtype)
    blob = encode(KVChunk(kv, torch.arange(tokens), engine.fingerprint))
    return blob, tokens


class _BlobClient:
    """A keep-alive ``http.client`` connection: unlike httpx (pure-Python h11, ~250 MB/s by itself on
    1 MB bodies) it does not bound what the server can deliver."""

    def __init__(self, url: str) -> None:
        parsed = urlsplit(url)
        self.conn = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port, timeout=60)

    def request(self, method: str, key: str, body: bytes | None = None) -> bytes:
        headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
        self.conn.request(method, f"/v1/chunks/{key}", body=body, headers=headers)
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{method} /v1/chunks/{key}: HTTP {response.status}: {data[:200]!r}")
        return data


def bench_blobs(url: str, engine: Engine, size: int, iterations: int, clients: int = 4) -> dict[str, Any]:
    """PUT then GET ``iterations`` blobs of ``size`` bytes (one client), then GET with ``clients``."""
    blob, tokens = _blob(engine, size)
    keys = [secrets.token_hex(16) for _ in range(iterations)]
    times: dict[str, list[float]] = {"put": [], "get": []}
    client = _BlobClient(url)
    try:
        client.request("PUT", keys[0], blob)  # warm-up
        client.request("GET", keys[0])
        for op in ("PUT", "GET"):
            for key in keys:
                t0 = time.perf_counter()
                data = client.request(op, key, blob if op == "PUT" else None)
                times[op.lower()].append(time.perf_counter() - t0)
                assert op == "PUT" or len(data) == len(blob)
    finally:
        client.conn.close()

    def get_many(part: list[str]) -> list[float]:
        out, c = [], _BlobClient(url)
        try:
            for key in part:
                t0 = time.perf_counter()
                c.request("GET", key)
                out.append(time.perf_counter() - t0)
        finally:
            c.conn.close()
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        parallel = [t for ts in pool.map(get_many, [keys] * clients) for t in ts]
    wall = time.perf_counter() - t0

    def summary(ts: list[float], seconds: float) -> dict[str, float]:
        return {"mb_s": len(ts) * len(blob) / seconds / 1e6, **_latency([t * 1000 for t in ts]), "n": len(ts)}

    get = summary(times["get"], sum(times["get"]))
    return {
        "bytes": len(blob),
        "tokens": tokens,
        "put": summary(times["put"], sum(times["put"])),
        "get": get,
        "get_concurrent": {**summary(parallel, wall), "clients": clients},
        "target_get_mb_s": TARGET_GET_MB_S,
        "target_ok": bool(get["mb_s"] >= TARGET_GET_MB_S),
    }


def _stream_ttft(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    """Send one streaming chat request; client TTFT (ms) to the first content event, plus its kvfuse."""
    t0 = time.perf_counter()
    ttft: float | None = None
    info: dict[str, Any] = {}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if ttft is None and event["choices"][0]["delta"].get("content"):
                ttft = (time.perf_counter() - t0) * 1000
            info = event.get("kvfuse", info)
    return {
        "ttft_ms": ttft if ttft is not None else (time.perf_counter() - t0) * 1000,
        "server_ttft_ms": float(info.get("ttft_ms", 0.0)),
        "cached_tokens": int(info.get("cached_tokens", 0)),
        "prompt_tokens": int(info.get("prompt_tokens", 0)),
        "mode": str(info.get("mode")),
    }


def bench_chat(
    url: str, pool: list[str], clients: int, requests: int, mode: str, docs: int, seed: int
) -> dict[str, Any]:
    """``requests`` streaming chats, ``clients`` at a time, each with ``docs`` shuffled pool documents."""
    rng = random.Random(seed)
    bodies = [
        {"messages": [{"role": "user", "content": f"Summarise passage {rng.randrange(len(pool))} in a word."}],
         "documents": rng.sample(pool, docs), "max_tokens": 2, "temperature": 0, "stream": True,
         "kvfuse": {"mode": mode}}
        for _ in range(requests)
    ]  # fmt: skip

    def client_loop(mine: list[dict[str, Any]]) -> list[dict[str, Any]]:  # one client, one request at a time
        with httpx.Client(base_url=url, timeout=600) as client:
            return [_stream_ttft(client, body) for body in mine]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        results = [r for rs in ex.map(client_loop, [bodies[i::clients] for i in range(clients)]) for r in rs]
    wall = time.perf_counter() - t0
    ttfts = [r["ttft_ms"] for r in results]
    return {
        **_latency(ttfts),
        "server_ttft_p50_ms": _pct([r["server_ttft_ms"] for r in results], 0.5),
        "cached_tokens_mean": statistics.fmean(r["cached_tokens"] for r in results),
        "prompt_tokens_mean": statistics.fmean(r["prompt_tokens"] for r in results),
        "modes": sorted({r["mode"] for r in results}),
        "requests_per_s": len(results) / wall,
    }


def long_text(engine: Engine, tokens: int, seed: int = 1) -> str:
    """Synthetic prose of about ``tokens`` tokens."""
    rng = random.Random(seed)
    words: list[str] = []
    while len(engine.tokenize(" ".join(words))) < tokens:
        words += [rng.choice(_WORDS) for _ in range(max(16, (tokens - len(words)) // 2))]
    while len(words) > 1 and len(engine.tokenize(" ".join(words))) > tokens:
        words = words[: max(1, len(words) - max(1, len(words) // 50))]
    return " ".join(words)


def _short_chat(client: httpx.Client, i: int) -> float:
    """One 2-token dense chat (ms, client-measured, whole request)."""
    body = {"messages": [{"role": "user", "content": f"Say hello to visitor {i}."}], "max_tokens": 2,
            "temperature": 0, "kvfuse": {"mode": "dense"}}  # fmt: skip
    t0 = time.perf_counter()
    client.post("/v1/chat/completions", json=body).raise_for_status()
    return (time.perf_counter() - t0) * 1000


def bench_head_of_line(url: str, continuation: str, idle_requests: int) -> dict[str, Any]:
    """Short 2-token chats of one tenant: ``idle_requests`` alone, then back to back while another tenant's
    ``/v1/logprobs`` of ``continuation`` (dense) runs, until it ends (at least one)."""
    auth = {k: {"Authorization": f"Bearer {k}"} for k in HOL_KEYS}
    long_body = {"messages": [{"role": "user", "content": "Read this."}], "continuation": continuation,
                 "top_logprobs": 0, "kvfuse": {"mode": "dense"}}  # fmt: skip
    with httpx.Client(base_url=url, headers=auth["sk-short"], timeout=600) as short:
        _short_chat(short, -1)  # warm-up
        idle = [_short_chat(short, i) for i in range(idle_requests)]
        done: dict[str, float] = {}

        def run_long() -> None:
            with httpx.Client(base_url=url, headers=auth["sk-long"], timeout=600) as long_client:
                t0 = time.perf_counter()
                r = long_client.post("/v1/logprobs", json=long_body)
                r.raise_for_status()
                done["ms"] = (time.perf_counter() - t0) * 1000
                done["tokens"] = len(r.json()["tokens"])

        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(run_long)
            time.sleep(0.2)  # let the long request take the model
            busy: list[float] = []
            while not future.done() or not busy:
                busy.append(_short_chat(short, len(busy)))
            future.result()
    idle_p50 = _pct(idle, 0.5)
    ratio_p50, ratio_max = _pct(busy, 0.5) / idle_p50, max(busy) / idle_p50
    return {
        "idle": _latency(idle),
        "busy": {**_latency(busy), "max_ms": max(busy), "n": len(busy)},
        "long_ms": done["ms"],
        "long_tokens": int(done["tokens"]),
        "ratio_p50": ratio_p50,
        "ratio_max": ratio_max,
        "target_ratio": TARGET_HOL_RATIO,
        "target_ok": bool(ratio_max <= TARGET_HOL_RATIO),
    }


def run(
    clients: Sequence[int], requests: int | None, *, quick: bool, blob_bytes: int, blob_iters: int,
    docs: int, doc_words: int, pool_size: int, threads: int | None, long_tokens: int = 3500,
    chunk_tokens: int = 64, steps: Steps | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Start the service in-process, run the blob and chat benchmarks, stop it."""
    steps = steps or Steps()
    steps.begin(3 + 2 * len(clients))
    if threads:
        torch.set_num_threads(threads)
    loaded = load_model(ModelSpec())
    work = tempfile.mkdtemp(prefix="kvfuse-bench-server-")
    store = TieredStore.from_config(StoreConfig(cpu_bytes=2 << 30))
    try:
        engine = Engine(loaded, store)
        limits = Limits(max_body_bytes=max(64 << 20, 2 * blob_bytes), max_documents=max(64, pool_size))
        settings = Settings(data_dir=Path(work), limits=limits)
        with BackgroundServer(create_app(engine, settings)) as server:
            steps.now(f"blob PUT/GET x{blob_iters}")
            blobs = bench_blobs(server.url, engine, blob_bytes, blob_iters)
            steps.done()
            steps.now(f"warming {pool_size} documents")
            pool = make_documents(pool_size, doc_words)
            httpx.post(f"{server.url}/v1/chunks", json={"texts": pool}, timeout=600).raise_for_status()
            steps.done()
            chat = []
            for i, c in enumerate(clients):
                n = requests or (c if quick else max(8, c))
                row: dict[str, Any] = {"clients": c, "requests": n}
                for mode, label in (("dense", "dense"), ("auto", "reuse")):
                    steps.now(f"chat TTFT, {c} clients, {label}")
                    row[label] = bench_chat(server.url, pool, c, n, mode, docs, seed=i)
                    steps.done()
                row["ratio_p50"] = row["reuse"]["p50_ms"] / row["dense"]["p50_ms"]
                row["ratio_p99"] = row["reuse"]["p99_ms"] / row["dense"]["p99_ms"]
                chat.append(row)
        hol_limits = Limits(max_prompt_tokens=max(8192, long_tokens + 64), max_completion_tokens=16)
        hol_settings = Settings(data_dir=Path(work), limits=hol_limits, api_keys=HOL_KEYS,
                                prefill_chunk_tokens=chunk_tokens)  # fmt: skip
        steps.now("head-of-line: short chats beside a long request")
        with BackgroundServer(create_app(engine, hol_settings)) as server:
            hol = bench_head_of_line(server.url, long_text(engine, long_tokens), 3 if quick else 8)
            hol["chunk_tokens"] = chunk_tokens
        steps.done()
    finally:
        store.close()
        shutil.rmtree(work, ignore_errors=True)
    meta = {"model": loaded.name, "quick": quick, "docs_per_request": docs, "doc_words": doc_words,
            "pool": pool_size, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}  # fmt: skip
    return {"meta": meta, "blob": blobs, "chat": chat, "head_of_line": hol}


def print_report(report: dict[str, Any], console: Any = None) -> None:
    """Rich tables that fit 80 columns: blob throughput, TTFT per concurrency (dense vs reuse, ratio
    reuse/dense), and head-of-line latency."""
    from rich.console import Console

    console = console or Console()
    b = report["blob"]
    blob = bench_table(f"kvfuse server: {b['bytes'] / 1e6:.2f} MB blobs", "op", ["MB/s", "p50 ms", "p99 ms", "n"])
    for op in ("put", "get", "get_concurrent"):
        s = b[op]
        name = f"get x{s['clients']}" if op == "get_concurrent" else op
        blob.add_row(name, f"{s['mb_s']:.0f}", f"{s['p50_ms']:.2f}", f"{s['p99_ms']:.2f}", str(s["n"]))
    console.print(blob)
    ok = "[green]ok[/]" if b["target_ok"] else "[red]below target[/]"
    console.print(f"GET target >= {b['target_get_mb_s']:.0f} MB/s: {ok}")
    chat = bench_table("kvfuse server: chat TTFT (client-measured, ms)", "clients",
                       ["requests", "dense p50", "dense p99", "reuse p50", "reuse p99", "ratio p50", "ratio p99",
                        "cached tok", "prompt tok"], header_width=6)  # fmt: skip
    for r in report["chat"]:
        d, u = r["dense"], r["reuse"]
        chat.add_row(str(r["clients"]), str(r["requests"]), f"{d['p50_ms']:.0f}", f"{d['p99_ms']:.0f}",
                     f"{u['p50_ms']:.0f}", f"{u['p99_ms']:.0f}", f"{r['ratio_p50']:.2f}", f"{r['ratio_p99']:.2f}",
                     f"{u['cached_tokens_mean']:.0f}", f"{u['prompt_tokens_mean']:.0f}")  # fmt: skip
    console.print(chat)
    h = report["head_of_line"]
    title = (f"kvfuse server: 2-token chat beside another tenant's {h['long_tokens']}-token /v1/logprobs "
             f"({h['long_ms'] / 1000:.1f} s; chunks of {h['chunk_tokens']} tokens), ms")  # fmt: skip
    hol = bench_table(title, "", ["p50", "p99", "max", "n", "/ idle p50"])
    i, b = h["idle"], h["busy"]
    hol.add_row("idle", f"{i['p50_ms']:.0f}", f"{i['p99_ms']:.0f}", "", "", "1.0")
    hol.add_row("beside the long request", f"{b['p50_ms']:.0f}", f"{b['p99_ms']:.0f}", f"{b['max_ms']:.0f}",
                str(b["n"]), f"{h['ratio_p50']:.1f} (max {h['ratio_max']:.1f})")  # fmt: skip
    console.print(hol)
    ok = "[green]ok[/]" if h["target_ok"] else "[red]above target[/]"
    console.print(f"head-of-line target <= {h['target_ratio']:.0f}x idle (worst request): {ok}")


def main(argv: list[str] | None = None) -> int:
    """``python -m workloads.bench_server``: the ``kvfuse bench server`` command."""
    return run_bench("server", argv)


if __name__ == "__main__":
    raise SystemExit(main())
