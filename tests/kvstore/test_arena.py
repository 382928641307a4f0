"""The host arena and the CPU tier on it: one copy in, zero-copy out, and no reuse of bytes a caller views."""

from __future__ import annotations

import gc
import itertools
import random
import threading
import time

import pytest
import torch

from kvstore import KVChunk, MemoryTier
from kvstore.arena import ALIGN, HostArena
from tests.kvstore.conftest import assert_same, key, make_chunk


def _filled(value: int, tokens: int = 16) -> KVChunk:
    """A chunk whose every KV element is ``value`` (so any overwrite is visible)."""
    return KVChunk(torch.full((2, 2, 2, tokens, 8), float(value)), torch.arange(tokens), "fp")


def test_allocator_splits_coalesces_and_reuses() -> None:
    arena = HostArena(64 * ALIGN)
    assert arena.capacity == 64 * ALIGN and arena.free_bytes == 64 * ALIGN
    leases = [arena.alloc(n) for n in (1, ALIGN, 3 * ALIGN + 5, 10 * ALIGN)]
    assert all(lease is not None for lease in leases)
    assert [lease.numel() for lease in leases if lease is not None] == [1, ALIGN, 3 * ALIGN + 5, 10 * ALIGN]
    assert arena.allocated_bytes == (1 + 1 + 4 + 10) * ALIGN
    assert arena.alloc(49 * ALIGN) is None  # only 48 blocks left
    ptrs = {lease.data_ptr() for lease in leases if lease is not None}
    assert len(ptrs) == 4 and all(p % ALIGN == 0 for p in ptrs)
    del leases
    gc.collect()
    assert arena.allocated_bytes == 0
    whole = arena.alloc(64 * ALIGN)  # neighbours coalesced back into one block
    assert whole is not None and arena.free_bytes == 0
    del whole
    assert arena.free_bytes == 64 * ALIGN


def test_allocator_random_sizes_never_overlap() -> None:
    rng = random.Random(7)
    arena = HostArena(1 << 20)
    live: list[torch.Tensor] = []
    for step in range(2000):
        if live and (rng.random() < 0.45 or arena.free_bytes < 64 << 10):
            live.pop(rng.randrange(len(live)))
            continue
        lease = arena.alloc(rng.randint(1, 40_000))
        if lease is not None:
            lease.fill_(step % 251)
            live.append(lease)
        spans = sorted((t.data_ptr(), t.data_ptr() + t.numel()) for t in live)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))
    expected = sum(HostArena.block_size(t.numel()) for t in live)
    assert arena.allocated_bytes == expected
    live.clear()
    del lease
    assert arena.allocated_bytes == 0 and arena.alloc(1 << 20) is not None


def test_lease_views_keep_the_block() -> None:
    arena = HostArena(4 * ALIGN)
    lease = arena.alloc(4 * ALIGN)
    assert lease is not None
    view = lease[ALIGN:].view(torch.float32)[:3]  # a derived view shares the lease's storage
    del lease
    assert arena.alloc(ALIGN) is None  # still held by ``view``
    del view
    assert arena.alloc(4 * ALIGN) is not None


def test_get_is_zero_copy_and_put_copies_once() -> None:
    tier = MemoryTier(1 << 20)
    chunk = make_chunk(16, torch.bfloat16)
    tier.put(key(1), chunk)
    got = tier.get(key(1))
    assert got is not None and tier.arena is not None and tier.arena.owns(got.kv)
    assert got.kv.data_ptr() != chunk.kv.data_ptr()
    assert_same(got, chunk)
    again = tier.get(key(1))
    assert again is not None and again.kv.data_ptr() == got.kv.data_ptr()
    assert tier.used_bytes == HostArena.block_size(chunk.nbytes) == tier.arena.allocated_bytes


def test_evicted_bytes_are_not_reused_while_viewed() -> None:
    one = HostArena.block_size(_filled(0).nbytes)
    tier = MemoryTier(2 * one)
    tier.put(key(0), _filled(0))
    view = tier.get(key(0))
    assert view is not None
    kv_slice = view.kv[1, 0]  # a caller may keep only part of it
    for i in range(1, 20):  # key 0 is evicted on the way; its block stays out of use
        tier.put(key(i), _filled(i))
        assert torch.all(view.kv == 0) and torch.all(kv_slice == 0)
        assert tier.used_bytes + tier.retired_bytes <= tier.budget_bytes
    assert not tier.contains(key(0)) and tier.contains(key(19))
    assert tier.used_bytes == one and tier.retired_bytes == one  # one slot left: the viewed one is retired
    del view
    assert tier.retired_bytes == one  # ``kv_slice`` still views it
    del kv_slice
    assert tier.retired_bytes == 0
    tier.put(key(20), _filled(20))
    assert tier.contains(key(19)) and tier.contains(key(20))  # both slots usable again


def test_full_arena_of_viewed_chunks_refuses_put() -> None:
    one = HostArena.block_size(_filled(0).nbytes)
    tier = MemoryTier(2 * one)
    views = []
    for i in range(2):
        tier.put(key(i), _filled(i))
        views.append(tier.get(key(i)))
    tier.delete(key(0))
    tier.delete(key(1))
    evicted = tier.put(key(9), _filled(9))  # every block is viewed: not stored, comes back as evicted
    assert [k for k, _ in evicted] == [key(9)] and not tier.contains(key(9))
    assert tier.used_bytes == 0 and tier.retired_bytes == 2 * one
    views.clear()
    assert tier.put(key(9), _filled(9)) == [] and tier.contains(key(9))


def test_collect_evicted_hands_over_a_copy() -> None:
    one = HostArena.block_size(_filled(0).nbytes)
    tier = MemoryTier(one)
    tier.collect_evicted = True
    tier.put(key(0), _filled(0))
    evicted = tier.put(key(1), _filled(1))
    assert [k for k, _ in evicted] == [key(0)]
    assert tier.arena is not None and not tier.arena.owns(evicted[0][1].kv)
    assert torch.all(evicted[0][1].kv == 0) and tier.retired_bytes == 0


def test_put_if_absent_loser_returns_its_block() -> None:
    tier = MemoryTier(1 << 20)
    assert tier.put_many_if_absent([(key(1), _filled(1)), (key(1), _filled(2))])[0] == [True, False]
    got = tier.get(key(1))
    assert got is not None and torch.all(got.kv == 1)
    assert tier.arena is not None and tier.arena.allocated_bytes == tier.used_bytes


def test_concurrent_readers_never_see_reused_bytes() -> None:
    one = HostArena.block_size(_filled(0).nbytes)
    tier = MemoryTier(3 * one)  # constant eviction
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(300):
            i = rng.randrange(8)
            if rng.random() < 0.5:
                tier.put(key(i), _filled(i))
            else:
                got = tier.get(key(i))
                if got is not None:
                    for _ in range(3):
                        if not torch.all(got.kv == i):
                            errors.append(f"key {i} changed under a reader")
            if tier.used_bytes > tier.budget_bytes:
                errors.append("over budget")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert tier.arena is not None and tier.arena.allocated_bytes == tier.used_bytes


def test_populate_keeps_contents() -> None:
    tier = MemoryTier(8 << 20, prefault=True)
    chunk = make_chunk(64)
    tier.put(key(1), chunk)
    assert tier.arena is not None
    tier.arena.populate()
    assert_same(tier.get(key(1)), chunk)


def test_zero_budget_stores_nothing() -> None:
    tier = MemoryTier(0)
    chunk = make_chunk(4)
    assert tier.put(key(1), chunk) == [(key(1), chunk)] and not tier.contains(key(1))


def test_populating_ahead_lets_other_threads_run() -> None:
    """Faulting pages in (about 1 GB/s on a VM) must not hold the GIL: a read buffer's background populate
    stalled every other thread of the process for tens of ms (the store's gets included)."""
    arena = HostArena(64 << 20)
    gaps: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            time.sleep(0)

    ticker = threading.Thread(target=tick)
    ticker.start()
    time.sleep(0.01)
    start = time.perf_counter()
    arena.populate()
    took = time.perf_counter() - start
    stop.set()
    ticker.join()
    if took < 0.02:
        pytest.skip(f"populating 64 MiB took only {took * 1e3:.1f} ms here: nothing to see")
    assert max(gaps) < took / 2, f"another thread stood still {max(gaps) * 1e3:.1f} of {took * 1e3:.1f} ms"


def test_populate_reaches_unaligned_targets() -> None:
    arena = HostArena(8 << 20)
    arena._populate_to(3 * 4096 + 100)  # a target inside a page: that page is populated too, and later ones
    arena._populate_to(5 << 20)
    assert 5 << 20 <= arena._populated < 8 << 20  # not given up (an unaligned madvise fails with EINVAL)


@pytest.mark.parametrize("nbytes", [1, 1 << 20, (7 << 20) + 12345])
def test_host_copies_are_exact(nbytes: int) -> None:
    from kvstore.tiers import memory

    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    memory._copy_into(dst, src)
    assert torch.equal(dst, src)
    strided = torch.zeros(2, 3, dtype=torch.uint8)[:, 0]  # a non-contiguous destination: torch's copy
    memory._copy_into(strided, torch.tensor([7, 9], dtype=torch.uint8))
    assert strided.tolist() == [7, 9]


def test_put_copies_noncontiguous_and_contiguous_chunks_exactly() -> None:
    tier = MemoryTier(8 << 20)
    base = make_chunk(16, torch.bfloat16, seed=4)
    strided = KVChunk(base.kv.transpose(3, 4).contiguous().transpose(3, 4), base.positions, base.fingerprint)
    assert not strided.kv.is_contiguous()
    for i, chunk in enumerate((base, strided)):
        tier.put(key(i), chunk)
        assert_same(tier.get(key(i)), base)
