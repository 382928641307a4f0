"""Throwaway local ``redis-server`` processes (single node or 3-master cluster) for tests and benchmarks.

Servers listen on 127.0.0.1 only, persist nothing (``--save "" --appendonly no``) and live in a
temporary directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass, field

import redis


def redis_server_binary() -> str | None:
    """Path of ``redis-server`` or ``None`` when it is not installed."""
    return shutil.which("redis-server")


def free_port(also_free_offset: int = 0) -> int:
    """A currently free loopback TCP port (``port + also_free_offset`` free too when nonzero)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not also_free_offset:
            return port
        if port + also_free_offset < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + also_free_offset))
                    return port
                except OSError:
                    continue
    raise RuntimeError("no free port found")


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server left running when its owner is garbage-collected or the interpreter exits."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def _wait_ping(port: int, timeout_s: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server on port {port} exited with {proc.returncode}")
        try:
            if redis.Redis(port=port, socket_connect_timeout=0.2, socket_timeout=0.5).ping():
                return
        except redis.exceptions.RedisError:
            time.sleep(0.02)
    raise RuntimeError(f"redis-server on port {port} did not answer within {timeout_s}s")


@dataclass
class LocalRedis:
    """One redis-server process; ``kill()`` and ``restart()`` (same port) simulate outages."""

    port: int = 0
    extra_args: tuple[str, ...] = ()
    directory: str = ""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> LocalRedis:
        binary = redis_server_binary()
        if binary is None:
            raise FileNotFoundError("redis-server is not installed")
        if not self.port:
            self.port = free_port()
        if not self.directory:
            self.directory = tempfile.mkdtemp(prefix=f"kvfuse-redis-{self.port}-")
            weakref.finalize(self, shutil.rmtree, self.directory, True)
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", self.directory, "--logfile", os.path.join(self.directory, "redis.log")]
        self.proc = subprocess.Popen(
            [*args, *self.extra_args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        weakref.finalize(self, _terminate, self.proc)  # never leak a server, even on errors
        try:
            _wait_ping(self.port, 10.0, self.proc)
        except BaseException:
            _terminate(self.proc)
            raise
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """Stop the server abruptly (SIGKILL), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        """Start again on the same port (data is gone: nothing is persisted)."""
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class LocalRedisCluster:
    """Three masters, no replicas, slots spread by ``redis-cli --cluster create``."""

    nodes: list[LocalRedis] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def start(self, masters: int = 3, timeout_s: float = 30.0) -> LocalRedisCluster:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise FileNotFoundError("redis-cli is not installed")
        for _ in range(masters):
            port = free_port(also_free_offset=10000)
            conf = ("--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf")
            node = LocalRedis(port=port, extra_args=(*conf, "--cluster-node-timeout", "2000"))
            self.nodes.append(node.start())
        addrs = [f"127.0.0.1:{p}" for p in self.ports]
        subprocess.run(
            [cli, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=timeout_s,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = [redis.Redis(port=p).cluster("info").get("cluster_state") for p in self.ports]
            if all(s == "ok" for s in states):
                return self
            time.sleep(0.1)
        raise RuntimeError("redis cluster did not reach cluster_state:ok")

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()
