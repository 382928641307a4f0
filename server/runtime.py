"""Building the engine and its store from :class:`~server.config.Settings` (``kvfuse serve`` / ``warm``)."""

from __future__ import annotations

import logging

import torch

from blending.engine import Engine, EngineConfig
from blending.fidelity import calibrate_in_background
from blending.guard import GuardConfig
from blending.model import ModelSpec, load_model
from blending.policy import PolicyConfig
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


class StartupError(RuntimeError):
    """The service cannot start with these settings and this environment; one line for the operator."""


def check_redis(settings: Settings, timeout_s: float = 3.0) -> None:
    """Refuse to start when the configured Redis does not answer a PING (a typo in the URL or a server that
    is down would otherwise only show as skipped-tier warnings on the first requests)."""
    if settings.redis_url is None:
        return
    import redis
    from redis.cluster import RedisCluster

    url = settings.redis_url
    kwargs = {"socket_connect_timeout": timeout_s, "socket_timeout": timeout_s}
    try:
        client = RedisCluster.from_url(url, **kwargs) if settings.redis_cluster else redis.Redis.from_url(url, **kwargs)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # RedisError, RedisClusterException (not a RedisError), OSError, a bad URL
        kind = "Redis cluster" if settings.redis_cluster else "Redis"
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise StartupError(f"cannot reach {kind} at {url}: {reason}") from None


def build_engine(settings: Settings) -> Engine:
    """Check Redis (raises :class:`StartupError`), load the model (raises ``ModelLoadError``), open the
    store."""
    check_redis(settings)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    spec = ModelSpec(settings.model, settings.gguf_file, settings.dtype, settings.device)
    loaded = load_model(spec)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        store = TieredStore.from_config(store_config(settings))
    except Exception as exc:  # e.g. a cluster that went away since the check
        raise StartupError(f"cannot open the store: {type(exc).__name__}: {' '.join(str(exc).split())}") from None
    config = EngineConfig(max_prompt_tokens=settings.limits.max_prompt_tokens,
                          policy=PolicyConfig(fidelity_target=settings.fidelity_target),
                          guard=GuardConfig(sample_rate=settings.guard_sample_rate))
    engine = Engine(loaded, store, config)
    if settings.auto_calibrate:
        engine.on_uncalibrated = calibrate_in_background
    return engine
