"""Kernel histograms as OTLP histogram data points, exponential (as the kernel keeps them) or explicit.

The kernel's buckets *are* OpenTelemetry exponential buckets at scale 3 of the latency in seconds, so an
exponential data point takes them as they are: no packet is replayed in user space, and the work per
point is a fixed 256-bucket scan whatever the packet rate. For explicit boundaries each exponential
bucket goes whole into the explicit bucket holding its log-midpoint: a boundary that cuts a kernel
bucket (9% wide) misplaces at most the part of that one bucket on the wrong side.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from opentelemetry.sdk.metrics import Exemplar
from opentelemetry.sdk.metrics.export import Buckets, ExponentialHistogramDataPoint, HistogramDataPoint

from .. import histogram
from ..histogram import SegmentHistogram

# For latencies from a microsecond (a fast segment) to a second (a stalled queue).
DEFAULT_EXPLICIT_BOUNDS_S: tuple[float, ...] = (
    1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0)

# Geometric middle of each kernel bucket, in seconds, by array position.
_MIDPOINTS_S = 2.0 ** ((np.arange(histogram.N_BUCKETS) + histogram.INDEX_MIN + 0.5) / 2**histogram.SCALE)


def select_exemplars(exemplars: Sequence[Exemplar], limit: int) -> list[Exemplar]:
    """At most `limit` exemplars, spread over the distribution: the latest one of each bucket, and of
    those the slowest buckets first (the tail is what a user follows an exemplar for)."""
    if len(exemplars) <= limit:
        return list(exemplars)
    by_bucket: dict[int | None, Exemplar] = {}
    for e in exemplars:
        by_bucket[histogram.bucket_index(round(e.value * 1e9))] = e
    return sorted(by_bucket.values(), key=lambda e: e.value, reverse=True)[:limit]


def exponential(h: SegmentHistogram, attributes: dict, start_ns: int, end_ns: int,
                exemplars: list[Exemplar]) -> ExponentialHistogramDataPoint:
    offset, counts = h.nonzero_span()
    # count is derived from the buckets, not taken from the kernel's separate counter: the two maps are
    # read moments apart, and an OTLP point whose count disagrees with its buckets is invalid.
    count = sum(counts) + h.zero_count
    # min and max stay unset: the kernel's max is never reset, so it is not the max of this point.
    return ExponentialHistogramDataPoint(
        attributes=attributes, start_time_unix_nano=start_ns, time_unix_nano=end_ns, count=count,
        sum=h.sum_ns / 1e9, scale=histogram.SCALE, zero_count=h.zero_count,
        positive=Buckets(offset=offset, bucket_counts=counts), negative=Buckets(offset=0, bucket_counts=[]),
        flags=0, min=None, max=None, exemplars=exemplars)


class ExplicitBuckets:
    """Maps kernel buckets onto fixed boundaries (precomputed once: a point costs one cumulative sum)."""

    def __init__(self, bounds_s: Sequence[float]):
        bounds = np.asarray(bounds_s, dtype=np.float64)
        if bounds.size == 0 or np.any(np.diff(bounds) <= 0) or bounds[0] <= 0:
            raise ValueError(f"explicit histogram boundaries must be positive and increasing, not {list(bounds_s)}")
        self.bounds_s = tuple(float(b) for b in bounds)
        # Explicit bucket k is (b[k-1], b[k]]: kernel positions [edges[k-1], edges[k]) land in it.
        self._edges = np.concatenate(([0], np.searchsorted(_MIDPOINTS_S, bounds, side="right"),
                                      [histogram.N_BUCKETS]))

    def counts(self, h: SegmentHistogram) -> list[int]:
        cum = np.concatenate(([0], np.cumsum(h.buckets, dtype=np.uint64)))
        per_bucket = (cum[self._edges[1:]] - cum[self._edges[:-1]]).astype(np.int64)
        per_bucket[0] += h.zero_count  # a zero latency is below every positive boundary
        return [int(c) for c in per_bucket]

    def point(self, h: SegmentHistogram, attributes: dict, start_ns: int, end_ns: int,
              exemplars: list[Exemplar]) -> HistogramDataPoint:
        counts = self.counts(h)
        return HistogramDataPoint(
            attributes=attributes, start_time_unix_nano=start_ns, time_unix_nano=end_ns, count=sum(counts),
            sum=h.sum_ns / 1e9, bucket_counts=counts, explicit_bounds=self.bounds_s, min=None, max=None,
            exemplars=exemplars)
