"""Prometheus metrics (one registry per app) and the reuse totals behind ``GET /v1/stats``."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from blending.accounting import TOKEN_FIELDS
from blending.guard import FidelityGuard
from blending.scheduler import FairLock
from kvstore.store import TieredStore

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class StoreCollector(Collector):
    """Per-tier gauges read from ``store.stats()`` at scrape time."""

    def __init__(self, store: TieredStore, lock: FairLock | None = None, guard: FidelityGuard | None = None) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        fields = ("used_bytes", "budget_bytes", "hits", "misses", "evictions", "errors", "corrupt")
        families = {
            f: GaugeMetricFamily(f"kvfuse_store_{f}", f"store tier {f.replace('_', ' ')}", labels=["tier"])
            for f in fields
        }
        available = GaugeMetricFamily("kvfuse_store_available", "1 if the tier is serving", labels=["tier"])
        for tier in self.store.stats().as_dict()["tiers"]:
            for f in fields:
                families[f].add_metric([tier["name"]], float(tier.get(f, 0)))
            available.add_metric([tier["name"]], 1.0 if tier["available"] else 0.0)
        yield from families.values()
        yield available


class SchedulerCollector(Collector):
    """The fair model lock at scrape time: requests waiting for the model, turns refused at the deadline."""

    def __init__(self, lock: FairLock) -> None:
        self.lock = lock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        waiting = GaugeMetricFamily("kvfuse_model_waiting", "requests waiting for a turn of the model")
        waiting.add_metric([], float(self.lock.waiting()))
        timeouts = GaugeMetricFamily("kvfuse_model_queue_timeouts", "requests refused (503) at their deadline")
        timeouts.add_metric([], float(self.lock.timeouts))
        yields = GaugeMetricFamily("kvfuse_model_yields", "turns a long computation gave to another tenant")
        yields.add_metric([], float(self.lock.yields))
        yield from (waiting, timeouts, yields)


class GuardCollector(Collector):
    """The fidelity guard at scrape time: running share of kept answers and top-1 agreement with a dense
    re-run per mode (all tenants)."""

    def __init__(self, guard: FidelityGuard) -> None:
        self.guard = guard

    def collect(self) -> Iterator[GaugeMetricFamily]:
        kept = GaugeMetricFamily("kvfuse_guard_same_answer",
                                 "running share of sampled answers equal to a dense re-run's", labels=["mode"])
        agreement = GaugeMetricFamily("kvfuse_guard_agreement", "running top-1 agreement with a dense re-run",
                                      labels=["mode"])
        samples = GaugeMetricFamily("kvfuse_guard_samples", "sampled requests in the running agreement",
                                    labels=["mode"])
        for mode, row in sorted(self.guard.snapshot().items()):
            kept.add_metric([mode], float(row["same_answer"]))
            agreement.add_metric([mode], float(row["agreement"]))
            samples.add_metric([mode], float(row["samples"]))
        yield from (kept, agreement, samples)


@dataclass
class ReuseTotals:
    """Running totals over answered prompts; ``ttft_saved_ms`` is estimated against a dense prefill at
    the measured dense cost per prompt token (an exponential moving average of TTFT minus queue time)."""

    requests: int = 0
    prompt_tokens: int = 0
    exact_tokens: int = 0
    reused_tokens: int = 0
    recomputed_tokens: int = 0
    computed_tokens: int = 0
    cached_tokens: int = 0
    dense_fallbacks: int = 0
    ttft_ms_total: float = 0.0
    queue_ms_total: float = 0.0
    ttft_saved_ms: float = 0.0
    dense_ms_per_token: float | None = None
    _reuse_ttft_ms: float = 0.0
    _reuse_tokens: int = 0

    def add(self, s: dict[str, Any], requested: str) -> None:
        self.requests += 1
        for f in (*TOKEN_FIELDS, "cached_tokens"):
            setattr(self, f, getattr(self, f) + int(s[f]))
        queue = float(s.get("queue_ms", 0.0))
        self.ttft_ms_total += float(s["ttft_ms"])
        self.queue_ms_total += queue
        ttft = float(s["ttft_ms"]) - queue  # the work, not the wait
        if s["mode"] == "dense":
            self.dense_fallbacks += requested != "dense"
            per_token = ttft / max(1, int(s["prompt_tokens"]))
            old = self.dense_ms_per_token
            self.dense_ms_per_token = per_token if old is None else 0.8 * old + 0.2 * per_token
        elif int(s["cached_tokens"]):
            self._reuse_ttft_ms += ttft
            self._reuse_tokens += int(s["prompt_tokens"])
        if self.dense_ms_per_token is not None:
            self.ttft_saved_ms = self.dense_ms_per_token * self._reuse_tokens - self._reuse_ttft_ms

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        out["reuse_rate"] = self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
        if self.dense_ms_per_token is None:
            out["ttft_saved_ms"] = None
        return out


class Metrics:
    """The service's Prometheus metrics plus reuse totals (thread-safe)."""

    def __init__(self, store: TieredStore, lock: FairLock | None = None, guard: FidelityGuard | None = None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kvfuse_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "kvfuse_ttft_seconds",
            "server-side TTFT by mode",
            ["mode"],
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter("kvfuse_prompt_tokens", "prompt tokens", registry=self.registry)
        self.cached_tokens = Counter("kvfuse_cached_tokens", "prompt tokens from cache", registry=self.registry)
        self.recomputed_tokens = Counter("kvfuse_recomputed_tokens", "cached tokens recomputed", registry=self.registry)
        self.fallbacks = Counter("kvfuse_dense_fallbacks", "dense fallbacks", registry=self.registry)
        self.queue = Histogram(
            "kvfuse_queue_seconds",
            "time a request waited for the model before its prefill ran",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(StoreCollector(store))
        if lock is not None:
            self.registry.register(SchedulerCollector(lock))
        if guard is not None:
            self.registry.register(GuardCollector(guard))
        self.totals = ReuseTotals()
        self.by_tenant: dict[str, ReuseTotals] = {}
        self._lock = threading.Lock()

    def observe_prefill(self, summary: dict[str, Any], requested: str, tenant: str) -> None:
        self.ttft.labels(mode=str(summary["mode"])).observe(float(summary["ttft_ms"]) / 1000)
        self.queue.observe(float(summary.get("queue_ms", 0.0)) / 1000)
        self.prompt_tokens.inc(int(summary["prompt_tokens"]))
        self.cached_tokens.inc(int(summary["cached_tokens"]))
        self.recomputed_tokens.inc(int(summary["recomputed_tokens"]))
        if summary["fallback_reason"] and summary["mode"] == "dense":
            self.fallbacks.inc()
        with self._lock:
            self.totals.add(summary, requested)
            self.by_tenant.setdefault(tenant, ReuseTotals()).add(summary, requested)

    def totals_dict(self, tenant: str | None = None) -> dict[str, Any]:
        """Reuse totals of one tenant, or of the whole service (None)."""
        with self._lock:
            return (self.totals if tenant is None else self.by_tenant.get(tenant, ReuseTotals())).as_dict()
