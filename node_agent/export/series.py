"""Running state of one metric's time series (attribute sets): temporality and the cardinality cap.

Every input is a delta (what happened since the last interval). Cumulative temporality keeps a running
total per series from the start of that series; delta temporality hands out what accumulated since the
last collection and starts again. A series belongs to an owner (a target) and is forgotten with it, so
that memory follows the live targets and not every pod the agent ever saw. A series is its owner and its
attribute set: the owner (the pod) is the resource its points are exported under, so two pods' points
may carry the same attributes.

At most `limit` series live at once. Further attribute sets are folded into one series with the
attributes {"otel.metric.overflow": true}, as the OpenTelemetry metrics SDK does at its cardinality limit:
totals stay right, the overflow shows as its own series and as a count, and it is logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from opentelemetry.sdk.metrics import Exemplar

from .attributes import OVERFLOW

log = logging.getLogger(__name__)

V = TypeVar("V")
Key = tuple[Hashable | None, tuple[tuple[str, Any], ...]]  # (owner, attribute set)
_OVERFLOW_KEY: Key = (None, tuple(sorted(OVERFLOW.items())))


@dataclass
class Series(Generic[V]):
    attributes: dict[str, Any]
    owner: Hashable | None
    start_ns: int
    value: V
    exemplars: list[Exemplar] = field(default_factory=list)
    touched: bool = False


@dataclass(frozen=True)
class Point(Generic[V]):
    attributes: dict[str, Any]
    owner: Hashable | None
    start_ns: int
    end_ns: int
    value: V
    exemplars: list[Exemplar]


class SeriesTable(Generic[V]):
    def __init__(self, metric: str, limit: int, cumulative: bool, zero: Callable[[], V],
                 add: Callable[[V, V], V]):
        if limit < 1:
            raise ValueError(f"series limit of {metric} must be at least 1, not {limit}")
        self.metric = metric
        self.limit = limit
        self.cumulative = cumulative
        self._zero = zero
        self._add = add
        self._series: dict[Key, Series[V]] = {}
        self._overflowed: set[Key] = set()  # attribute sets folded since the last collection
        self._warned = False

    def __len__(self) -> int:
        return len(self._series)

    def add(self, attributes: dict[str, Any], owner: Hashable | None, delta: V, start_ns: int,
            exemplars: Iterable[Exemplar] = ()) -> None:
        key: Key = (owner, tuple(sorted(attributes.items())))
        s = self._series.get(key)
        if s is None:
            # The overflow series does not count against the limit: it is what keeps the limit.
            if len(self._series) - (_OVERFLOW_KEY in self._series) >= self.limit:
                self._overflow(key)
                key, attributes, owner = _OVERFLOW_KEY, dict(OVERFLOW), None
                exemplars = ()  # an exemplar's span describes a pod that this series no longer names
                s = self._series.get(key)
            if s is None:
                s = self._series[key] = Series(dict(attributes), owner, start_ns, self._zero())
        s.value = self._add(s.value, delta)
        s.exemplars.extend(exemplars)
        s.touched = True

    def _overflow(self, key: Key) -> None:
        self._overflowed.add(key)
        if not self._warned:
            self._warned = True
            log.warning("metric %s reached its limit of %d series; further attribute sets are aggregated into "
                        "the series with otel.metric.overflow=true (raise the series limit to see them apart)",
                        self.metric, self.limit)

    def retain(self, live_owners: set[Hashable]) -> None:
        """Forget the series of owners that are gone (before adding, so that they free their places)."""
        for key in [k for k, s in self._series.items() if s.owner is not None and s.owner not in live_owners]:
            del self._series[key]

    def collect(self, end_ns: int) -> tuple[list[Point[V]], int]:
        """Points to export now, and how many attribute sets overflowed since the last collection."""
        points = []
        for s in self._series.values():
            if self.cumulative or s.touched:
                points.append(Point(s.attributes, s.owner, s.start_ns, end_ns, s.value, s.exemplars))
            s.exemplars = []
            s.touched = False
            if not self.cumulative:
                s.value = self._zero()
                s.start_ns = end_ns
        overflowed = len(self._overflowed)
        self._overflowed = set()
        return points, overflowed
