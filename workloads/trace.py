"""Chunk-reuse traces: requests that retrieve documents with Zipf popularity, in random order.

Popular chunks recur often but in new orders and next to new neighbours, which defeats prefix
caching and is what position-independent chunk reuse targets. :func:`reuse_stats` reports both.
"""

from __future__ import annotations

from collections import Counter

import numpy as np


def zipf_weights(corpus_size: int, alpha: float = 1.0) -> np.ndarray:
    """Normalised Zipf popularity ``1 / rank**alpha`` for ranks ``1..corpus_size``."""
    w = 1.0 / np.arange(1, corpus_size + 1, dtype=np.float64) ** alpha
    return w / w.sum()


def zipf_trace(corpus_size: int, num_requests: int, chunks_per_request: int, *, alpha: float = 1.0,
               seed: int = 0) -> list[list[int]]:
    """``num_requests`` requests of ``chunks_per_request`` distinct document indices each.

    Indices are drawn without replacement with Zipf(``alpha``) popularity over a seeded random
    permutation of ``range(corpus_size)`` (so popularity is not tied to the index) and returned in
    random order. ``alpha=0`` gives uniform popularity.
    """
    if not 0 < chunks_per_request <= corpus_size:
        raise ValueError(f"need 0 < chunks_per_request <= corpus_size, got {chunks_per_request}, {corpus_size}")
    rng = np.random.default_rng(seed)
    by_rank = rng.permutation(corpus_size)
    p = zipf_weights(corpus_size, alpha)
    trace: list[list[int]] = []
    for _ in range(num_requests):
        ranks = rng.choice(corpus_size, size=chunks_per_request, replace=False, p=p)
        rng.shuffle(ranks)  # weighted sampling yields popular chunks first; the order must be random
        trace.append([int(by_rank[r]) for r in ranks])
    return trace


def reuse_stats(trace: list[list[int]]) -> dict[str, float]:
    """Reuse statistics of a trace.

    - ``reuse_rate``: share of chunk occurrences whose chunk was seen in an earlier request
      (the hit rate of an unbounded position-independent chunk cache).
    - ``prefix_reuse_rate``: share of occurrences whose whole request prefix up to and including the
      chunk was seen before as a request prefix (the hit rate of an unbounded prefix cache).
    - ``moved_rate``: share of reused occurrences at a different position or after a different
      predecessor than the chunk's previous occurrence.
    - ``top_count`` / ``median_count``: occurrences of the most popular and the median chunk.
    """
    seen: dict[int, tuple[int, int | None]] = {}  # chunk -> (position, predecessor) of last occurrence
    prefixes: set[tuple[int, ...]] = set()
    counts: Counter[int] = Counter()
    total = reused = prefix_hits = moved = 0
    for request in trace:
        for pos, chunk in enumerate(request):
            total += 1
            prev = request[pos - 1] if pos else None
            if chunk in seen:
                reused += 1
                moved += seen[chunk] != (pos, prev)
            if tuple(request[: pos + 1]) in prefixes:
                prefix_hits += 1
            seen[chunk] = (pos, prev)
            counts[chunk] += 1
        prefixes.update(tuple(request[: i + 1]) for i in range(len(request)))
    freq = sorted(counts.values(), reverse=True)
    return {
        "requests": float(len(trace)),
        "occurrences": float(total),
        "distinct_chunks": float(len(counts)),
        "reuse_rate": reused / total if total else 0.0,
        "prefix_reuse_rate": prefix_hits / total if total else 0.0,
        "moved_rate": moved / reused if reused else 0.0,
        "top_count": float(freq[0]) if freq else 0.0,
        "median_count": float(np.median(freq)) if freq else 0.0,
    }
