from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from kvstore import parallel
from kvstore.chunk import KVChunk
from kvstore.hostmem import copy_bytes
from kvstore.keys import ChunkKey
from kvstore.parallel import share_work
from kvstore.tiers.memory import MemoryTier


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


def _four_mib(seed: int) -> KVChunk:
    # numpy-made: torch's parallel fill would use OpenMP threads, which hang in a forked child (see below)
    kv = torch.from_numpy(np.full((4, 2, 4, 256, 128), float(seed), dtype=np.float32))
    return KVChunk(kv, torch.arange(256), "fp")


@pytest.mark.parametrize("collect_evicted", [False, True])
def test_a_busy_helper_keeps_no_evicted_block_alive(collect_evicted: bool) -> None:
    """A task queued for a busy helper must not hold a finished call's buffers: the CPU tier frees a
    victim's arena block on eviction and reuses it at once."""
    release = threading.Event()
    finished = threading.Semaphore(0)

    def block() -> None:
        release.wait(30)
        finished.release()

    for _ in range(parallel.HELPERS):
        parallel._submit(block)
    try:
        tier = MemoryTier(3 * (4 << 20) + 3 * 4096, pin_memory=False)  # room for three chunks
        tier.collect_evicted = collect_evicted
        keys = [ChunkKey(bytes([i]) * 16) for i in range(5)]
        evicted = [e for i, k in enumerate(keys) for e in tier.put(k, _four_mib(i))]
        assert sum(tier.get(k) is not None for k in keys) == 3
        assert len(evicted) == (2 if collect_evicted else 0)  # handed down only when collected
    finally:
        release.set()
        for _ in range(parallel.HELPERS):
            assert finished.acquire(timeout=10)


def test_helpers_start_again_in_a_forked_child() -> None:
    """The child does numpy and arena work only: torch ops that use OpenMP can hang after a fork."""
    copy_bytes(np.empty(4 << 20, np.uint8), np.ones(4 << 20, np.uint8))  # helpers started in this process
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running pytest's teardown
        try:
            src = np.arange(5 << 20, dtype=np.uint64).view(np.uint8)[: 5 << 20]
            dst = np.zeros_like(src)
            for _ in range(5):
                copy_bytes(dst, src)
            tier = MemoryTier(3 * (4 << 20) + 3 * 4096, pin_memory=False)
            keys = [ChunkKey(bytes([i]) * 16) for i in range(5)]
            for i, k in enumerate(keys):
                tier.put(k, _four_mib(i))
            ok = np.array_equal(dst, src) and sum(tier.get(k) is not None for k in keys) == 3
            alive = any(t.is_alive() for t in parallel._started)
            os.write(write, f"{ok} {alive}".encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as f:
        assert f.read() == "True True"


def test_an_interrupted_caller_waits_for_the_helpers_item() -> None:
    """An exception raised in the caller while it waits (here a signal handler's) surfaces only once no
    helper is inside ``fn``: the caller's buffers and file descriptors are not used after it returned."""
    in_item = threading.Event()
    state = {"helper_done": False}

    def fn(i: int) -> int:
        if threading.current_thread() is threading.main_thread():
            in_item.wait(10)  # the caller's item ends once a helper is inside its own
            return i
        in_item.set()
        time.sleep(0.3)
        state["helper_done"] = True
        return i

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.1)
    try:
        with pytest.raises(KeyboardInterrupt):
            share_work(2, fn)
        assert state["helper_done"]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_copy_bytes_needs_equal_sizes() -> None:
    with pytest.raises(ValueError, match="destination"):
        copy_bytes(np.zeros(3 << 20, np.uint8), np.zeros(4 << 20, np.uint8))
