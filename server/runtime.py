"""Building the engine and its store from :class:`~server.config.Settings` (``kvfuse serve`` / ``warm``)."""

from __future__ import annotations

import logging

import torch

from blending.engine import Engine, EngineConfig
from blending.model import ModelSpec, load_model
from kvstore import StoreConfig, TieredStore
from server.config import Settings


def configure_logging(level: str) -> None:
    """Plain one-line log records on stderr (the access log lines are JSON objects)."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


def store_config(settings: Settings) -> StoreConfig:
    """CPU tier, SSD tier under ``<data_dir>/kv`` (unless ``ssd_bytes`` is 0), Redis when configured."""
    return StoreConfig(
        cpu_bytes=settings.cpu_bytes,
        ssd_dir=str(settings.data_dir / "kv") if settings.ssd_bytes > 0 else None,
        ssd_bytes=settings.ssd_bytes,
        redis_url=settings.redis_url,
        redis_cluster=settings.redis_cluster,
    )


def build_engine(settings: Settings) -> Engine:
    """Load the model (raises ``ModelLoadError``) and open the store."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    spec = ModelSpec(settings.model, settings.gguf_file, settings.dtype, settings.device)
    loaded = load_model(spec)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = TieredStore.from_config(store_config(settings))
    return Engine(loaded, store, EngineConfig(max_prompt_tokens=settings.limits.max_prompt_tokens))
