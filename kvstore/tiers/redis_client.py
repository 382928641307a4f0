"""redis-py plumbing for the Redis tier: client construction, zero-copy sends, error translation."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.connection import PythonRespSerializer
from redis.retry import Retry

from kvstore.errors import TierError, TierUnavailableError
from kvstore.tiers.stats import TierStats

log = logging.getLogger(__name__)

RedisClient = redis.Redis | RedisCluster

_UNAVAILABLE: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.MaxConnectionsError,
    redis.exceptions.SlotNotCoveredError,
    OSError,
)


class _ZeroCopyPacker(PythonRespSerializer):
    """redis-py's pure-Python packer: memoryview and large arguments are sent as their own pieces,
    without the join/copy that the hiredis packer makes. Replies are still parsed by hiredis."""


def zero_copy_connection_class(base: type[Any]) -> type[Any]:
    """A subclass of a redis-py connection class whose commands are packed without copying values."""

    def _construct_command_packer(self: Any, packer: Any) -> Any:
        if packer is not None:
            return packer
        return _ZeroCopyPacker(self._buffer_cutoff, self.encoder.encode)

    return type(f"ZeroCopy{base.__name__}", (base,), {"_construct_command_packer": _construct_command_packer})


def make_client(
    url: str,
    *,
    cluster: bool,
    connect_timeout_s: float,
    timeout_s: float,
    max_connections: int,
    socket_read_size: int = 1 << 20,
) -> RedisClient:
    """A redis-py client (single server or cluster) with short timeouts and at most one quick retry.

    Responses stay bytes (``decode_responses=False``). The retry lets a pooled connection that went stale
    (server restarted) reconnect transparently; a server that is really down fails within the timeouts.
    """
    common: dict[str, Any] = {
        "socket_connect_timeout": connect_timeout_s,
        "socket_timeout": timeout_s,
        "socket_keepalive": True,
        "socket_read_size": socket_read_size,
        "max_connections": max_connections,
        "retry": Retry(NoBackoff(), 1),
    }
    if cluster:
        client = RedisCluster.from_url(
            url,
            connection_class=zero_copy_connection_class(redis.Connection),
            require_full_coverage=False,
            **common,
        )
        return client
    pool = redis.BlockingConnectionPool.from_url(url, timeout=timeout_s, **common)
    pool.connection_class = zero_copy_connection_class(pool.connection_class)
    return redis.Redis(connection_pool=pool)


def drop_idle_connections(client: RedisClient) -> None:
    """Forget pooled connections after an outage so the next call dials afresh (best effort)."""
    try:
        if isinstance(client, RedisCluster):
            for node in client.get_nodes():
                if node.redis_connection is not None:
                    node.redis_connection.connection_pool.disconnect(inuse_connections=False)
        else:
            client.connection_pool.disconnect(inuse_connections=False)
    except Exception:  # pragma: no cover - cleanup only
        log.debug("dropping idle redis connections failed", exc_info=True)


@contextlib.contextmanager
def translate_errors(client: RedisClient, what: str, stats: TierStats) -> Iterator[None]:
    """Map redis-py exceptions to :class:`TierUnavailableError` (cannot reach) or :class:`TierError`,
    counting them in ``stats.errors``."""
    try:
        yield
    except _UNAVAILABLE as exc:
        stats.add(errors=1)
        drop_idle_connections(client)
        raise TierUnavailableError(f"redis {what}: {type(exc).__name__}: {exc}") from exc
    except redis.exceptions.RedisError as exc:
        stats.add(errors=1)
        raise TierError(f"redis {what}: {type(exc).__name__}: {exc}") from exc
