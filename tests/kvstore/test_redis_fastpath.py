"""The zero-copy GET path: reply parsing edge cases and fallbacks."""

from __future__ import annotations

import socket

import pytest
import redis

from kvstore.tiers.redis_client import make_client
from kvstore.tiers.redis_fastpath import _Fallback, _read_reply_into, get_into


def _reply(data: bytes, dest_size: int) -> tuple[bool, bytes]:
    a, b = socket.socketpair()
    try:
        a.sendall(data)
        dest = bytearray(dest_size)
        ok = _read_reply_into(b, memoryview(dest))
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(1)  # the whole reply was consumed, nothing more
        return ok, bytes(dest)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("size", [0, 1, 5, 40, 100, 5000])
def test_bulk_reply_sizes(size: int) -> None:
    value = bytes(range(256)) * (size // 256 + 1)
    value = value[:size]
    ok, got = _reply(b"$%d\r\n%s\r\n" % (size, value), size)
    assert ok and got == value


def test_nil_and_errors() -> None:
    assert _reply(b"$-1\r\n", 10)[0] is False
    with pytest.raises(_Fallback):
        _reply(b"-MOVED 1234 127.0.0.1:7000\r\n", 10)
    with pytest.raises(_Fallback):
        _reply(b"$3\r\nabc\r\n", 10)  # size mismatch: let the slow path decide


def test_against_server(redis_url: str) -> None:
    client = make_client(redis_url, cluster=False, connect_timeout_s=0.5, timeout_s=2, max_connections=4)
    raw = redis.Redis.from_url(redis_url)
    raw.set(b"k", b"x" * 100_000)
    dest = bytearray(100_000)
    assert get_into(client, b"k", memoryview(dest)) and dest == b"x" * 100_000
    assert get_into(client, b"missing", memoryview(bytearray(4))) is False
    assert get_into(client, b"k", memoryview(bytearray(5))) is False  # wrong size
    raw.lpush(b"list", b"a")
    with pytest.raises(redis.exceptions.ResponseError):  # WRONGTYPE via the ordinary path
        get_into(client, b"list", memoryview(bytearray(1)))
    assert client.ping()  # the connection pool is still healthy
    client.close()
