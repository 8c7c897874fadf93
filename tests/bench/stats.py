"""Small statistics for same-run comparisons: medians, paired ratios and their spread, and quantiles of
the bucketed histograms the bpftrace script prints."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def median(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def paired(off: Sequence[float], on: Sequence[float]) -> dict:
    """Compare runs made in alternating order: off[i] was measured right before on[i].

    ratio: median(on) / median(off); pair_ratios: on[i] / off[i], whose min and max are the spread
    (what the drift and noise of the machine did between neighbouring runs)."""
    pairs = [(a, b) for a, b in zip(off, on) if a and b is not None]
    ratios = [b / a for a, b in pairs]
    deltas = [b - a for a, b in pairs]
    m_off, m_on = median(off), median(on)
    return {
        "off": list(off), "on": list(on),
        "median_off": m_off, "median_on": m_on,
        "ratio": (m_on / m_off) if m_off else None,
        "delta": (m_on - m_off) if m_off is not None and m_on is not None else None,
        "pair_ratios": ratios, "ratio_min": min(ratios, default=None), "ratio_max": max(ratios, default=None),
        "pair_deltas": deltas, "delta_min": min(deltas, default=None), "delta_max": max(deltas, default=None),
        "stdev_ratio": statistics.stdev(ratios) if len(ratios) > 1 else None,
    }


# The bpftrace script's buckets: d / 32 below 131072 ns, 4096 + d / 16384 above.
_FINE_NS, _FINE_LIMIT, _COARSE_BASE, _COARSE_NS = 32, 131072, 4096, 16384


def bucket_bounds_ns(b: int) -> tuple[float, float]:
    if b < _COARSE_BASE:
        return b * _FINE_NS, (b + 1) * _FINE_NS
    k = b - _COARSE_BASE
    return k * _COARSE_NS, (k + 1) * _COARSE_NS


def bucket_map(raw: dict[str, int]) -> dict[int, dict[int, int]]:
    """bpftrace's {"<inode>,<bucket>": count} -> {inode: {bucket: count}}."""
    out: dict[int, dict[int, int]] = {}
    for key, n in raw.items():
        inode, bucket = (int(x) for x in key.split(","))
        out.setdefault(inode, {})[bucket] = out.get(inode, {}).get(bucket, 0) + int(n)
    return out


def bucket_quantile_ns(buckets: dict[int, int], q: float) -> float | None:
    """The q-quantile, linearly interpolated inside its bucket."""
    total = sum(buckets.values())
    if not total:
        return None
    rank = q * total
    seen = 0
    for b in sorted(buckets):
        n = buckets[b]
        if seen + n >= rank:
            lo, hi = bucket_bounds_ns(b)
            return lo + (hi - lo) * (rank - seen) / n
        seen += n
    return bucket_bounds_ns(max(buckets))[1]
