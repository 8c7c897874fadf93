"""User-space histogram arithmetic: quantiles, deltas of wrapping kernel counters, OTLP bucket spans."""

from __future__ import annotations

import random
import re
from pathlib import Path

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


WIDTH = 2 ** (1 / 8)  # one scale-3 bucket: its upper bound over its lower bound
README = Path(__file__).resolve().parents[2] / "README.md"


def test_quantiles_within_one_bucket_width():
    rng = random.Random(1)
    values = sorted(int(rng.lognormvariate(10, 1.5)) + 1 for _ in range(20000))
    h = filled(values)
    for q in (0.5, 0.9, 0.99):
        exact = values[int(q * len(values)) - 1]
        assert 1 / WIDTH <= h.quantile_ns(q) / exact <= WIDTH, q
    assert h.quantile_ns(1.0) <= h.max_ns
    # The bound is reached, not just allowed: values piled at the top of one bucket, whose lowest
    # quantiles the interpolation puts near its bottom.
    lo, hi = histogram.bucket_bounds_s(histogram.bucket_index(100_000))
    top = int(hi * 1e9)
    piled = filled([top] * 1000)
    worst = max(top / piled.quantile_ns(q) for q in (0.001, 0.01, 0.1))
    assert 1.08 < worst <= WIDTH, worst
    # The README states the same bound.
    m = re.search(r"Quantiles are estimated .*? within one bucket\s+width of the true value: ([0-9.]+)% at most",
                  README.read_text(), re.S)
    assert m and float(m.group(1)) == round((WIDTH - 1) * 100, 2), m and m.group(0)


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
