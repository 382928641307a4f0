"""Per-tier counters and fixed-bucket latency histograms (thread-safe, cheap)."""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Any

# Upper bounds in seconds; the last bucket is open-ended.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


@dataclass
class LatencyHistogram:
    """Counts of observations per fixed bucket; percentiles interpolate inside a bucket."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    count: int = 0
    total_s: float = 0.0
    max_s: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.count += 1
        self.total_s += seconds
        self.max_s = max(self.max_s, seconds)

    def percentile(self, q: float) -> float:
        """Approximate ``q``-quantile (0..1) in seconds; 0 when empty."""
        if not self.count:
            return 0.0
        rank = q * self.count
        seen = 0
        for i, c in enumerate(self.counts):
            if c and seen + c >= rank:
                lo = LATENCY_BUCKETS_S[i - 1] if i else 0.0
                hi = LATENCY_BUCKETS_S[i] if i < len(LATENCY_BUCKETS_S) else self.max_s
                hi = min(hi, self.max_s)
                return lo + (hi - lo) * max(0.0, rank - seen) / c
            seen += c
        return self.max_s

    def copy(self) -> LatencyHistogram:
        return LatencyHistogram(list(self.counts), self.count, self.total_s, self.max_s)

    def as_dict(self) -> dict[str, float]:
        ms = 1e3
        return {
            "count": self.count,
            "mean_ms": self.total_s / self.count * ms if self.count else 0.0,
            "p50_ms": self.percentile(0.5) * ms,
            "p90_ms": self.percentile(0.9) * ms,
            "p99_ms": self.percentile(0.99) * ms,
            "max_ms": self.max_s * ms,
        }


_COUNTERS = ("hits", "misses", "puts", "bytes_read", "bytes_written", "evictions", "errors", "corrupt")


@dataclass
class TierStats:
    """Counters of one tier. ``get``/``put`` latencies are per call (a batch call is one observation)."""

    hits: int = 0
    misses: int = 0
    puts: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    evictions: int = 0
    errors: int = 0
    corrupt: int = 0
    get_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    put_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        """Increment counters by name, e.g. ``stats.add(errors=1)``."""
        with self._lock:
            for name, n in counts.items():
                if name not in _COUNTERS:
                    raise AttributeError(f"no counter {name!r}")
                setattr(self, name, getattr(self, name) + n)

    def record_get(self, hits: int, misses: int, nbytes: int, seconds: float) -> None:
        with self._lock:
            self.hits += hits
            self.misses += misses
            self.bytes_read += nbytes
            self.get_latency.observe(seconds)

    def record_put(self, puts: int, nbytes: int, seconds: float) -> None:
        with self._lock:
            self.puts += puts
            self.bytes_written += nbytes
            self.put_latency.observe(seconds)

    def snapshot(self) -> TierStats:
        """A consistent copy, safe to read while the tier keeps working."""
        with self._lock:
            return TierStats(
                hits=self.hits,
                misses=self.misses,
                puts=self.puts,
                bytes_read=self.bytes_read,
                bytes_written=self.bytes_written,
                evictions=self.evictions,
                errors=self.errors,
                corrupt=self.corrupt,
                get_latency=self.get_latency.copy(),
                put_latency=self.put_latency.copy(),
            )

    def as_dict(self) -> dict[str, Any]:
        snap = self.snapshot()
        out: dict[str, Any] = {name: getattr(snap, name) for name in _COUNTERS}
        out["get_latency"] = snap.get_latency.as_dict()
        out["put_latency"] = snap.put_latency.as_dict()
        return out
