"""The in-cluster agent's pure parts: node spec to targets, merged settings, status reports."""

import pytest

from latencytrace.node_agent import cluster, segments
from latencytrace.node_agent.agent import TargetState
from latencytrace.node_agent.contract import NodeSpec, NodeTrace, PodRef, TraceSettings
from latencytrace.node_agent.targets import PodLocator


def trace(uid, pods, **settings):
    return NodeTrace(name=f"t-{uid}", namespace="app", uid=uid,
                     pods=[PodRef(namespace="app", name=p, uid=f"u-{p}", ips=["10.0.0.1"]) for p in pods], **settings)


def test_a_pod_in_two_traces_is_one_target_with_merged_settings():
    spec = NodeSpec(node_name="n1", traces=[
        trace("1", ["a", "b"], directions=["receive"], segments=["rx_total"], slow_threshold_microseconds=500,
              spans_per_second=5, sample_one_in=100, time_one_in=8),
        trace("2", ["a"], directions=["transmit"], segments=[], slow_threshold_microseconds=2000,
              spans_per_second=20, sample_one_in=0)])
    targets = {d.key: d for d in cluster.desired_targets(spec, PodLocator())}
    assert sorted(targets) == ["pod:u-a", "pod:u-b"]
    a = targets["pod:u-a"]
    assert a.traces == ("app/t-1", "app/t-2") and a.label == "app/a"
    assert a.settings.slow_ns == 500_000 and a.settings.events_per_sec == 20 and a.settings.sample_one_in == 100
    assert a.settings.time_one_in == 1 and b_time_one_in(targets) == 8  # a: trace 2 times every packet
    assert a.settings.dir_mask == 0b11
    tx = segments.mask([s.name for s in segments.segments_of(segments.Direction.TX)])
    assert a.settings.seg_mask == segments.mask(["rx_total"]) | tx  # receive: rx_total only; transmit: all tx
    b = targets["pod:u-b"]
    assert b.settings.dir_mask == 0b01 and b.settings.seg_mask == segments.mask(["rx_total"])


def b_time_one_in(targets) -> int:
    return targets["pod:u-b"].settings.time_one_in


def test_a_node_entry_with_a_bad_time_one_in_fails_that_trace_only():
    for bad in (0, 1_000_001):
        why = cluster.trace_problem(trace("1", ["a"], time_one_in=bad))
        assert why == "timeOneIn must be 1 to 1000000", why
    assert cluster.trace_problem(trace("1", ["a"], time_one_in=8)) is None


def test_segments_outside_the_directions_are_not_recorded():
    assert cluster.segment_mask(TraceSettings(directions=["receive"])) == \
        segments.mask([s.name for s in segments.segments_of(segments.Direction.RX)])


def test_reports_follow_the_spec_with_the_agent_states():
    spec = NodeSpec(node_name="n1", traces=[trace("1", ["a", "b", "c"])])
    states = {"pod:u-a": TargetState("pod:u-a", "Tracing"), "pod:u-b": TargetState("pod:u-b", "NotFound", "no netns")}
    [report] = cluster.trace_reports(spec.traces, states)
    assert [(p.name, p.state) for p in report.pods] == [("a", "Tracing"), ("b", "NotFound"), ("c", "Pending")]
    assert report.pods_tracing == 1 and report.pods[1].message == "no netns"


def test_ready_condition():
    probes = cluster.probe_report(None)
    idle = cluster.ready_condition(failure=None, loaded=False, targets_n=0, probes=probes, generation=3)
    assert (idle.status, idle.reason, idle.observed_generation) == ("True", "Idle", 3)
    failed = cluster.ready_condition(failure=("TracerFailed", "no BTF"), loaded=False, targets_n=0, probes=probes,
                                     generation=3)
    assert (failed.status, failed.reason, failed.message) == ("False", "TracerFailed", "no BTF")


def test_merged_settings_stay_within_the_administrators_limits():
    """The merge rule (README "Tenant isolation"): one pod's traces are its own namespace's LatencyTraces and
    administrators' ClusterLatencyTraces only (no other tenant's trace can select it), and the kernel runs the
    most demanding of their settings; each was accepted within the limits, so the merge is within them too."""
    from latencytrace.operator import spec as specs

    from latencytrace.node_agent import segments

    allowed = {"rx_host_to_pod", "rx_socket_queue", "rx_total", "tx_pod_to_host"}
    limits = specs.Limits(min_slow_threshold_microseconds=100, max_spans_per_second=20, min_sample_one_in=1000,
                          min_time_one_in=4, allowed_segments=frozenset(allowed))
    asked = [{"slowThresholdMicroseconds": 100, "spansPerSecond": 20, "sampleOneIn": 0, "timeOneIn": 64,
              "segments": ["rx_total"]},
             {"slowThresholdMicroseconds": 5000, "spansPerSecond": 1, "sampleOneIn": 1000, "timeOneIn": 4,
              "segments": ["rx_host_to_pod", "tx_pod_to_host"]},
             {"slowThresholdMicroseconds": 150, "spansPerSecond": 5, "sampleOneIn": 50_000, "timeOneIn": 8,
              "segments": ["rx_socket_queue"]}]
    settings = [specs.parse({"podNames": ["a"], **a}, limits).settings() for a in asked]
    merged = cluster.merge_settings(settings)
    assert merged.slow_ns >= limits.min_slow_threshold_microseconds * 1000
    assert merged.events_per_sec <= limits.max_spans_per_second
    assert merged.sample_one_in == 0 or merged.sample_one_in >= limits.min_sample_one_in
    assert merged.time_one_in == 4 >= limits.min_time_one_in  # the finest timing asked, never finer than allowed
    assert merged.seg_mask == segments.mask(allowed)  # what they asked together, and only what is allowed
    for over in ({"slowThresholdMicroseconds": 99}, {"spansPerSecond": 21}, {"sampleOneIn": 999}, {"timeOneIn": 3},
                 {"segments": ["rx_irq"]}, {"segments": []}):
        with pytest.raises(specs.SpecError):
            specs.parse({"podNames": ["a"], "segments": ["rx_total"], "timeOneIn": 4, **over}, limits)
