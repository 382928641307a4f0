"""Store configuration and the tiers it builds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kvstore.hostmem import cuda_available
from kvstore.tiers.base import Tier
from kvstore.tiers.eviction import EVICTION_POLICIES
from kvstore.tiers.ssd import FsyncPolicy

WriteMode = Literal["write-through", "write-back"]
WRITE_MODES: tuple[str, ...] = ("write-through", "write-back")


def _default_device() -> str | None:
    return "cuda" if cuda_available() else None


@dataclass(frozen=True)
class StoreConfig:
    """Which tiers a :class:`~kvstore.store.TieredStore` has, top (fastest) first: device, CPU, SSD, Redis.

    A tier is off when its size is 0 (device, CPU) or its location is ``None`` (SSD, Redis). The top tier is
    always written; a lower tier in ``"write-through"`` mode gets every put (and holds everything above
    it), in ``"write-back"`` mode only what the tier above evicts (demotion).
    """

    device_bytes: int = 0
    device: str | None = field(default_factory=_default_device)
    cpu_bytes: int = 2 << 30
    ssd_dir: str | None = None
    ssd_bytes: int = 32 << 30
    ssd_fsync: FsyncPolicy = "always"
    redis_url: str | None = None
    redis_cluster: bool = False
    redis_bytes: int = 8 << 30
    redis_ttl_s: float | None = None
    redis_namespace: str = "default"
    redis_key_prefix: str = "kvfuse"
    redis_stripe_bytes: int = 2 << 20
    redis_io_threads: int = 4
    redis_connect_timeout_s: float = 0.5
    redis_timeout_s: float = 5.0
    eviction: str = "lru"
    cpu_write: WriteMode = "write-through"
    ssd_write: WriteMode = "write-through"
    redis_write: WriteMode = "write-through"
    retry_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    prefetch_workers: int = 2

    def __post_init__(self) -> None:
        for name in ("device_bytes", "cpu_bytes", "ssd_bytes", "redis_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("cpu_write", "ssd_write", "redis_write"):
            if getattr(self, name) not in WRITE_MODES:
                raise ValueError(f"{name} must be one of {WRITE_MODES}, got {getattr(self, name)!r}")
        if self.eviction not in EVICTION_POLICIES:
            raise ValueError(f"unknown eviction policy {self.eviction!r}; known: {sorted(EVICTION_POLICIES)}")
        if self.ssd_fsync not in ("always", "never"):
            raise ValueError("ssd_fsync must be 'always' or 'never'")
        if self.device_bytes and self.device and self.device.startswith("cuda") and not cuda_available():
            raise ValueError("device tier requested on CUDA but CUDA is not available")
        if self.retry_backoff_s <= 0 or self.prefetch_workers < 1:
            raise ValueError("retry_backoff_s must be > 0 and prefetch_workers >= 1")

    def build_tiers(self) -> tuple[list[Tier], list[WriteMode]]:
        """Instantiate the configured tiers (top first) and their write modes."""
        from kvstore.tiers.memory import MemoryTier
        from kvstore.tiers.redis_tier import RedisTier
        from kvstore.tiers.ssd import SSDTier

        tiers: list[Tier] = []
        modes: list[WriteMode] = []
        if self.device_bytes > 0 and self.device:
            tiers.append(MemoryTier(self.device_bytes, device=self.device, policy=self.eviction))
            modes.append("write-through")
        if self.cpu_bytes > 0:
            tiers.append(MemoryTier(self.cpu_bytes, device="cpu", policy=self.eviction))
            modes.append(self.cpu_write)
        if self.ssd_dir is not None:
            tiers.append(SSDTier(self.ssd_dir, self.ssd_bytes, fsync=self.ssd_fsync, policy=self.eviction))
            modes.append(self.ssd_write)
        if self.redis_url is not None:
            tiers.append(
                RedisTier(
                    self.redis_url,
                    self.redis_bytes,
                    cluster=self.redis_cluster,
                    namespace=self.redis_namespace,
                    key_prefix=self.redis_key_prefix,
                    ttl_s=self.redis_ttl_s,
                    stripe_bytes=self.redis_stripe_bytes,
                    io_threads=self.redis_io_threads,
                    connect_timeout_s=self.redis_connect_timeout_s,
                    timeout_s=self.redis_timeout_s,
                    policy=self.eviction,
                )
            )
            modes.append(self.redis_write)
        if not tiers:
            raise ValueError("no tier configured: set cpu_bytes, device_bytes, ssd_dir or redis_url")
        return tiers, modes
