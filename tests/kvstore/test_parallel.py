from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from kvstore import parallel
from kvstore.hostmem import copy_bytes
from kvstore.parallel import share_work


def test_results_in_order_and_work_shared() -> None:
    seen: set[str] = set()
    helper_came = threading.Event()
    caller = threading.current_thread()

    def fn(i: int) -> int:  # sleeps: real items release the GIL (reads, hashing), or one thread could take all
        time.sleep(0.001)
        seen.add(threading.current_thread().name)
        if threading.current_thread() is caller:
            helper_came.wait(timeout=10)  # the caller's first item waits until a helper took one
        else:
            helper_came.set()
        return i * i

    assert share_work(8, fn) == [i * i for i in range(8)]
    assert len(seen) == 2


def test_small_and_serial_calls() -> None:
    assert share_work(0, lambda i: i) == []
    assert share_work(1, lambda i: i + 1) == [1]
    names: set[str] = set()
    assert share_work(5, lambda i: names.add(threading.current_thread().name) or i, helpers=0) == list(range(5))
    assert names == {threading.current_thread().name}


def test_the_first_error_is_raised() -> None:
    def fn(i: int) -> int:
        if i == 3:
            raise ValueError("item 3")
        return i

    with pytest.raises(ValueError, match="item 3"):
        share_work(6, fn)


def test_never_waits_for_a_helper_that_does_not_start() -> None:
    release = threading.Event()
    finished = threading.Semaphore(0)

    def block() -> None:
        release.wait(30)
        finished.release()

    for _ in range(parallel.HELPERS):  # every helper is busy
        parallel._submit(block)
    try:
        done: list[list[int]] = []
        worker = threading.Thread(target=lambda: done.append(share_work(10, lambda i: i)))
        worker.start()
        worker.join(timeout=10)
        assert done == [list(range(10))]  # finished by the caller alone while no helper could run
    finally:
        release.set()
        for _ in range(parallel.HELPERS):
            assert finished.acquire(timeout=10)


@pytest.mark.parametrize("nbytes", [0, 1, (2 << 20) - 1, 2 << 20, (5 << 20) + 12345])
def test_copy_bytes(nbytes: int) -> None:
    src = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    copy_bytes(dst, src)
    assert np.array_equal(dst, src)
