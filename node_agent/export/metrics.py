"""An agent Interval as OTLP metrics: the latency histograms per pod and segment, drops, probe cost and
the agent's health.

Names follow the OpenTelemetry semantic conventions where one exists (attributes) and their style where
none does (metrics): our own names under `latencytrace.`, time histograms named `*.duration` in seconds,
counters of things in curly-brace units. node_agent/export/README.md documents each one and why.

Work per interval grows with the number of series (targets x segments), never with the packet rate:
the kernel did the counting, user space only adds bucket arrays.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from opentelemetry.sdk.metrics import Exemplar
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    ExponentialHistogram,
    Gauge,
    Histogram,
    Metric,
    NumberDataPoint,
    Sum,
)

from .. import segments
from ..agent import Interval
from ..histogram import SegmentHistogram
from . import attributes as a, datapoints
from .series import Point, SeriesTable
from .spans import PacketTrace, target_key

NODE = "node"  # owner of the agent's own metrics (not tied to a target)

Kind = Literal["histogram", "counter", "updowncounter", "gauge"]


@dataclass(frozen=True)
class Instrument:
    name: str
    kind: Kind
    unit: str
    description: str


LATENCY = Instrument("latencytrace.network.stack.duration", "histogram", "s",
                     "Time packets spent in one segment of the Linux network stack, per pod and segment.")
PACKETS = Instrument("latencytrace.network.packet.count", "counter", "{packet}",
                     "Packets of the pod counted where they enter or leave it, every one whether timed or not "
                     "(with latencytrace.time_one_in N > 1 the latency histograms hold about 1 in N of them).")
DROPS = Instrument("latencytrace.network.packet.dropped", "counter", "{packet}",
                   "Packets of the pod freed by the kernel as dropped, by drop reason (error.type).")
PROBE_TIME = Instrument("latencytrace.probe.cpu.time", "counter", "s",
                        "CPU time spent in each eBPF program of the agent, as measured by the kernel.")
PROBE_RUNS = Instrument("latencytrace.probe.run.count", "counter", "{run}",
                        "Times each eBPF program of the agent ran.")
TARGETS = Instrument("latencytrace.target.count", "updowncounter", "{target}",
                     "Network namespaces (pods) the agent traces now.")
TARGET_OVERFLOW = Instrument("latencytrace.target.overflow", "counter", "{target}",
                             "Targets refused because all of the agent's target slots were in use.")
EVENTS_DROPPED = Instrument("latencytrace.event.dropped", "counter", "{event}",
                            "Slow-packet events (would-be spans) that were not exported, by cause (error.type).")
ANOMALIES = Instrument("latencytrace.measurement.anomaly", "counter", "{measurement}",
                       "Measurements the kernel could not take as they were, by kind (error.type).")
AGENT_COUNTER = Instrument("latencytrace.agent.counter", "counter", "{count}",
                           "Kernel counters of the agent without a metric of their own (latencytrace.counter).")
SERIES_OVERFLOW = Instrument("latencytrace.metric.series.overflow", "gauge", "{series}",
                             "Attribute sets aggregated into the otel.metric.overflow series in the last interval, "
                             "by metric (latencytrace.metric).")
EXPORT_DROPPED = Instrument("latencytrace.export.batch.dropped", "counter", "{batch}",
                            "Export batches lost on the way to an OTLP endpoint, by cause (error.type).")

# Kernel and reader counters (Interval.counters, cumulative) -> (metric, error.type).
COUNTERS: dict[str, tuple[Instrument, str]] = {
    "events_lost": (EVENTS_DROPPED, "ring_buffer_full"),
    "rate_limited": (EVENTS_DROPPED, "kernel_rate_limit"),
    "events_dropped_userspace": (EVENTS_DROPPED, "reader_queue_full"),
    "stale_flights": (ANOMALIES, "stale_flight"),
    "clamped": (ANOMALIES, "clamped"),
    "negative": (ANOMALIES, "negative"),
}

Totals = dict[tuple[Instrument, tuple[tuple[str, object], ...]], int]


@dataclass(frozen=True)
class MetricsConfig:
    temporality: Literal["cumulative", "delta"] = "cumulative"
    histogram: Literal["exponential", "explicit"] = "exponential"
    explicit_bounds_s: tuple[float, ...] = datapoints.DEFAULT_EXPLICIT_BOUNDS_S
    max_series: int = 4096  # per metric
    max_exemplars: int = 8  # per data point


@dataclass
class Built:
    """One interval's points, by owner, ready to be cut per destination."""

    temporality: AggregationTemporality
    explicit: bool  # histograms have explicit buckets rather than exponential ones
    points: dict[Instrument, list[tuple[Hashable, object]]] = field(default_factory=dict)  # (owner, data point)
    # Resource attributes of each target owner (the pod); NODE's points are the agent's own.
    resources: dict[Hashable, dict[str, object]] = field(default_factory=dict)

    def metrics(self, owners: set[Hashable]) -> list[Metric]:
        """The metrics of `owners`' points together (one resource for all of them)."""
        out = []
        for inst, pts in self.points.items():
            selected = [p for owner, p in pts if owner in owners]
            if selected:
                out.append(Metric(inst.name, inst.description, inst.unit, self._data(inst, selected)))
        return out

    def by_owner(self, owners: set[Hashable]) -> dict[Hashable, list[Metric]]:
        """The metrics of each of `owners` apart, as each is its own resource; one pass over the points."""
        grouped: dict[Hashable, dict[Instrument, list]] = {}
        for inst, pts in self.points.items():
            for owner, p in pts:
                if owner in owners:
                    grouped.setdefault(owner, {}).setdefault(inst, []).append(p)
        return {owner: [Metric(inst.name, inst.description, inst.unit, self._data(inst, pts))
                        for inst, pts in per_inst.items()]
                for owner, per_inst in grouped.items()}

    def _data(self, inst: Instrument, pts: list):
        if inst.kind == "histogram":
            kind = Histogram if self.explicit else ExponentialHistogram
            return kind(data_points=pts, aggregation_temporality=self.temporality)
        if inst.kind == "gauge":
            return Gauge(data_points=pts)
        return Sum(data_points=pts, aggregation_temporality=self.temporality,
                   is_monotonic=inst.kind == "counter")


def _add_hist(total: SegmentHistogram, delta: SegmentHistogram) -> SegmentHistogram:
    total.merge(delta)
    return total


class MetricsBuilder:
    def __init__(self, config: MetricsConfig = MetricsConfig(), node_name: str | None = None):
        self.config = config
        self.node_name = node_name
        cumulative = config.temporality == "cumulative"
        self.temporality = AggregationTemporality.CUMULATIVE if cumulative else AggregationTemporality.DELTA
        self._explicit = (datapoints.ExplicitBuckets(config.explicit_bounds_s)
                          if config.histogram == "explicit" else None)
        self._latency: SeriesTable[SegmentHistogram] = SeriesTable(
            LATENCY.name, config.max_series, cumulative, SegmentHistogram, _add_hist)
        self._counters: dict[Instrument, SeriesTable[int]] = {}
        self._cumulative = cumulative
        self._previous: Totals = {}  # last reading of each cumulative source, to take deltas from

    def _table(self, inst: Instrument) -> SeriesTable[int]:
        t = self._counters.get(inst)
        if t is None:
            t = self._counters[inst] = SeriesTable(inst.name, self.config.max_series, self._cumulative,
                                                   int, lambda x, y: x + y)
        return t

    def build(self, interval: Interval, traces: Iterable[PacketTrace] = (), totals: Totals | None = None) -> Built:
        """`traces`: this interval's exported packet traces (their spans become exemplars); `totals`:
        cumulative counts kept outside the interval (span and export drops), as {(metric, attrs): n}."""
        start, end = interval.start_ns, interval.end_ns
        exemplars: dict[tuple[Hashable, int], list[Exemplar]] = {}
        for tr in traces:
            for seg_id, ex in tr.exemplars():
                exemplars.setdefault((tr.owner, seg_id), []).append(ex)
        live = {target_key(t) for t in interval.targets.values()}
        for table in (self._latency, *self._counters.values()):
            table.retain(live)
        for slot in sorted(interval.targets):
            target = interval.targets[slot]
            owner = target_key(target)
            base = a.target_point_attributes(target)
            rx_tx = interval.packets.get(slot)
            for direction, n in enumerate(rx_tx or ()):
                if n:
                    self._table(PACKETS).add({**base, a.NETWORK_IO_DIRECTION: segments.Direction(direction).otel},
                                             owner, n, start)
            if target.settings.time_one_in > 1:
                base = {**base, a.TIME_ONE_IN: target.settings.time_one_in}
            for seg_id, h in sorted(interval.histograms.get(slot, {}).items()):
                ex = exemplars.get((owner, seg_id), [])
                if not h.count and not ex:
                    continue
                seg = segments.SEGMENTS[seg_id]
                attrs = {**base, a.SEGMENT: seg.name, a.NETWORK_IO_DIRECTION: seg.direction.otel}
                self._latency.add(attrs, owner, h, start, ex)
        for (slot, direction, reason), n in sorted(interval.drops.items()):
            target = interval.targets.get(slot)
            if target is None or not n:
                continue
            attrs = {**a.target_point_attributes(target),
                     a.NETWORK_IO_DIRECTION: segments.Direction(direction).otel,
                     a.ERROR_TYPE: interval.drop_reasons.get(reason, str(reason))}
            self._table(DROPS).add(attrs, target_key(target), n, start)
        self._node_counters(interval, totals or {}, start)
        built = self._collect(end, interval)
        built.resources = {target_key(t): a.target_resource(t) for t in interval.targets.values()}
        return built

    def _node_counters(self, interval: Interval, extra: Totals, start: int) -> None:
        now: Totals = dict(extra)
        for name, value in interval.counters.items():
            inst, error = COUNTERS.get(name, (AGENT_COUNTER, None))
            key = ((a.ERROR_TYPE, error),) if error else ((a.COUNTER, name),)
            now[(inst, key)] = now.get((inst, key), 0) + value
        for prog, stats in interval.probes.items():
            now[(PROBE_RUNS, ((a.PROBE, prog),))] = stats.run_cnt
            now[(PROBE_TIME, ((a.PROBE, prog),))] = stats.run_time_ns  # ns here, seconds on the way out
        now[(TARGET_OVERFLOW, ())] = interval.overflow_targets
        now[(TARGETS, ())] = len(interval.targets)
        for (inst, key), value in now.items():
            delta = value - self._previous.get((inst, key), 0)
            if delta < 0 and inst.kind == "counter":
                delta = value  # the source restarted (a reloaded program): count from zero
            self._previous[(inst, key)] = value
            self._table(inst).add(dict(key), None, delta, start)

    def _collect(self, end: int, interval: Interval) -> Built:
        built = Built(self.temporality, explicit=self._explicit is not None)
        points, overflow = self._latency.collect(end)
        if points:
            built.points[LATENCY] = [(p.owner or NODE, self._histogram_point(p)) for p in points]
        overflows = {LATENCY.name: overflow}
        for inst, table in self._counters.items():
            pts, overflows[inst.name] = table.collect(end)
            if not pts:
                continue
            scale = 1e-9 if inst is PROBE_TIME else 1  # kept in integer ns so that deltas are exact
            built.points[inst] = [(p.owner or NODE, self._number_point(p, scale)) for p in pts]
        built.points[SERIES_OVERFLOW] = [
            (NODE, NumberDataPoint({a.METRIC: name}, interval.start_ns, end, n))
            for name, n in sorted(overflows.items()) if n]
        return built

    def _histogram_point(self, p: Point[SegmentHistogram]):
        ex = datapoints.select_exemplars(p.exemplars, self.config.max_exemplars)
        if self._explicit is not None:
            return self._explicit.point(p.value, p.attributes, p.start_ns, p.end_ns, ex)
        return datapoints.exponential(p.value, p.attributes, p.start_ns, p.end_ns, ex)

    def _number_point(self, p: Point[int], scale: float) -> NumberDataPoint:
        value = p.value * scale if scale != 1 else p.value
        return NumberDataPoint(p.attributes, p.start_ns, p.end_ns, value, [])


def instruments() -> list[Instrument]:
    """Every metric this module can emit (for the README and its test)."""
    return [v for v in globals().values() if isinstance(v, Instrument)]

