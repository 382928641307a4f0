"""A point-in-time report of a TieredStore: per tier and totals, JSON-ready."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvstore.tiers.stats import TierStats


@dataclass(frozen=True)
class TierReport:
    """One tier's state and counters at snapshot time."""

    name: str
    kind: str
    available: bool
    used_bytes: int
    budget_bytes: int
    skipped: int
    last_error: str
    stats: TierStats

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "available": self.available,
            "used_bytes": self.used_bytes,
            "budget_bytes": self.budget_bytes,
            "skipped": self.skipped,
            "last_error": self.last_error,
        }
        out.update(self.stats.as_dict())
        return out


@dataclass(frozen=True)
class StoreStats:
    """Store-level request counters plus one :class:`TierReport` per tier (top first).

    ``gets`` counts keys asked for; ``hits`` keys found in any tier; ``puts`` keys written.
    """

    tiers: tuple[TierReport, ...]
    gets: int
    hits: int
    puts: int

    @property
    def misses(self) -> int:
        return self.gets - self.hits

    def tier(self, name: str) -> TierReport:
        for report in self.tiers:
            if report.name == name:
                return report
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        def total(attr: str) -> int:
            return sum(int(getattr(t.stats, attr)) for t in self.tiers)

        return {
            "tiers": [t.as_dict() for t in self.tiers],
            "totals": {
                "gets": self.gets,
                "hits": self.hits,
                "misses": self.misses,
                "hit_rate": self.hits / self.gets if self.gets else 0.0,
                "puts": self.puts,
                "used_bytes": sum(t.used_bytes for t in self.tiers),
                "budget_bytes": sum(t.budget_bytes for t in self.tiers),
                "evictions": total("evictions"),
                "errors": total("errors"),
                "corrupt": total("corrupt"),
            },
        }
