"""The fair model lock: round-robin across tenants, FIFO within one, yielding between chunks, deadlines."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from blending.scheduler import FairLock, QueueTimeout, RequestContext, current_queue_s, tenant


def _wait_until(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


def _queue(lock: FairLock, name: str, label: str, order: list[str]) -> threading.Thread:
    """Start a thread that takes one turn as tenant ``name``; returns once it is queued."""
    before = lock.waiting()

    def run() -> None:
        with tenant(name), lock:
            order.append(label)

    thread = threading.Thread(target=run)
    thread.start()
    # queued, or already past the queue: a turn handed to an earlier waiter can take the count back down
    # between two polls (seen once on a busy machine)
    _wait_until(lambda: lock.waiting() > before or label in order)
    return thread


def test_round_robin_across_tenants_fifo_within() -> None:
    lock, order = FairLock(), []
    with lock:
        threads = [_queue(lock, label[0], label, order) for label in ("a1", "a2", "a3", "b1", "c1", "b2")]
    for t in threads:
        t.join(5)
    assert order == ["a1", "b1", "c1", "a2", "b2", "a3"]


def test_yield_turn_lets_another_tenant_run_between_chunks() -> None:
    lock, order = FairLock(), []
    queued = threading.Event()

    def long_request() -> None:
        with tenant("alice"), lock:
            for i in range(4):
                order.append(f"alice-{i}")
                if i == 1:
                    queued.set()
                    _wait_until(lambda: lock.waiting() == 2)  # bob and alice's second request
                lock.yield_turn()

    worker = threading.Thread(target=long_request)
    worker.start()
    queued.wait(5)
    bob = _queue(lock, "bob", "bob", order)
    alice2 = _queue(lock, "alice", "alice-next", order)
    for t in (worker, bob, alice2):
        t.join(5)
    # bob runs at alice's next yield; alice's own next request waits for the running one (FIFO)
    assert order == ["alice-0", "alice-1", "bob", "alice-2", "alice-3", "alice-next"]
    assert lock.yields == 1


def test_yield_turn_keeps_the_turn_without_other_tenants() -> None:
    lock, order = FairLock(), []
    with tenant("alice"), lock:
        assert lock.yield_turn() is False  # nobody waits
        waiter = _queue(lock, "alice", "alice-2", order)
        assert lock.yield_turn() is False  # only its own tenant waits: FIFO, keep going
        assert order == []
    waiter.join(5)
    assert order == ["alice-2"]
    assert lock.yield_turn() is False  # not held: nothing to do


def test_deadline_refuses_a_request_that_cannot_start() -> None:
    lock = FairLock()
    errors: list[BaseException] = []

    def late() -> None:
        try:
            with tenant("bob", deadline_s=0.2), lock:
                pass
        except QueueTimeout as exc:
            errors.append(exc)

    with tenant("alice"), lock:
        t0 = time.monotonic()
        thread = threading.Thread(target=late)
        thread.start()
        thread.join(5)
        assert 0.15 < time.monotonic() - t0 < 3.0
    assert len(errors) == 1 and "busy" in str(errors[0]) and lock.timeouts == 1
    assert lock.waiting() == 0 and not lock.locked()  # the timed-out waiter left no trace
    with tenant("bob", deadline_s=0.2), lock:  # and the lock still works
        assert lock.holder() == "bob"


def test_a_started_request_is_not_cut_off_and_reports_queue_time() -> None:
    lock = FairLock()
    ctx = RequestContext("bob", deadline_s=0.2)
    released = threading.Event()
    got: list[float] = []

    def holder(hold_s: float) -> None:
        with tenant("alice"), lock:
            released.wait(5)
            time.sleep(hold_s)

    def bob() -> None:
        with ctx.active():
            with lock:
                got.append(current_queue_s())
            released.clear()
            second = threading.Thread(target=holder, args=(0.4,))
            second.start()
            _wait_until(lock.locked)
            released.set()
            with lock:  # started: waits past the deadline instead of failing
                pass
            second.join(5)

    first = threading.Thread(target=holder, args=(0.1,))
    first.start()
    _wait_until(lock.locked)
    worker = threading.Thread(target=bob)
    worker.start()
    _wait_until(lambda: lock.waiting() == 1)
    released.set()
    worker.join(10)
    first.join(5)
    assert ctx.queue_s is not None and 0.05 < ctx.queue_s < 0.2 and got == [ctx.queue_s]
    assert ctx.waited_s >= ctx.queue_s + 0.3


def test_reentrant_and_exclusive_under_load() -> None:
    lock, inside, seen = FairLock(), [0], []

    def worker(name: str) -> None:
        with tenant(name):
            for _ in range(20):
                with lock, lock:  # reentrant
                    for _ in range(2):  # two "chunks" with a turn offered between them
                        inside[0] += 1
                        seen.append(inside[0])
                        time.sleep(0.0005)
                        inside[0] -= 1
                        lock.yield_turn()

    threads = [threading.Thread(target=worker, args=(f"t{i % 3}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert set(seen) == {1} and len(seen) == 240 and not lock.locked() and lock.waiting() == 0
    assert lock.yields > 0
    with pytest.raises(RuntimeError):
        lock.release()
