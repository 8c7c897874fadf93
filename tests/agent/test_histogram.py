"""User-space histogram arithmetic: quantiles, deltas of wrapping kernel counters, OTLP bucket spans."""

from __future__ import annotations

import random

import numpy as np

from latencytrace.node_agent import histogram
from latencytrace.node_agent.histogram import SegmentHistogram


def filled(values_ns: list[int]) -> SegmentHistogram:
    h = SegmentHistogram()
    for v in values_ns:
        idx = histogram.bucket_index(v)
        if idx is None:
            h.zero_count += 1
        else:
            h.buckets[idx - histogram.INDEX_MIN] += 1
        h.count += 1
        h.sum_ns += v
        h.max_ns = max(h.max_ns, v)
    return h


def test_quantiles_within_one_bucket_width():
    rng = random.Random(1)
    values = sorted(int(rng.lognormvariate(10, 1.5)) + 1 for _ in range(20000))
    h = filled(values)
    for q in (0.5, 0.9, 0.99):
        exact = values[int(q * len(values)) - 1]
        assert abs(h.quantile_ns(q) / exact - 1) < 0.0906, q  # one scale-3 bucket is 9.05% wide
    assert h.quantile_ns(1.0) <= h.max_ns


def test_delta_survives_u32_wrap_of_kernel_counters():
    prev = SegmentHistogram(count=10, sum_ns=100, buckets=np.full(histogram.N_BUCKETS, 2**32 - 3, dtype=np.uint64))
    cur = SegmentHistogram(count=17, sum_ns=170, buckets=np.full(histogram.N_BUCKETS, 4, dtype=np.uint64))
    d = histogram.delta(cur, prev)
    assert d.count == 7 and d.sum_ns == 70 and set(d.buckets.tolist()) == {7}


def test_nonzero_span_is_the_otlp_offset_and_counts():
    h = filled([1000, 1000, 50_000])
    offset, counts = h.nonzero_span()
    assert offset == histogram.bucket_index(1000)
    assert counts[0] == 2 and counts[-1] == 1 and sum(counts) == 3
    assert offset + len(counts) - 1 == histogram.bucket_index(50_000)
    lo, hi = histogram.bucket_bounds_s(offset)
    assert lo < 1e-6 <= hi
