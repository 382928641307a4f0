"""Shared by the engine adapters: opening the kvfuse store an engine plugin writes to."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvstore import StoreConfig, TieredStore


def open_store(extra: Mapping[str, Any], store: TieredStore | None = None) -> tuple[TieredStore, bool]:
    """``store`` if given, else a TieredStore built from ``extra["kvfuse_store"]`` (StoreConfig fields);
    returns it and whether the caller owns it (and must close it)."""
    if store is not None:
        return store, False
    return TieredStore.from_config(StoreConfig(**dict(extra.get("kvfuse_store", {})))), True
