"""Intervals (plain data, no kernel) become the right OTLP metric points."""

from __future__ import annotations

import logging
import math

import pytest
from opentelemetry.sdk.metrics.export import AggregationTemporality

from latencytrace.node_agent import histogram
from latencytrace.node_agent.export import datapoints, metrics
from latencytrace.node_agent.export.clock import WallClock
from latencytrace.node_agent.export.metrics import MetricsBuilder, MetricsConfig
from latencytrace.node_agent.export.spans import SpanBuilder
from latencytrace.node_agent.kernel.bpfsys import ProgStats
from tests.export import fakes
from tests.export.fakes import SECOND, seg_id

POD_STACK = seg_id("rx_pod_stack")


def latency_points(built, owners=None):
    owners = owners or {o for pts in built.points.values() for o, _ in pts}
    for m in built.metrics(owners):
        if m.name == metrics.LATENCY.name:
            return m, list(m.data.data_points)
    return None, []


def latency_by_resource(built) -> list[tuple[dict, object]]:
    """(resource attributes of the point's owner, point) of every latency point."""
    out = []
    for owner, ms in built.by_owner({o for pts in built.points.values() for o, _ in pts}).items():
        for m in ms:
            if m.name == metrics.LATENCY.name:
                out.extend((built.resources.get(owner, {}), p) for p in m.data.data_points)
    return out


def number_points(built, inst) -> dict[tuple, float]:
    out = {}
    for m in built.metrics({o for pts in built.points.values() for o, _ in pts}):
        if m.name == inst.name:
            for p in m.data.data_points:
                out[tuple(sorted(p.attributes.items()))] = p.value
    return out


def bucket_of(point, value_s: float) -> int:
    """Count of the exponential bucket that holds value_s, computed from the OTLP definition."""
    base = 2 ** (2 ** -point.scale)
    index = math.ceil(math.log(value_s, base)) - 1
    return point.positive.bucket_counts[index - point.positive.offset]


def test_kernel_buckets_become_an_exponential_point_with_counts_and_sum_in_seconds():
    lat = [3_000, 3_100, 47_000, 47_000, 1_200_000, 0]
    t = fakes.pod_target(0)
    built = MetricsBuilder().build(fakes.interval([t], histograms={0: {POD_STACK: fakes.hist(*lat)}}))
    metric, [p] = latency_points(built)
    assert metric.unit == "s"
    assert isinstance(metric.data.aggregation_temporality, AggregationTemporality)
    assert p.scale == 3 and p.count == len(lat) and p.zero_count == 1
    assert p.sum == pytest.approx(sum(lat) / 1e9)
    # Every latency sits in the bucket the OpenTelemetry formula gives for its value in seconds.
    assert bucket_of(p, 3_000e-9) == 2  # 3.0 µs and 3.1 µs share a 9%-wide bucket
    assert bucket_of(p, 47_000e-9) == 2
    assert bucket_of(p, 1_200_000e-9) == 1
    assert sum(p.positive.bucket_counts) == 5
    # The pod is the point's resource, not its attributes (one resource per pod, semantic conventions).
    assert p.attributes == {"latencytrace.segment": "rx_pod_stack", "network.io.direction": "receive"}
    [(resource, _)] = latency_by_resource(built)
    assert resource == {"k8s.pod.name": "web", "k8s.pod.uid": "uid-web-0", "k8s.namespace.name": "shop"}


def test_bucket_index_matches_the_otlp_definition_over_the_whole_range():
    for ns in (8, 100, 1_000, 1_024, 65_536, 999_999, 1_000_000, 2**30, 10**10):
        idx = histogram.bucket_index(ns)
        lo, hi = histogram.bucket_bounds_s(idx)
        assert lo < ns / 1e9 <= hi * (1 + 1e-12), (ns, idx)


def three_intervals():
    """Two packets, then one, then none."""
    t = fakes.pod_target(0)
    i1 = fakes.interval([t], histograms={0: {POD_STACK: fakes.hist(5_000, 6_000)}})
    i2 = fakes.interval([t], start_ns=i1.end_ns, histograms={0: {POD_STACK: fakes.hist(7_000)}})
    return i1, i2, fakes.interval([t], start_ns=i2.end_ns, histograms={0: {POD_STACK: fakes.hist()}})


def test_cumulative_points_keep_running_totals_from_the_series_start():
    b = MetricsBuilder(MetricsConfig(temporality="cumulative"))
    i1, i2, i3 = three_intervals()
    b.build(i1)
    _, [p2] = latency_points(b.build(i2))
    m3, [p3] = latency_points(b.build(i3))
    assert m3.data.aggregation_temporality == AggregationTemporality.CUMULATIVE
    assert (p2.count, p3.count) == (3, 3)  # an idle interval still reports the totals
    assert p3.sum == pytest.approx(18_000e-9)
    assert p2.start_time_unix_nano == p3.start_time_unix_nano == i1.start_ns
    assert p3.time_unix_nano == i3.end_ns


def test_delta_points_report_each_interval_alone_and_skip_idle_series():
    b = MetricsBuilder(MetricsConfig(temporality="delta"))
    i1, i2, i3 = three_intervals()
    _, [p1] = latency_points(b.build(i1))
    m2, [p2] = latency_points(b.build(i2))
    assert m2.data.aggregation_temporality == AggregationTemporality.DELTA
    assert (p1.count, p2.count) == (2, 1)
    assert p2.start_time_unix_nano == i1.end_ns and p2.time_unix_nano == i2.end_ns
    assert latency_points(b.build(i3))[1] == []


def test_explicit_buckets_hold_the_same_packets_as_the_exponential_ones():
    lat = [900, 1_500, 3_000, 19_000, 21_000, 400_000, 400_000, 3_000_000_000, 0]
    t = fakes.pod_target(0)
    bounds = (1e-6, 2e-5, 1e-3, 1.0)
    b = MetricsBuilder(MetricsConfig(histogram="explicit", explicit_bounds_s=bounds))
    _, [p] = latency_points(b.build(fakes.interval([t], histograms={0: {POD_STACK: fakes.hist(*lat)}})))
    assert tuple(p.explicit_bounds) == bounds
    # (0,1µs]: 900ns and the zero; (1µs,20µs]: 1.5, 3, 19 µs; (20µs,1ms]: 21, 400, 400 µs; (1ms,1s]: none; >1s: 3 s.
    assert list(p.bucket_counts) == [2, 3, 3, 0, 1]
    assert p.count == len(lat) and p.sum == pytest.approx(sum(lat) / 1e9)


def test_explicit_boundaries_must_increase():
    with pytest.raises(ValueError, match="increasing"):
        datapoints.ExplicitBuckets((1e-3, 1e-4))


def test_standalone_targets_are_named_by_label_and_netns_inode_and_traces_by_name():
    pod = fakes.pod_target(0, traces=("shop/slow-rx", "ops/all"))
    ns = fakes.netns_target(1, "/run/netns/lab")
    b = MetricsBuilder(node_name="node-1")
    built = b.build(fakes.interval([pod, ns], histograms={0: {POD_STACK: fakes.hist(5_000)},
                                                          1: {POD_STACK: fakes.hist(5_000)}}))
    by_target = {r.get("k8s.pod.name") or r["latencytrace.target"]: (r, p.attributes)
                 for r, p in latency_by_resource(built)}
    assert by_target["web"][1]["latencytrace.trace"] == "ops/all,shop/slow-rx"
    assert "latencytrace.netns.inode" not in by_target["web"][0]
    assert by_target["/run/netns/lab"][0]["latencytrace.netns.inode"] == ns.ns.inode
    assert "k8s.pod.name" not in by_target["/run/netns/lab"][0]
    # Data points carry only segment, direction and trace: who and where is the resource's.
    for _, attrs in by_target.values():
        assert set(attrs) <= {"latencytrace.segment", "network.io.direction", "latencytrace.trace"}, attrs


def test_series_over_the_cap_fold_into_the_overflow_series_and_show(caplog):
    targets = [fakes.pod_target(slot, name=f"p{slot}") for slot in range(5)]
    b = MetricsBuilder(MetricsConfig(max_series=3))
    hists = {t.slot: {POD_STACK: fakes.hist(5_000, 5_000)} for t in targets}
    with caplog.at_level(logging.WARNING):
        built = b.build(fakes.interval(targets, histograms=hists))
        b.build(fakes.interval(targets, histograms=hists))
    _, points = latency_points(built)
    named = [p for p in points if "latencytrace.segment" in p.attributes]
    overflow = [p for p in points if p.attributes == {"otel.metric.overflow": True}]
    assert len(named) == 3 and len(overflow) == 1
    assert overflow[0].count == 4  # two pods' packets, none lost
    assert sum(p.count for p in points) == 10
    assert number_points(built, metrics.SERIES_OVERFLOW) == {
        (("latencytrace.metric", metrics.LATENCY.name),): 2}
    warnings = [r for r in caplog.records if "reached its limit of 3 series" in r.getMessage()]
    assert len(warnings) == 1, "the overflow is logged once, not every interval"


def test_series_of_removed_targets_are_forgotten_and_free_the_cap():
    a, b_ = fakes.pod_target(0, name="a"), fakes.pod_target(1, name="b")
    b = MetricsBuilder(MetricsConfig(max_series=1))
    b.build(fakes.interval([a], histograms={0: {POD_STACK: fakes.hist(5_000)}}))
    built = b.build(fakes.interval([b_], histograms={1: {POD_STACK: fakes.hist(5_000)}}))
    assert [r["k8s.pod.name"] for r, _ in latency_by_resource(built)] == ["b"]


def test_drops_count_per_reason_and_direction():
    t = fakes.pod_target(0)
    b = MetricsBuilder()
    b.build(fakes.interval([t], drops={(0, 0, 3): 4}))
    built = b.build(fakes.interval([t], drops={(0, 0, 3): 2, (0, 1, 2): 1}))
    got = number_points(built, metrics.DROPS)
    rx = {k: v for k, v in got.items() if ("network.io.direction", "receive") in k}
    tx = {k: v for k, v in got.items() if ("network.io.direction", "transmit") in k}
    assert list(rx.values()) == [6] and ("error.type", "NO_SOCKET") in next(iter(rx))
    assert list(tx.values()) == [1] and ("error.type", "NOT_SPECIFIED") in next(iter(tx))


def test_probe_cost_and_agent_health_from_cumulative_kernel_counters():
    t = fakes.pod_target(0)
    for temporality, expect_runs, expect_lost in (("cumulative", 30, 7), ("delta", 20, 5)):
        b = MetricsBuilder(MetricsConfig(temporality=temporality))
        b.build(fakes.interval([t], counters={"events_lost": 2, "rate_limited": 0, "stale_flights": 1},
                               probes={"lt_a": ProgStats(10, 1_000)}))
        built = b.build(fakes.interval([t], counters={"events_lost": 7, "rate_limited": 3, "stale_flights": 1},
                                       probes={"lt_a": ProgStats(30, 4_000_000_000)}, overflow_targets=2))
        runs = number_points(built, metrics.PROBE_RUNS)
        assert runs == {(("latencytrace.probe", "lt_a"),): expect_runs}
        cpu = number_points(built, metrics.PROBE_TIME)[(("latencytrace.probe", "lt_a"),)]
        assert cpu == pytest.approx(4.0 if temporality == "cumulative" else 3.999999)
        events = number_points(built, metrics.EVENTS_DROPPED)
        assert events[(("error.type", "ring_buffer_full"),)] == expect_lost
        assert number_points(built, metrics.ANOMALIES)[(("error.type", "stale_flight"),)] == (
            1 if temporality == "cumulative" else 0)
        assert number_points(built, metrics.TARGET_OVERFLOW) == {(): 2}
        assert number_points(built, metrics.TARGETS) == {(): 1 if temporality == "cumulative" else 0}


def test_an_unknown_kernel_counter_is_exported_not_dropped():
    b = MetricsBuilder()
    built = b.build(fakes.interval([], counters={"new_thing": 5}))
    assert number_points(built, metrics.AGENT_COUNTER) == {(("latencytrace.counter", "new_thing"),): 5}


def test_exemplars_carry_the_span_ids_of_the_packet_and_the_segment_latency():
    t = fakes.pod_target(0)
    clock = WallClock()
    ev = fakes.rx_event(0, 50 * SECOND)
    traces = SpanBuilder(clock).build(fakes.interval([t], events=[ev]))
    hists = {0: {sid: fakes.hist(10_000) for sid in (POD_STACK, seg_id("rx_total"), seg_id("rx_irq"))}}
    _, points = latency_points(MetricsBuilder().build(fakes.interval([t], histograms=hists), traces))
    [trace] = traces
    spans = {s.context.span_id: s for s in trace.spans(resource=None, scope=None)}
    by_seg = {p.attributes["latencytrace.segment"]: p for p in points}
    for seg, point in by_seg.items():
        [ex] = point.exemplars
        assert ex.trace_id == trace.trace_id
        span = spans[ex.span_id]
        assert span.name == ("receive packet" if seg == "rx_total" else seg)
        assert ex.value == pytest.approx((span.end_time - span.start_time) / 1e9)
        assert ex.time_unix_nano == span.end_time
    assert by_seg["rx_pod_stack"].exemplars[0].value == pytest.approx(4_000e-9)


def test_exemplars_per_point_are_capped_keeping_the_slowest_buckets():
    t = fakes.pod_target(0, spans_per_second=1000)
    events = [fakes.rx_event(0, (50 + i) * SECOND, steps_ns=(1_000, 1_000, 1_000, 1_000 * (i + 1), 1_000))
              for i in range(40)]
    traces = SpanBuilder(WallClock()).build(fakes.interval([t], events=events))
    b = MetricsBuilder(MetricsConfig(max_exemplars=4))
    _, points = latency_points(b.build(fakes.interval([t], histograms={0: {POD_STACK: fakes.hist(1_000)}}), traces))
    values = sorted(e.value for e in points[0].exemplars)
    assert len(values) == 4
    assert values[-1] == pytest.approx(40_000e-9)
    assert len({histogram.bucket_index(round(v * 1e9)) for v in values}) == 4


def test_metric_names_units_and_kinds_follow_the_conventions():
    for inst in metrics.instruments():
        assert inst.name.startswith("latencytrace.") and inst.name == inst.name.lower()
        assert inst.unit in ("s", "1") or (inst.unit.startswith("{") and inst.unit.endswith("}")), inst
        assert not inst.name.endswith((".total", "_total", ".seconds"))
    assert metrics.LATENCY.name.endswith(".duration") and metrics.LATENCY.unit == "s"


def test_packet_counts_are_exported_and_sampled_histograms_say_one_in_n():
    """Timing 1 packet in N: the packet counter has every packet, the histogram points carry N."""
    import dataclasses

    full, sampled = fakes.pod_target(0, "full"), fakes.pod_target(1, "sampled")
    sampled = dataclasses.replace(sampled, settings=dataclasses.replace(sampled.settings, time_one_in=8))
    i = fakes.interval([full, sampled], histograms={0: {POD_STACK: fakes.hist(5_000)}, 1: {POD_STACK: fakes.hist(6_000)}})
    i.packets = {0: (1, 0), 1: (8, 3)}
    built = MetricsBuilder().build(i)
    _, points = latency_points(built)
    by_n = sorted(p.attributes.get("latencytrace.time_one_in", 1) for p in points)
    assert by_n == [1, 8]
    counts = {}
    for owner, ms in built.by_owner({o for pts in built.points.values() for o, _ in pts}).items():
        for m in ms:
            if m.name == "latencytrace.network.packet.count":
                assert m.unit == "{packet}" and m.data.is_monotonic
                for p in m.data.data_points:
                    counts[(owner, p.attributes["network.io.direction"])] = p.value
    assert sorted(counts.values()) == [1, 3, 8] and len(counts) == 3, counts  # no point for a zero count
