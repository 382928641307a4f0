"""Load and budgets: 32 concurrent clients for a bounded time mixing chat (blend and anchor mode), chunk
upload / download, warm-up and prefetch, while a sampler checks every few milliseconds that

- no tier holds more bytes than its budget (the CPU and Redis budgets are small, so they evict all along;
  the SSD tier holds everything, so every acknowledged upload must stay readable),
- the process RSS stays below its start plus a fixed allowance,
- the anchor pool stays within its entry and byte bounds.

The service has no admission control, so every request must succeed (no 429/503 are expected).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from blending.anchors import AnchorConfig
from blending.model import LoadedModel
from workloads.reliability.ops import PROMPTS, Ops, start_clients
from workloads.reliability.service import Harness, chat_body, running_service
from workloads.reliability.tally import Tally, ok_json

MIX = {"chat": 1.0, "anchor_chat": 1.0, "upload": 2.0, "download": 3.0, "warm": 0.3, "prefetch": 1.0}
ANCHORS = AnchorConfig(max_per_context=3, max_bytes=24 << 20)
RSS_ALLOWANCE = 1536 << 20


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``)."""
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Sampler(threading.Thread):
    def __init__(self, h: Harness, tally: Tally, rss_limit: int, period_s: float = 0.05) -> None:
        super().__init__(name="rel-sampler", daemon=True)
        self.h, self.tally, self.rss_limit, self.period_s = h, tally, rss_limit, period_s
        self.stop = threading.Event()
        self.samples = 0
        self.peak: dict[str, int] = {}

    def _peak(self, name: str, value: int) -> None:
        self.peak[name] = max(self.peak.get(name, 0), value)

    def run(self) -> None:
        pool = self.h.engine.anchor_pool
        while not self.stop.is_set():
            self.samples += 1
            for t in self.h.store.stats().tiers:
                self._peak(t.name, t.used_bytes)
                self.tally.check(t.used_bytes <= t.budget_bytes, "bound",
                                 f"tier {t.name}: {t.used_bytes} bytes over its budget {t.budget_bytes}")  # fmt: skip
            rss = rss_bytes()
            self._peak("rss", rss)
            self.tally.check(rss <= self.rss_limit, "bound", f"RSS {rss >> 20} MiB over {self.rss_limit >> 20} MiB")
            if pool is not None:
                stats: dict[str, Any] = pool.stats()
                self._peak("anchor_bytes", int(stats["used_bytes"]))
                self.tally.check(int(stats["used_bytes"]) <= ANCHORS.max_bytes, "bound", "anchor pool over its bytes")
                worst = max(pool.contexts().values(), default=0)
                self.tally.check(worst <= ANCHORS.max_per_context, "bound", f"{worst} anchors in one context")
            self.stop.wait(self.period_s)


def _learn_anchors(h: Harness, tally: Tally, rounds: int = 3) -> None:
    """Anchor-mode chats before the load: the first computes the segments' bases, the second learns anchors,
    the third reuses them; so under load the pool is used and updated, not just empty."""
    with h.client("alice") as c:
        for _ in range(rounds):
            for docs in PROMPTS:
                ok_json(tally, c.post("/v1/chat/completions", json=chat_body(docs, mode="anchor")))
                tally.requests += 1


def run_load(
    loaded: LoadedModel, root: Path, *, seconds: float = 20.0, clients: int = 32, redis_url: str | None = None
) -> Tally:
    tally = Tally(f"load: {clients} clients, {seconds:.0f} s")
    start = time.perf_counter()
    with running_service(
        loaded, root, cpu_bytes=12 << 20, ssd_bytes=1 << 30, redis_url=redis_url, redis_bytes=12 << 20, anchors=ANCHORS
    ) as h:
        ops = Ops(h, tally)
        ops.prepare(prompts=2)
        _learn_anchors(h, tally)
        limit = rss_bytes() + RSS_ALLOWANCE
        sampler = Sampler(h, tally, limit)
        sampler.start()
        stop = threading.Event()
        threads = start_clients(ops, clients, stop, MIX, seed_value=11)
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        h.wait_writebacks()
        sampler.stop.set()
        sampler.join()
        ops.verify_acked()
        stats = h.store.stats()
        evictions = {t.name: t.stats.evictions for t in stats.tiers}
        tally.notes = {
            **ops.counts,
            "samples": sampler.samples,
            "peak_mib": {k: round(v / 2**20, 1) for k, v in sampler.peak.items()},
            "budget_mib": {t.name: round(t.budget_bytes / 2**20, 1) for t in stats.tiers},
            "rss_limit_mib": limit >> 20,
            "evictions": evictions,
            "anchor_pool": h.engine.anchor_pool.stats() if h.engine.anchor_pool is not None else None,
        }
        tally.check(evictions.get("cpu", 0) > 0, "bound", "the CPU budget was never under pressure")
        if h.engine.anchor_pool is not None:
            added = int(h.engine.anchor_pool.stats()["added"])  # type: ignore[call-overload]
            tally.check(added > 0, "bound", "the anchor pool was never filled")
    tally.seconds = time.perf_counter() - start
    return tally
