from __future__ import annotations

import random
import threading
from pathlib import Path

import torch

from kvstore import KeySpace, MemoryTier, RedisTier, SSDTier, TieredStore
from tests.kvstore.conftest import FP, assert_same, key, make_chunk

N_KEYS = 24
VARIANTS = 2  # every key may hold one of two full versions; a read must see exactly one of them


def _chunk(i: int, v: int):  # type: ignore[no-untyped-def]
    return make_chunk(24 + i % 5, torch.bfloat16 if i % 2 else torch.float32, seed=1000 * v + i, start=v)


def test_many_threads_no_corruption(tmp_path: Path, redis_url: str) -> None:
    one = _chunk(0, 0).nbytes
    cpu = MemoryTier(6 * one)  # small: constant eviction and promotion
    ssd = SSDTier(tmp_path, 12 * one, fsync="never")
    rds = RedisTier(redis_url, 1 << 30, stripe_bytes=4096, io_threads=3)
    expected = {(i, v): _chunk(i, v) for i in range(N_KEYS) for v in range(VARIANTS)}
    errors: list[BaseException] = []
    seen = [0]
    lock = threading.Lock()

    with TieredStore([cpu, ssd, rds], write_modes=["write-through", "write-back", "write-through"]) as store:

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(150):
                    i = rng.randrange(N_KEYS)
                    op = rng.random()
                    if op < 0.35:
                        store.put(key(i), expected[(i, rng.randrange(VARIANTS))])
                    elif op < 0.9:
                        ids = rng.sample(range(N_KEYS), 4)
                        for j, got in zip(ids, store.get_many([key(j) for j in ids]), strict=True):
                            if got is None:
                                continue
                            v = int(got.positions[0])
                            assert_same(got, expected[(j, v)])
                            with lock:
                                seen[0] += 1
                    else:
                        store.prefetch([key(i)]).result(timeout=30)
            except BaseException as exc:  # surfaced in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors[0]
        assert seen[0] > 50
        stats = store.stats()
        assert stats.as_dict()["totals"]["corrupt"] == 0
        assert all(t.used_bytes <= t.budget_bytes for t in store.tiers)
        assert all(r.stats.errors == 0 for r in stats.tiers)
        for i in range(N_KEYS):
            got = store.get(key(i))
            if got is not None:
                assert_same(got, expected[(i, int(got.positions[0]))])


def test_tenants_never_collide_in_store(tmp_path: Path, redis_url: str) -> None:
    spaces = [KeySpace(FP, "l2", ns) for ns in ("a", "b", "c")]
    with TieredStore(
        [MemoryTier(1 << 20), SSDTier(tmp_path, 1 << 30), RedisTier(redis_url, 1 << 30)]
    ) as store:
        tokens = [1, 2, 3, 4]
        for n, ks in enumerate(spaces):
            store.put(ks.chunk_key(tokens), make_chunk(8, seed=n))
        for n, ks in enumerate(spaces):
            assert_same(store.get(ks.chunk_key(tokens)), make_chunk(8, seed=n))
        assert store.get(KeySpace(FP, "l2", "d").chunk_key(tokens)) is None
