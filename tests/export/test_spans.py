"""Slow-packet events (plain data) become traces with exact kernel times and a bounded rate."""

from __future__ import annotations

import dataclasses

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import StatusCode

from latencytrace.node_agent.export.clock import WallClock
from latencytrace.node_agent.export.spans import SpanBuilder
from tests.export import fakes
from tests.export.fakes import SECOND

SCOPE = InstrumentationScope("test")


def build(events, target=None, clock=None, **kw):
    target = target or fakes.pod_target(0)
    builder = SpanBuilder(clock or WallClock(), node_name="node-1", if_name=lambda i: {7: "lth0"}.get(i), **kw)
    return builder, builder.build(fakes.interval([target], events=events))


def test_root_spans_the_packet_and_children_are_its_segments_at_the_kernel_times():
    clock = WallClock()
    ev = fakes.rx_event(0, 1234 * SECOND + 17)
    irq, softirq, host_rx, pod_rx, sock_ready, app_read = ev.ts  # the kernel's raw boundary timestamps
    _, [trace] = build([ev], clock=clock)
    root, *children = trace.spans(Resource.create({}), SCOPE)
    wall = clock.last.offset_ns  # one offset for the whole packet: the span edges are the kernel's times
    assert root.name == "receive packet" and root.parent is None
    assert (root.start_time, root.end_time) == (irq + wall, app_read + wall)
    assert {c.name: (c.start_time - wall, c.end_time - wall) for c in children} == {
        "rx_irq": (irq, softirq), "rx_driver": (softirq, host_rx), "rx_host_to_pod": (host_rx, pod_rx),
        "rx_pod_stack": (pod_rx, sock_ready), "rx_socket_queue": (sock_ready, app_read)}
    for c in children:
        assert c.parent.span_id == root.context.span_id and c.context.trace_id == root.context.trace_id
        assert c.attributes["latencytrace.segment"] == c.name
    # The boundaries themselves are events on the root, at their exact times.
    assert [(e.name, e.timestamp - wall) for e in root.events] == [
        ("irq", irq), ("softirq", softirq), ("host_rx", host_rx), ("pod_rx", pod_rx), ("sock_ready", sock_ready),
        ("app_read", app_read)]


def test_without_a_host_side_sighting_the_driver_span_ends_in_the_pod():
    clock = WallClock()
    ev = fakes.rx_event(0, 50 * SECOND)
    ts = list(ev.ts)
    ts[2] = 0  # host_rx not seen: sent from the host itself
    ev = dataclasses.replace(ev, ts=tuple(ts))
    irq, softirq, _, pod_rx, sock_ready, app_read = ev.ts
    _, [trace] = build([ev], clock=clock)
    root, *children = trace.spans(Resource.create({}), SCOPE)
    wall = clock.last.offset_ns
    assert {c.name: (c.start_time - wall, c.end_time - wall) for c in children} == {
        "rx_irq": (irq, softirq), "rx_driver": (softirq, pod_rx), "rx_pod_stack": (pod_rx, sock_ready),
        "rx_socket_queue": (sock_ready, app_read)}
    assert [e.name for e in root.events] == ["irq", "softirq", "pod_rx", "sock_ready", "app_read"]


def test_root_attributes_describe_the_packet():
    _, [trace] = build([fakes.rx_event(0, 10 * SECOND)])
    root = trace.spans(Resource.create({}), SCOPE)[0]
    attrs = dict(root.attributes)
    assert not [k for k in attrs if k.startswith("k8s.")], "the pod is the spans' resource, not an attribute"
    assert attrs["latencytrace.netns.inode"] == 4026530000
    assert attrs["network.io.direction"] == "receive" and attrs["network.transport"] == "udp"
    assert attrs["network.type"] == "ipv4"
    assert (attrs["source.address"], attrs["source.port"]) == ("10.0.0.9", 40000)
    assert (attrs["destination.address"], attrs["destination.port"]) == ("10.0.0.2", 9000)
    assert attrs["latencytrace.packet.length"] == 92
    assert (attrs["latencytrace.cpu.first"], attrs["latencytrace.cpu.last"]) == (0, 1)
    assert attrs["latencytrace.device.host.ifindex"] == 7 and attrs["latencytrace.device.host.name"] == "lth0"
    assert attrs["latencytrace.device.pod.ifindex"] == 2
    assert "latencytrace.device.pod.name" not in attrs  # an index inside the pod means nothing on the host
    assert attrs["latencytrace.event.kind"] == "slow"
    assert root.status.status_code is StatusCode.UNSET


def test_a_dropped_packet_is_an_error_span_with_the_drop_reason():
    clock = WallClock()
    ev = fakes.rx_event(0, 10 * SECOND, steps_ns=(2_000, 5_000, 30_000), kind="drop", drop_reason=3)
    irq, softirq, host_rx, pod_rx, *_ = ev.ts
    _, [trace] = build([ev], clock=clock)
    root, *children = trace.spans(Resource.create({}), SCOPE)
    assert root.status.status_code is StatusCode.ERROR
    assert root.attributes["error.type"] == "NO_SOCKET" and root.attributes["latencytrace.event.kind"] == "drop"
    wall = clock.last.offset_ns
    assert (root.start_time - wall, root.end_time - wall) == (irq, pod_rx)  # up to the last boundary seen
    assert {c.name: (c.start_time - wall, c.end_time - wall) for c in children} == {
        "rx_irq": (irq, softirq), "rx_driver": (softirq, host_rx), "rx_host_to_pod": (host_rx, pod_rx)}


def test_span_rate_is_capped_per_target_per_second_of_packet_time():
    t = fakes.pod_target(0, spans_per_second=5)
    other = fakes.pod_target(1, name="other", spans_per_second=5)
    # 20 packets within 0.1 s for one pod, then 20 spread over 4 s; 3 for the other pod.
    burst = [fakes.rx_event(0, 100 * SECOND + i * SECOND // 200) for i in range(20)]
    spread = [fakes.rx_event(0, 101 * SECOND + i * SECOND // 5) for i in range(20)]
    others = [fakes.rx_event(1, 100 * SECOND + i) for i in range(3)]
    builder = SpanBuilder(WallClock())
    got = builder.build(fakes.interval([t, other], events=burst + others))
    assert sum(tr.owner == (0, t.added_ns) for tr in got) == 5
    assert sum(tr.owner == (1, other.added_ns) for tr in got) == 3
    got = builder.build(fakes.interval([t, other], events=spread))
    assert 19 <= len(got) <= 20  # one per 0.2 s is exactly the rate
    assert builder.rate_limited == 15 + 20 - len(got)


def test_events_of_a_removed_target_are_counted_not_exported():
    builder = SpanBuilder(WallClock())
    assert builder.build(fakes.interval([fakes.pod_target(0)], events=[fakes.rx_event(5, 10 * SECOND)])) == []
    assert builder.unknown_target == 1


def test_trace_and_span_ids_are_unique():
    events = [fakes.rx_event(0, (10 + i) * SECOND) for i in range(10)]
    _, traces = build(events, target=fakes.pod_target(0, spans_per_second=100))
    spans = [s for tr in traces for s in tr.spans(Resource.create({}), SCOPE)]
    assert len({s.context.trace_id for s in spans}) == 10
    assert len({s.context.span_id for s in spans}) == len(spans) == 60


def test_a_target_allowed_no_spans_gets_none():
    builder = SpanBuilder(WallClock())
    target = fakes.pod_target(0, spans_per_second=0)
    assert builder.build(fakes.interval([target], events=[fakes.rx_event(0, 10 * SECOND)])) == []
    assert builder.rate_limited == 1


def test_a_packets_spans_made_later_say_what_held_when_it_was_read():
    """Spans are made when they are sent (export.worker), possibly seconds later: the traces that selected
    the pod then are the packet's, not those of a later change to the target."""
    from latencytrace.node_agent.export import attributes

    target = fakes.pod_target(0, traces=("shop/first",))
    _, [trace] = build([fakes.rx_event(0, 10 * SECOND)], target=target)
    target.traces = ("shop/second",)  # the registry updates its targets in place
    root = trace.spans(Resource.create({}), SCOPE)[0]
    assert root.attributes[attributes.TRACE] == "shop/first"
