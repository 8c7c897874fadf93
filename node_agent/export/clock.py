"""Kernel timestamps (CLOCK_MONOTONIC, what bpf_ktime_get_ns() returns) to wall-clock time for OTLP.

OTLP wants nanoseconds since the epoch; the kernel stamps packets with the monotonic clock. The two differ
by an offset that NTP slews slowly and a clock step changes at once, so it is measured, not assumed: a
monotonic reading bracketed by two wall-clock readings gives the offset to within half the bracket, and
the tightest of a few tries (a few hundred ns on an idle CPU) is kept. The offset is measured again every
`resync_s` so that drift and steps of the wall clock stay bounded by that period.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


def _monotonic_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


@dataclass(frozen=True)
class Sync:
    offset_ns: int  # wall = monotonic + offset
    uncertainty_ns: int  # half the tightest bracket: the conversion is exact to within this
    at_monotonic_ns: int


class WallClock:
    def __init__(self, resync_s: float = 60.0, samples: int = 32,
                 monotonic_ns: Callable[[], int] = _monotonic_ns, wall_ns: Callable[[], int] = time.time_ns):
        self.resync_ns = int(resync_s * 1e9)
        self.samples = samples
        self._mono = monotonic_ns
        self._wall = wall_ns
        self.last: Sync = self.sync()

    def sync(self) -> Sync:
        best: tuple[int, int, int] | None = None  # (bracket width, offset, monotonic)
        for _ in range(self.samples):
            w0 = self._wall()
            m = self._mono()
            w1 = self._wall()
            width = w1 - w0
            if width < 0:  # the wall clock was stepped back inside the bracket: useless sample
                continue
            if best is None or width < best[0]:
                best = (width, (w0 + w1) // 2 - m, m)
        if best is None:
            raise RuntimeError("the wall clock went backwards during every sample; cannot convert kernel times")
        self.last = Sync(offset_ns=best[1], uncertainty_ns=(best[0] + 1) // 2, at_monotonic_ns=best[2])
        return self.last

    def maybe_resync(self) -> Sync:
        """Measure the offset again if the last measurement is older than `resync_s`."""
        if self._mono() - self.last.at_monotonic_ns >= self.resync_ns:
            return self.sync()
        return self.last

    def to_wall_ns(self, monotonic_ns: int) -> int:
        return monotonic_ns + self.last.offset_ns
