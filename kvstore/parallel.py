"""Work shared between the calling thread and a few helper threads, without ever waiting for a helper to start.

Why not ``pool.map``: on a small machine whose other cores are busy, a helper thread may not run for a
whole time slice, and a caller blocked on it would wait that long for work it could have done itself. Here
the caller takes items too, from the same range (it from the front, helpers from the back); it waits only
for items a helper has already begun, each bounded by one item's work. A helper that starts after the caller
took everything finds nothing to do.
Useful for work that releases the GIL (hashing, file reads, copies) in pieces of about a millisecond.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the CPUs this process may run on (affinity, cpusets)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


HELPERS = max(1, min(3, _usable_cpus() - 1))
_tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()  # a C queue: a put costs ~1 us
_started: list[threading.Thread] = []
_start_lock = threading.Lock()


def _reset_after_fork() -> None:
    """A forked child has none of the parent's threads: start helpers afresh (tasks queued in the parent,
    which hold its callers' buffers, are dropped with the old queue)."""
    global _tasks, _start_lock
    _tasks, _start_lock = queue.SimpleQueue(), threading.Lock()
    _started.clear()


os.register_at_fork(after_in_child=_reset_after_fork)


def _helper_loop() -> None:
    while True:
        _tasks.get()()


def _submit(task: Callable[[], None]) -> None:
    """Run ``task`` on a helper thread (started on first use; daemons, so they never hold up exit)."""
    if len(_started) < HELPERS:
        with _start_lock:
            while len(_started) < HELPERS:
                t = threading.Thread(target=_helper_loop, name=f"kvstore-share_{len(_started)}", daemon=True)
                t.start()
                _started.append(t)
    _tasks.put(task)


class _Shared:
    """The state of one :func:`share_work` call. The caller takes items from the front and helpers from the
    back, so that each works through a contiguous run (neighbouring file ranges, neighbouring memory)."""

    def __init__(self, n: int, fn: Callable[[int], object]) -> None:
        self.fn: Callable[[int], object] | None = fn
        self.front, self.back = 0, n  # items [front, back) are not claimed yet
        self.results: list[object] = [None] * n
        self.error: BaseException | None = None
        self.pending = n
        self.lock = threading.Lock()
        self.done = threading.Condition(self.lock)

    def finish(self) -> None:
        """Wait until no item is in progress, skipping those not begun: afterwards no helper touches what
        ``fn`` refers to (a task still queued for a helper keeps this object, but not ``fn`` or results)."""
        interrupted: BaseException | None = None
        with self.done:
            self.pending -= self.back - self.front  # not begun: never will be (only after an interruption)
            self.front = self.back
            while self.pending:
                try:
                    self.done.wait()
                except BaseException as exc:  # e.g. KeyboardInterrupt: still wait, then raise it
                    interrupted = interrupted or exc
            self.fn = None
        if interrupted is not None:
            raise interrupted

    def _claim(self, from_front: bool) -> int | None:
        with self.lock:
            if self.front >= self.back:
                return None
            if from_front:
                self.front += 1
                return self.front - 1
            self.back -= 1
            return self.back

    def work(self, from_front: bool = False) -> None:
        while (i := self._claim(from_front)) is not None:
            try:
                if self.error is None and self.fn is not None:
                    self.results[i] = self.fn(i)
            except BaseException as exc:  # handed to the caller, which re-raises it
                self.error = self.error or exc
            with self.done:
                self.pending -= 1
                if not self.pending:
                    self.done.notify_all()


def share_work(n: int, fn: Callable[[int], T], helpers: int = HELPERS) -> list[T]:
    """``[fn(0), ..., fn(n - 1)]``, computed by this thread and up to ``helpers`` helper threads.

    The first exception raised by ``fn`` is re-raised here (the items not yet begun are then skipped). Safe
    to nest and to call from pool threads: the caller never waits for a helper that has not begun an item.
    """
    if n <= 1 or helpers <= 0:
        return [fn(i) for i in range(n)]
    state = _Shared(n, fn)
    try:
        for _ in range(min(helpers, HELPERS, n - 1)):
            _submit(state.work)
        state.work(from_front=True)
    finally:
        state.finish()
    results, state.results = state.results, []
    error, state.error = state.error, None  # its traceback holds fn's frames: not left with a queued task
    if error is not None:
        raise error
    return results  # type: ignore[return-value]
