"""Zero-copy bulk reads: ``GET`` a large value straight from the socket into a caller's buffer.

redis-py with hiredis copies a bulk reply about four times (socket buffer, hiredis buffer, the ``bytes``
object, then into the destination). Here a connection is borrowed from redis-py's own pool, the ``GET`` is
sent through it, and the reply is read with ``recv_into`` directly into the destination memory. Anything
unexpected (an error reply, a cluster redirect, a size mismatch) disconnects that connection or falls back to
the ordinary redis-py call, so the fast path never changes results, only speed.
"""

from __future__ import annotations

import logging
import socket
from typing import Any, cast

import numpy as np
import redis
from redis.cluster import RedisCluster

log = logging.getLogger(__name__)

_HEADER_READ = 64


class _Fallback(Exception):
    """Let the ordinary redis-py call handle this reply (redirects, unexpected replies)."""


def _pool_for(client: redis.Redis | RedisCluster, name: bytes) -> Any:
    if isinstance(client, RedisCluster):
        node = client.get_node_from_key(name)
        if node is None or node.redis_connection is None:
            raise _Fallback
        return node.redis_connection.connection_pool
    return client.connection_pool


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < view.nbytes:
        n = sock.recv_into(view[got:], view.nbytes - got)
        if n == 0:
            raise redis.exceptions.ConnectionError("server closed the connection")
        got += n


def _read_reply_into(sock: socket.socket, dest: memoryview) -> bool:
    """Read one ``GET`` reply; True when it filled ``dest`` exactly, False for a nil reply."""
    head = bytearray(_HEADER_READ)
    hv = memoryview(head)
    got = 0
    while True:
        n = sock.recv_into(hv[got:])
        if n == 0:
            raise redis.exceptions.ConnectionError("server closed the connection")
        got += n
        if head[0] != ord("$"):  # an error (e.g. a cluster redirect) or something unexpected
            raise _Fallback(bytes(head[:got]).decode(errors="replace"))
        end = head.find(b"\r\n", 0, got)
        if end >= 0:
            break
        if got == _HEADER_READ:
            raise redis.exceptions.InvalidResponse("reply header too long")
    size = int(head[1:end])
    if size < 0:
        if got != end + 2:
            raise redis.exceptions.InvalidResponse("trailing bytes after a nil reply")
        return False
    if size != dest.nbytes:
        raise _Fallback(f"value is {size} bytes, expected {dest.nbytes}")
    extra = hv[end + 2 : got]
    take = min(extra.nbytes, size)
    dest[:take] = extra[:take]
    _recv_exact(sock, dest[take:])
    trailer_have = extra.nbytes - take
    if trailer_have < 2:
        _recv_exact(sock, memoryview(bytearray(2 - trailer_have)))
    return True


def get_into(client: redis.Redis | RedisCluster, name: bytes, dest: memoryview) -> bool:
    """``GET name`` into ``dest`` (which must have exactly the value's size).

    Returns False when the key does not exist or its value has another size (``dest`` is then undefined).
    Raises redis-py exceptions on connection problems.
    """
    try:
        return _get_into_fast(client, name, dest)
    except _Fallback:
        value = cast(bytes | None, client.get(name))
        if value is None or len(value) != dest.nbytes:
            return False
        np.frombuffer(dest, dtype=np.uint8)[:] = np.frombuffer(value, dtype=np.uint8)
        return True


def _get_into_fast(client: redis.Redis | RedisCluster, name: bytes, dest: memoryview) -> bool:
    pool = _pool_for(client, name)
    for attempt in (0, 1):  # one retry: a pooled connection may have gone stale (server restarted)
        conn = pool.get_connection()
        done = False
        try:
            conn.send_command("GET", name)
            sock = getattr(conn, "_sock", None)
            if not isinstance(sock, socket.socket):
                raise _Fallback("connection has no plain socket")
            result = _read_reply_into(sock, dest)
            done = True
            return result
        except _Fallback:
            raise
        except (redis.exceptions.ConnectionError, ConnectionError) as exc:
            if attempt:
                raise redis.exceptions.ConnectionError(str(exc)) from exc
            pool.disconnect(inuse_connections=False)
        except OSError as exc:  # timeouts and socket errors
            raise redis.exceptions.ConnectionError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            if not done:
                conn.disconnect()
            pool.release(conn)
    raise AssertionError("unreachable")  # pragma: no cover
