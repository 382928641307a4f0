"""Unit tests of the Zipf chunk-reuse trace."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from workloads.trace import reuse_stats, zipf_trace, zipf_weights


def test_shape_distinct_and_deterministic() -> None:
    trace = zipf_trace(200, 300, 6, seed=1)
    assert len(trace) == 300 and all(len(r) == 6 for r in trace)
    assert all(len(set(r)) == 6 for r in trace)
    assert all(0 <= c < 200 for r in trace for c in r)
    assert trace == zipf_trace(200, 300, 6, seed=1)
    assert trace != zipf_trace(200, 300, 6, seed=2)
    with pytest.raises(ValueError):
        zipf_trace(5, 1, 6)


def test_zipf_skew_and_random_order() -> None:
    trace = zipf_trace(500, 2000, 5, alpha=1.0, seed=0)
    counts = Counter(c for r in trace for c in r)
    freq = sorted(counts.values(), reverse=True)
    assert freq[0] > 10 * float(np.median(freq))
    top = freq and counts.most_common(1)[0][0]
    positions = Counter(r.index(top) for r in trace if top in r)
    assert len(positions) == 5  # the hottest chunk shows up at every position
    assert max(positions.values()) < 0.4 * sum(positions.values())


def test_uniform_alpha_zero_and_weights() -> None:
    w = zipf_weights(10, 1.0)
    assert abs(w.sum() - 1) < 1e-12 and w[0] == pytest.approx(10 * w[9])
    counts = Counter(c for r in zipf_trace(50, 2000, 5, alpha=0.0, seed=0) for c in r)
    assert max(counts.values()) < 2 * min(counts.values())


def test_reuse_stats() -> None:
    stats = reuse_stats([[1, 2, 3], [1, 2, 3], [3, 1, 2], [4]])
    assert stats["occurrences"] == 10 and stats["distinct_chunks"] == 4
    assert stats["reuse_rate"] == pytest.approx(6 / 10)
    assert stats["prefix_reuse_rate"] == pytest.approx(3 / 10)  # only the repeated request
    assert stats["moved_rate"] == pytest.approx(3 / 6)  # the third request moves all three
    assert stats["top_count"] == 3 and stats["median_count"] == 3
    assert reuse_stats([])["reuse_rate"] == 0.0
    zipf = reuse_stats(zipf_trace(300, 500, 6, seed=0))
    assert zipf["reuse_rate"] > 0.8 and zipf["prefix_reuse_rate"] < 0.2 and zipf["moved_rate"] > 0.8
