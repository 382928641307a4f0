"""Per-tier health for the store: skip a failed tier, probe it again after a backoff, let it rejoin."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger("kvstore.store")


@dataclass
class TierHealth:
    """Availability state of one tier.

    After a failure that makes the tier unavailable it is skipped for ``base_backoff_s`` (doubling per
    consecutive failure, capped at ``max_backoff_s``); then exactly one call probes it. A success brings
    it back at once.
    """

    name: str
    base_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    available: bool = True
    failures: int = 0
    retry_at: float = 0.0
    skipped: int = 0
    last_error: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def usable(self) -> bool:
        """Whether to call the tier now (counts a skip when not)."""
        with self._lock:
            if self.available:
                return True
            now = time.monotonic()
            if now >= self.retry_at:
                self.retry_at = now + self._backoff()  # one probe; others keep skipping meanwhile
                return True
            self.skipped += 1
            return False

    def _backoff(self) -> float:
        return min(self.max_backoff_s, self.base_backoff_s * 2 ** min(max(self.failures - 1, 0), 16))

    def succeeded(self) -> None:
        if self.available:
            return
        with self._lock:
            if not self.available:
                log.warning("tier %s is back after %d failed attempt(s)", self.name, self.failures)
            self.available = True
            self.failures = 0

    def failed(self, reason: str, unavailable: bool) -> None:
        """Record a failure; ``unavailable`` takes the tier out until the backoff expires."""
        with self._lock:
            self.last_error = reason
            if not unavailable:
                log.warning("tier %s: operation failed: %s", self.name, reason)
                return
            self.failures += 1
            was = self.available
            self.available = False
            self.retry_at = time.monotonic() + self._backoff()
        if was:
            log.warning(
                "tier %s unavailable, skipping it (retry in %.2fs): %s", self.name, self._backoff(), reason
            )
        else:
            log.debug("tier %s still unavailable: %s", self.name, reason)
