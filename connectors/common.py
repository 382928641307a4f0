"""Shared by the engine adapters: opening the kvfuse store, and the model identity and dtype keys carry."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from blending.fused import FusedKV
from kvstore import StoreConfig, TieredStore
from kvstore.chunk import SUPPORTED_DTYPES, dtype_name

FINGERPRINT_PARAM = "kvfuse_fingerprint"
_DTYPE_ALIASES = {"half": "float16", "fp16": "float16", "bf16": "bfloat16", "float": "float32", "fp32": "float32"}


def open_store(extra: Mapping[str, Any], store: TieredStore | None = None) -> tuple[TieredStore, bool]:
    """``store`` if given, else a TieredStore built from ``extra["kvfuse_store"]`` (StoreConfig fields);
    returns it and whether the caller owns it (and must close it)."""
    if store is not None:
        return store, False
    return TieredStore.from_config(StoreConfig(**dict(extra.get("kvfuse_store", {})))), True


def model_identity(fingerprint: str | None, model_name: str) -> str:
    """The model identity engine-page keys are derived from (the ``fingerprint`` of their key space).

    kvfuse's weight fingerprint (``blending.model.model_fingerprint``, given to a connector as
    ``kvfuse_fingerprint`` and to an export as ``fingerprint=``) when known. Engines expose only a model name
    or path, so without it the identity falls back to ``"name:<model_name>"``: two different weights served
    under one name would then share KV. Both sides (the export and the engine's connector) must use the same.
    """
    if fingerprint:
        return str(fingerprint)
    if not model_name:
        raise ValueError(f"no model identity: give {FINGERPRINT_PARAM} (kvfuse's weight fingerprint) or a model name")
    return f"name:{model_name}"


def parse_kv_dtype(value: Any) -> torch.dtype:
    """A KV dtype from a torch dtype or a name (``"bfloat16"``, ``"torch.float16"``, ``"half"``, ...);
    ValueError for anything kvfuse does not store (fp8 KV caches included)."""
    if isinstance(value, torch.dtype):
        dtype_name(value)  # raises for unsupported dtypes
        return value
    name = str(value).removeprefix("torch.").lower()
    name = _DTYPE_ALIASES.get(name, name)
    if name not in SUPPORTED_DTYPES:
        raise ValueError(f"kvfuse stores {sorted(SUPPORTED_DTYPES)} KV, not {value!r}")
    return SUPPORTED_DTYPES[name]


def is_exact(fused: FusedKV) -> bool:
    """Whether ``fused`` equals a dense prefill's KV: no token reused or recomputed by blending (every token
    computed, or an exact prefix hit)."""
    s = fused.stats
    return s.reused_tokens == 0 and s.recomputed_tokens == 0 and s.exact_tokens + s.computed_tokens == s.total_tokens
