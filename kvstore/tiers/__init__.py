"""Storage tiers: the :class:`Tier` contract, eviction policies, stats and the four implementations."""

from kvstore.tiers.base import Evicted, Tier
from kvstore.tiers.eviction import (
    EVICTION_POLICIES,
    EvictionPolicy,
    FIFOPolicy,
    LFUPolicy,
    LRUPolicy,
    make_policy,
    register_policy,
)
from kvstore.tiers.memory import MemoryTier
from kvstore.tiers.redis_tier import RedisTier
from kvstore.tiers.ssd import SSDTier
from kvstore.tiers.stats import LatencyHistogram, TierStats

__all__ = [
    "EVICTION_POLICIES",
    "Evicted",
    "EvictionPolicy",
    "FIFOPolicy",
    "LFUPolicy",
    "LRUPolicy",
    "LatencyHistogram",
    "MemoryTier",
    "RedisTier",
    "SSDTier",
    "Tier",
    "TierStats",
    "make_policy",
    "register_policy",
]
