"""Real redis-server fixtures (a pytest plugin, loaded by tests/conftest.py).

- ``redis_server`` (session): one server on a free loopback port; ``.url``, ``.port``, ``.kill()``,
  ``.restart()`` (same port). Stopped at the end of the session.
- ``redis_url`` (function): the server's URL after ``FLUSHALL`` (the server is restarted first if a test
  left it dead).
- ``redis_cluster`` (session): three masters, no replicas, ``cluster_state:ok``; ``.url``, ``.ports``.

Skipped with a clear reason when ``redis-server`` is not installed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from kvstore.redis_local import LocalRedis, LocalRedisCluster, redis_server_binary

_MISSING = "redis-server is not installed (apt-get install redis-server)"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedis]:
    if redis_server_binary() is None:
        pytest.skip(_MISSING)
    server = LocalRedis().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def redis_url(redis_server: LocalRedis) -> str:
    if not redis_server.running:
        redis_server.restart()
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    if redis_server_binary() is None:
        pytest.skip(_MISSING)
    cluster = LocalRedisCluster()
    try:
        yield cluster.start()
    finally:
        cluster.cleanup()
