"""A fair model lock: FIFO within a tenant, round-robin across tenants, bounded waits.

The engine serializes model execution with one lock (``Engine.model_lock``). A plain mutex lets one
tenant's long prefill or scoring run hold the model for many seconds while another tenant's two-token
chat waits behind it (head-of-line blocking). :class:`FairLock` is a drop-in replacement
(``with engine.model_lock:``) that

- hands the lock over in **round-robin order across tenants** and **FIFO order within a tenant**;
- lets a holder call :meth:`FairLock.yield_turn` between chunks of a long computation: when a request of
  another tenant waits, the holder steps aside (its tenant goes to the back of the round), the other
  request runs one turn, and the holder resumes where it was;
- bounds the wait of a request that has not started yet: a :class:`RequestContext` with a deadline whose
  first acquisition is still waiting at the deadline raises :class:`QueueTimeout` (the service answers 503
  with ``Retry-After``). Once a request holds the lock once it is started, and its later waits (decode
  steps, turns given back after :meth:`~FairLock.yield_turn`) are not cut off: round-robin bounds them.

The current request is a context variable: the service wraps each blocking call of a request in
``with tenant(name, deadline_s=...):`` (or ``with ctx.active():`` to reuse one context), so the lock knows
whose turn it hands out without any change to the engine's call sites. Code outside any context (library
use, background work) is the tenant ``""``.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from types import TracebackType

DEFAULT_CHUNK_TOKENS = 64  # measured: docs/reliability.md, "Fair scheduling"
BACKGROUND = ""  # the tenant of work done outside any request context


class QueueTimeout(TimeoutError):
    """A request waited for the model longer than its deadline before it could start."""

    def __init__(self, tenant: str, waited_s: float, waiting: int) -> None:
        super().__init__(
            f"the model is busy: waited {waited_s:.1f} s for a turn ({waiting} requests waiting); retry later"
        )
        self.tenant, self.waited_s, self.waiting = tenant, waited_s, waiting


@dataclass
class RequestContext:
    """One request as the scheduler sees it: its tenant, its start deadline and its queue time.

    ``deadline_s``: how long the request may wait, from ``arrival``, for its first turn (None: no limit).
    ``queue_s``: how long its first acquisition waited (set once it got the lock); ``waited_s``: all waits.
    """

    tenant: str = BACKGROUND
    deadline_s: float | None = None
    arrival: float = field(default_factory=time.monotonic)
    queue_s: float | None = None
    waited_s: float = 0.0

    @property
    def started(self) -> bool:
        return self.queue_s is not None

    def deadline(self) -> float | None:
        """Absolute (``time.monotonic``) deadline of the next wait, or None once started / without one."""
        if self.started or self.deadline_s is None:
            return None
        return self.arrival + self.deadline_s

    @contextmanager
    def active(self) -> Iterator[RequestContext]:
        """Make this the current request of the calling thread / task for the ``with`` block."""
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar("kvfuse_request", default=None)


def current() -> RequestContext | None:
    """The calling code's request context (None outside any)."""
    return _current.get()


def tenant(name: str, deadline_s: float | None = None) -> AbstractContextManager[RequestContext]:
    """``with tenant("alice", deadline_s=30):`` run the block as a new request of tenant ``name``."""
    return RequestContext(name, deadline_s).active()


def current_queue_s() -> float:
    """Queue time of the current request's first turn (0.0 outside a context or before it started)."""
    ctx = _current.get()
    return 0.0 if ctx is None or ctx.queue_s is None else ctx.queue_s


@dataclass(eq=False)
class _Waiter:
    tenant: str
    thread: int
    depth: int = 1
    granted: bool = False
    event: threading.Event = field(default_factory=threading.Event)


class FairLock:
    """Round-robin-across-tenants, FIFO-within-a-tenant, reentrant lock (see the module docstring).

    ``chunk_tokens``: how many tokens long computations (dense prefill, teacher-forced scoring) run
    between two :meth:`yield_turn` calls.
    """

    def __init__(self, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> None:
        if chunk_tokens < 1:
            raise ValueError("chunk_tokens must be at least 1")
        self.chunk_tokens = chunk_tokens
        self._mutex = threading.Lock()
        self._queues: dict[str, deque[_Waiter]] = {}
        self._ring: deque[str] = deque()  # tenants with waiters, in turn order
        self._owner: int | None = None
        self._owner_tenant = BACKGROUND
        self._depth = 0
        self.grants = 0  # turns handed out (tests, metrics)
        self.yields = 0  # times a holder stepped aside
        self.timeouts = 0

    # -- the lock protocol ------------------------------------------------------------------------------
    def acquire(self) -> bool:
        """Wait for this request's turn; raises :class:`QueueTimeout` past the context's deadline."""
        ctx = _current.get()
        name = ctx.tenant if ctx is not None else BACKGROUND
        me = threading.get_ident()
        start = time.monotonic()
        with self._mutex:
            if self._owner == me:
                self._depth += 1
                return True
            if self._owner is None and not self._ring:
                self._take(me, name, 1)
                waiter = None
            else:
                waiter = _Waiter(name, me)
                self._enqueue(waiter)
        if waiter is not None:
            self._wait(waiter, ctx.deadline() if ctx is not None else None, start)
        if ctx is not None:
            waited = time.monotonic() - start
            ctx.waited_s += waited
            if ctx.queue_s is None:
                ctx.queue_s = waited
        return True

    def release(self) -> None:
        with self._mutex:
            if self._owner != threading.get_ident():
                raise RuntimeError("release of a FairLock not held by this thread")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._grant_next()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def yield_turn(self) -> bool:
        """Called by the holder between chunks: when a request of another tenant waits, hand it the lock
        and wait for this request's next turn (no deadline: it has started). Returns whether it yielded.
        A call by a thread that does not hold the lock does nothing."""
        me = threading.get_ident()
        with self._mutex:
            if self._owner != me or not any(t != self._owner_tenant for t in self._ring):
                return False
            name = self._owner_tenant
            waiter = _Waiter(name, me, self._depth)
            self._queues.setdefault(name, deque()).appendleft(waiter)  # first again within its tenant
            if name in self._ring:
                self._ring.remove(name)
            self._ring.append(name)  # ... but its tenant goes to the back of the round
            self._owner, self._depth = None, 0
            self.yields += 1
            self._grant_next()
        start = time.monotonic()
        self._wait(waiter, None, start)
        ctx = _current.get()
        if ctx is not None:
            ctx.waited_s += time.monotonic() - start
        return True

    # -- introspection ------------------------------------------------------------------------------------
    def waiting(self) -> int:
        with self._mutex:
            return sum(len(q) for q in self._queues.values())

    def locked(self) -> bool:
        with self._mutex:
            return self._owner is not None

    def holder(self) -> str | None:
        """The tenant holding the lock (None when free)."""
        with self._mutex:
            return self._owner_tenant if self._owner is not None else None

    # -- internals (``_mutex`` held unless noted) ---------------------------------------------------------
    def _take(self, thread: int, name: str, depth: int) -> None:
        self._owner, self._owner_tenant, self._depth = thread, name, depth
        self.grants += 1

    def _enqueue(self, waiter: _Waiter) -> None:
        queue = self._queues.setdefault(waiter.tenant, deque())
        queue.append(waiter)
        if waiter.tenant not in self._ring:
            self._ring.append(waiter.tenant)

    def _grant_next(self) -> None:
        if not self._ring:
            return
        name = self._ring.popleft()
        queue = self._queues[name]
        waiter = queue.popleft()
        if queue:
            self._ring.append(name)
        else:
            del self._queues[name]
        self._take(waiter.thread, name, waiter.depth)
        waiter.granted = True
        waiter.event.set()

    def _wait(self, waiter: _Waiter, deadline: float | None, start: float) -> None:
        """Block (without ``_mutex``) until ``waiter`` is granted, or raise at ``deadline``."""
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if waiter.event.wait(timeout):
            return
        with self._mutex:
            if waiter.granted:  # granted just as the deadline passed: take it
                return
            queue = self._queues[waiter.tenant]
            queue.remove(waiter)
            if not queue:
                del self._queues[waiter.tenant]
                self._ring.remove(waiter.tenant)
            self.timeouts += 1
            waiting = sum(len(q) for q in self._queues.values())
        raise QueueTimeout(waiter.tenant, time.monotonic() - start, waiting)
