"""Exponential latency histograms as the kernel keeps them, and what user space derives from them.

The kernel (bpf/latencytrace.h, lt_bucket()) files every latency into base-2 exponential buckets at
scale 3 of the value *in seconds*: bucket i covers (2**(i/8), 2**((i+1)/8)] s, 9.05% wide, which is
exactly an OpenTelemetry exponential histogram bucket at scale 3. The kernel stores bucket i at array
position i - INDEX_MIN. `bucket_index()` below is the same integer arithmetic in Python; the tests check
that both agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

SCALE = 3
N_BUCKETS = 256
# Lowest bucket: (2**-27, 2**-26.875] s, i.e. ~7.5 ns; the highest ends at 2**5 = 32 s.
INDEX_MIN = -216
INDEX_MAX = INDEX_MIN + N_BUCKETS - 1


def _iroot8(n: int) -> int:
    """floor(n ** (1/8)) for a non-negative integer, exactly."""
    r = math.isqrt(math.isqrt(math.isqrt(n)))
    while r**8 > n:
        r -= 1
    while (r + 1) ** 8 <= n:
        r += 1
    return r


# Bucket boundaries are 1e9 * 2**(i/8) ns. Each octave [2**o, 2**(o+1)) of ns holds exactly eight of
# them (log2(1e9) is irrational), i = 8*o + OCTAVE_BASE + 1 ... + 8, and scaled by 2**(63-o) they are the
# same eight numbers in every octave: MANTISSA_THRESHOLDS, floor(1e9 * 2**((265+j)/8)) for j = 0..7 (from
# the first boundary at or above 1 ns, 1e9 * 2**(-239/8), scaled by 2**63), computed as exact integer
# eighth roots. An integer m is above a real threshold exactly when it is above its floor.
OCTAVE_BASE = -240
MANTISSA_THRESHOLDS = tuple(_iroot8(10**72 * 2 ** (265 + j)) for j in range(8))


def bucket_index(ns: int) -> int | None:
    """OpenTelemetry scale-3 bucket index of `ns` nanoseconds expressed in seconds; None for zero.

    Same integer steps as lt_bucket() in bpf/latencytrace.h (see there for why they are exact).
    """
    if ns <= 0:
        return None
    ns = min(ns, (1 << 64) - 1)
    o = ns.bit_length() - 1
    m = ns << (63 - o)
    idx = 8 * o + OCTAVE_BASE + sum(1 for t in MANTISSA_THRESHOLDS if m > t)
    return min(max(idx, INDEX_MIN), INDEX_MAX)


def bucket_bounds_s(index: int) -> tuple[float, float]:
    """(lower, upper] bounds of bucket `index` in seconds."""
    return 2.0 ** (index / 8), 2.0 ** ((index + 1) / 8)


@dataclass
class SegmentHistogram:
    """Counts of one (target, segment) over an interval (a delta) or since the target was added."""

    count: int = 0
    sum_ns: int = 0
    zero_count: int = 0
    max_ns: int = 0
    # Dense counts for positions 0..N_BUCKETS-1 (bucket index = position + INDEX_MIN).
    buckets: np.ndarray = field(default_factory=lambda: np.zeros(N_BUCKETS, dtype=np.uint64))

    def nonzero_span(self) -> tuple[int, list[int]]:
        """(offset, counts) trimmed to the populated range, as OTLP wants them; (0, []) when empty."""
        nz = np.flatnonzero(self.buckets)
        if nz.size == 0:
            return 0, []
        lo, hi = int(nz[0]), int(nz[-1])
        return lo + INDEX_MIN, [int(c) for c in self.buckets[lo:hi + 1]]

    def merge(self, other: SegmentHistogram) -> None:
        self.count += other.count
        self.sum_ns += other.sum_ns
        self.zero_count += other.zero_count
        self.max_ns = max(self.max_ns, other.max_ns)
        self.buckets = self.buckets + other.buckets

    def quantile_ns(self, q: float) -> float | None:
        """The q-quantile estimated inside its bucket by log-linear interpolation: off by at most the
        bucket's width, a factor of 2**(1/8) (9.05%), since the true quantile lies in the same bucket."""
        total = int(self.buckets.sum()) + self.zero_count
        if total == 0:
            return None
        rank = q * total
        if rank <= self.zero_count:
            return 0.0
        cum = np.cumsum(self.buckets.astype(np.float64)) + self.zero_count
        pos = int(np.searchsorted(cum, rank, side="left"))
        pos = min(pos, N_BUCKETS - 1)
        below = cum[pos - 1] if pos > 0 else float(self.zero_count)
        in_bucket = float(self.buckets[pos])
        frac = (rank - below) / in_bucket if in_bucket else 1.0
        lo, hi = bucket_bounds_s(pos + INDEX_MIN)
        value_s = lo * (hi / lo) ** frac
        if self.max_ns:
            value_s = min(value_s, self.max_ns / 1e9)
        return value_s * 1e9

    def summary_us(self) -> dict[str, float | int]:
        def us(v: float | None) -> float | None:
            return None if v is None else round(v / 1000.0, 3)

        return {
            "count": self.count,
            "p50_us": us(self.quantile_ns(0.50)),
            "p90_us": us(self.quantile_ns(0.90)),
            "p99_us": us(self.quantile_ns(0.99)),
            "max_us": us(float(self.max_ns)) if self.count else None,
            "mean_us": us(self.sum_ns / self.count) if self.count else None,
        }


def delta(current: SegmentHistogram, previous: SegmentHistogram | None) -> SegmentHistogram:
    """current - previous for cumulative kernel counters (bucket counters are u32 and wrap)."""
    if previous is None:
        return current
    buckets = (current.buckets.astype(np.int64) - previous.buckets.astype(np.int64)) % (1 << 32)
    return SegmentHistogram(
        count=current.count - previous.count,
        sum_ns=current.sum_ns - previous.sum_ns,
        zero_count=current.zero_count - previous.zero_count,
        max_ns=current.max_ns,
        buckets=buckets.astype(np.uint64),
    )
