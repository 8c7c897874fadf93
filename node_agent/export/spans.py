"""Slow-packet events as traces: one root span per packet, one child span per segment it crossed.

The kernel already caps events per target; a token bucket per target here bounds the spans that leave
the agent to `spans_per_second` of *packet* time (the events of a whole interval are handled at once, so
the agent's own clock would let a burst through and then starve). Spans over the cap are counted.

Every timestamp of one packet is converted with the same clock offset, so that span boundaries are the
kernel's boundaries exactly, shifted as a whole. Each segment's span is also an exemplar for that
segment's histogram point: the exemplar carries its trace and span id and the segment's latency.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from opentelemetry import trace as trace_api
from opentelemetry.sdk.metrics import Exemplar
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Status, StatusCode

from .. import segments
from ..agent import Interval
from ..events import PacketEvent
from ..segments import Direction
from ..targets import Target
from . import attributes as a
from .clock import WallClock

# Which device each ifindex slot of an event names, by direction (see PacketEvent.ifindex).
_DEVICES = {Direction.RX: ("host", "pod", None), Direction.TX: ("pod", "host", "egress")}
# Devices outside the pod: their index means something in the agent's (the host's) namespace.
_HOST_SIDE = {"host", "egress"}
_SAMPLED = trace_api.TraceFlags(trace_api.TraceFlags.SAMPLED)


def target_key(target: Target) -> Hashable:
    """One occupant of a slot (slots are reused by later targets)."""
    return (target.slot, target.added_ns)


def root_name(direction: Direction) -> str:
    return f"{direction.otel} packet"


def _if_name(ifindex: int) -> str | None:
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return None


class TokenBucket:
    def __init__(self, rate: float, now_ns: int):
        self.rate = rate
        self.tokens = float(max(rate, 1.0))  # a full second's worth to start, as the burst size
        self.at_ns = now_ns

    def take(self, now_ns: int) -> bool:
        if self.rate <= 0:
            return False
        if now_ns > self.at_ns:
            self.tokens = min(float(max(self.rate, 1.0)), self.tokens + (now_ns - self.at_ns) * self.rate / 1e9)
            self.at_ns = now_ns
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass(frozen=True, slots=True)
class SegmentSpan:
    segment: segments.Segment
    span_id: int
    start_ns: int  # wall clock
    end_ns: int


@dataclass(frozen=True, slots=True)
class PacketTrace:
    """One packet's trace, independent of the resource it is exported under.

    It keeps the kernel's event and the ids it was given, and makes its spans only when they are sent:
    a trace waiting in an export queue takes a quarter of its spans' memory (1.3 KiB against 5.2 KiB for
    the SDK's ReadableSpans of a root and five segments, measured with tracemalloc), so a queue behind a
    slow backend holds four times the packets in the same memory, and a packet queued for several
    destinations is held once."""

    owner: Hashable
    trace_id: int
    span_id: int
    event: PacketEvent
    traces: tuple[str, ...]  # the LatencyTraces that selected the pod when the packet was read (Target.traces)
    inode: int  # the pod's network namespace
    offset_ns: int  # CLOCK_MONOTONIC -> wall clock, one offset for the whole packet: relative times stay exact
    child_ids: tuple[int, ...]  # the span id of each segment the packet crossed, in the direction's order
    error: str | None  # a dropped packet's reason
    describe: Callable[[PacketEvent, tuple[str, ...], int], dict]  # the root's attributes (SpanBuilder.attributes)

    @property
    def name(self) -> str:
        return root_name(self.event.direction)

    @property
    def start_ns(self) -> int:
        return self.event.first_ns + self.offset_ns

    @property
    def end_ns(self) -> int:
        return self.event.last_ns + self.offset_ns

    @property
    def children(self) -> tuple[SegmentSpan, ...]:
        return self._children(self.event.segment_times())

    def _children(self, times: dict[str, tuple[int, int]]) -> tuple[SegmentSpan, ...]:
        off = self.offset_ns
        return tuple(SegmentSpan(seg, span_id, times[seg.name][0] + off, times[seg.name][1] + off)
                     for seg, span_id in zip(_crossed(self.event.direction, times), self.child_ids))

    @property
    def status(self) -> Status:
        if self.error is None:
            return Status(StatusCode.UNSET)
        return Status(StatusCode.ERROR, f"packet dropped by the kernel: {self.error}")

    @property
    def attributes(self) -> dict:
        attrs = self.describe(self.event, self.traces, self.inode)
        if self.error is not None:
            attrs[a.ERROR_TYPE] = self.error
        return attrs

    def spans(self, resource: Resource, scope: InstrumentationScope) -> list[ReadableSpan]:
        root_ctx = trace_api.SpanContext(self.trace_id, self.span_id, is_remote=False, trace_flags=_SAMPLED)
        out = [ReadableSpan(
            name=self.name, context=root_ctx, parent=None, resource=resource, attributes=self.attributes,
            events=[Event(name, timestamp=ts + self.offset_ns) for name, ts in self.event.boundary_times().items()],
            kind=trace_api.SpanKind.INTERNAL, status=self.status, start_time=self.start_ns, end_time=self.end_ns,
            instrumentation_scope=scope)]
        for child in self.children:
            out.append(ReadableSpan(
                name=child.segment.name,
                context=trace_api.SpanContext(self.trace_id, child.span_id, is_remote=False, trace_flags=_SAMPLED),
                parent=root_ctx, resource=resource,
                attributes=_SEGMENT_ATTRIBUTES[child.segment.name],
                kind=trace_api.SpanKind.INTERNAL, start_time=child.start_ns, end_time=child.end_ns,
                instrumentation_scope=scope))
        return out

    def exemplars(self) -> list[tuple[int, Exemplar]]:
        """(segment id, exemplar) for every segment this packet's spans measured."""
        times = self.event.segment_times()
        out = [(c.segment.id, Exemplar({}, (c.end_ns - c.start_ns) / 1e9, c.end_ns, c.span_id, self.trace_id))
               for c in self._children(times)]
        # The direction's total segment, if both its ends were seen: its exemplar points at the root.
        total = next((s for s in segments.segments_of(self.event.direction) if s.is_total and s.name in times), None)
        if total is not None:
            out.append((total.id, Exemplar({}, (self.end_ns - self.start_ns) / 1e9, self.end_ns, self.span_id,
                                            self.trace_id)))
        return out


# A segment span's attributes, one dict per segment shared by all its spans (ReadableSpan keeps the dict it
# is given and shows it read-only).
_SEGMENT_ATTRIBUTES = {seg.name: {a.SEGMENT: seg.name, a.NETWORK_IO_DIRECTION: seg.direction.otel}
                       for seg in segments.SEGMENTS}


def _crossed(direction: Direction, times: dict) -> list[segments.Segment]:
    """The segments (not the total) whose two boundaries a packet crossed, in the direction's order."""
    return [seg for seg in segments.segments_of(direction) if seg.name in times and not seg.is_total]


class SpanBuilder:
    def __init__(self, clock: WallClock, node_name: str | None = None, ids: IdGenerator | None = None,
                 if_name: Callable[[int], str | None] = _if_name):
        self.clock = clock
        self.node_name = node_name
        self.ids = ids or RandomIdGenerator()
        self.if_name = if_name
        self.rate_limited = 0  # cumulative: events over the per-target span rate
        self.unknown_target = 0  # cumulative: events of a target that was removed before they were read
        self._buckets: dict[Hashable, TokenBucket] = {}

    def build(self, interval: Interval) -> list[PacketTrace]:
        out = []
        for ev in interval.events:
            target = interval.targets.get(ev.slot)
            if target is None:
                self.unknown_target += 1
                continue
            key = target_key(target)
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = TokenBucket(target.settings.events_per_sec, ev.last_ns)
            if not bucket.take(ev.last_ns):
                self.rate_limited += 1
                continue
            trace = self.packet_trace(ev, target, interval.drop_reasons)
            if trace is not None:
                out.append(trace)
        live = {target_key(t) for t in interval.targets.values()}
        for key in [k for k in self._buckets if k not in live]:
            del self._buckets[key]
        return out

    def packet_trace(self, ev: PacketEvent, target: Target, drop_reasons: dict[int, str]) -> PacketTrace | None:
        if not ev.first_ns:
            return None
        crossed = len(_crossed(ev.direction, ev.segment_times()))
        error = drop_reasons.get(ev.drop_reason, str(ev.drop_reason)) if ev.kind == "drop" else None
        return PacketTrace(
            owner=target_key(target), trace_id=self.ids.generate_trace_id(), span_id=self.ids.generate_span_id(),
            event=ev, traces=target.traces, inode=target.ns.inode, offset_ns=self.clock.last.offset_ns,
            child_ids=tuple(self.ids.generate_span_id() for _ in range(crossed)), error=error,
            describe=self.attributes)

    def attributes(self, ev: PacketEvent, traces: tuple[str, ...], inode: int) -> dict:
        """A packet's root span attributes; of its pod, only what is not the spans' resource (the pod)."""
        attrs: dict = a.traces_attributes(traces)
        attrs[a.NETNS_INODE] = inode
        attrs[a.NETWORK_IO_DIRECTION] = ev.direction.otel
        attrs[a.EVENT_KIND] = ev.kind
        attrs[a.PACKET_LENGTH] = ev.length
        attrs[a.CPU_FIRST] = ev.cpu_first
        attrs[a.CPU_LAST] = ev.cpu_last
        if ev.protocol:
            attrs[a.NETWORK_TRANSPORT] = ev.protocol
        if ev.saddr:
            attrs[a.NETWORK_TYPE] = f"ipv{ipaddress.ip_address(ev.saddr).version}"
            attrs[a.SOURCE_ADDRESS] = ev.saddr
        if ev.daddr:
            attrs[a.DESTINATION_ADDRESS] = ev.daddr
        if ev.sport is not None:
            attrs[a.SOURCE_PORT] = ev.sport
        if ev.dport is not None:
            attrs[a.DESTINATION_PORT] = ev.dport
        for role, ifindex in zip(_DEVICES[ev.direction], ev.ifindex):
            if role is None or not ifindex:
                continue
            attrs[f"latencytrace.device.{role}.ifindex"] = ifindex
            name = self.if_name(ifindex) if role in _HOST_SIDE else None
            if name:
                attrs[f"latencytrace.device.{role}.name"] = name
        return attrs
