"""Content-addressed, tiered chunk-KV store: keys, codec, tiers (device, CPU, SSD, Redis), TieredStore."""

from kvstore.chunk import SUPPORTED_DTYPES, KVChunk, dtype_name
from kvstore.codec import BlobHeader, decode, encode, peek_header, verify
from kvstore.config import StoreConfig, WriteMode
from kvstore.errors import (
    ChecksumError,
    CodecError,
    FingerprintMismatchError,
    MalformedBlobError,
    TierError,
    TierUnavailableError,
    TruncatedBlobError,
    UnsupportedVersionError,
)
from kvstore.keys import ChunkKey, KeySpace
from kvstore.store import TieredStore
from kvstore.store_stats import StoreStats, TierReport
from kvstore.tiers import (
    EVICTION_POLICIES,
    EvictionPolicy,
    LatencyHistogram,
    MemoryTier,
    RedisTier,
    SSDTier,
    Tier,
    TierStats,
    make_policy,
    register_policy,
)

__all__ = [
    "EVICTION_POLICIES",
    "SUPPORTED_DTYPES",
    "BlobHeader",
    "ChecksumError",
    "ChunkKey",
    "CodecError",
    "EvictionPolicy",
    "FingerprintMismatchError",
    "KVChunk",
    "KeySpace",
    "LatencyHistogram",
    "MalformedBlobError",
    "MemoryTier",
    "RedisTier",
    "SSDTier",
    "StoreConfig",
    "StoreStats",
    "Tier",
    "TierError",
    "TierReport",
    "TierStats",
    "TierUnavailableError",
    "TieredStore",
    "TruncatedBlobError",
    "UnsupportedVersionError",
    "WriteMode",
    "decode",
    "dtype_name",
    "encode",
    "make_policy",
    "peek_header",
    "register_policy",
    "verify",
]
