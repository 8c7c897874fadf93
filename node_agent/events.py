"""Slow-packet events: one packet's whole journey (every boundary timestamp) from the kernel's ring buffer.

The kernel emits an event for packets slower than their target's threshold, for a 1-in-N sample of the
others, and for drops, within a per-target rate cap. A reader thread polls the ring buffer and hands
decoded events to a bounded queue; when user space falls behind, the oldest are dropped and counted,
never blocking the kernel side or growing memory.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import socket
import threading
from dataclasses import dataclass

from . import segments
from .segments import Direction
from .tracer import Tracer

log = logging.getLogger(__name__)

# Event kinds (struct lt_event.kind): the one table; bpf/*.c uses the LT_EV_* macros generated from it.
KINDS = {1: "slow", 2: "sampled", 3: "drop"}


def bpf_macros() -> dict[str, int]:
    """LT_EV_SLOW, LT_EV_SAMPLED, LT_EV_DROP for bpf/*.c."""
    return {f"LT_EV_{name.upper()}": kind for kind, name in KINDS.items()}
PROTOCOLS = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}


@dataclass(frozen=True)
class PacketEvent:
    slot: int
    direction: Direction
    kind: str  # slow | sampled | drop
    ts: tuple[int, ...]  # boundary timestamps, CLOCK_MONOTONIC ns, 0 where not seen
    skb: int
    length: int
    ifindex: tuple[int, int, int]  # RX: host, pod, -; TX: pod, host, egress
    cpu_first: int
    cpu_last: int
    drop_reason: int
    protocol: str | None
    saddr: str | None
    daddr: str | None
    sport: int | None
    dport: int | None

    @property
    def first_ns(self) -> int:
        return next((t for t in self.ts if t), 0)

    @property
    def last_ns(self) -> int:
        return max(self.ts)

    def boundary_times(self) -> dict[str, int]:
        return {b.name: self.ts[b.id] for b in segments.boundaries(self.direction) if self.ts[b.id]}

    def segment_times(self) -> dict[str, tuple[int, int]]:
        """Segment name -> (start_ns, end_ns) for every segment whose two boundaries were seen."""
        times = self.boundary_times()
        out = {}
        for seg in segments.segments_of(self.direction):
            start = self.first_ns if seg.is_total else times.get(seg.start)
            end = times.get(seg.end)
            if seg.name == "rx_driver" and end is None:
                end = times.get("pod_rx")  # no host-side sighting: the driver segment ends in the pod
            if start and end and end >= start:
                out[seg.name] = (start, end)
        return out


def _addr(family: int, words) -> str | None:
    raw = b"".join(int(w).to_bytes(4, "little") for w in words)
    if family == 4:
        return str(ipaddress.IPv4Address(raw[:4]))
    if family == 6:
        return str(ipaddress.IPv6Address(raw))
    return None


def decode(raw) -> PacketEvent:
    """Turn the kernel's struct lt_event (as the compiler described it) into a PacketEvent."""
    a = raw
    family = a.family
    has_ports = a.proto in (6, 17)
    return PacketEvent(
        slot=raw.slot,
        direction=Direction(raw.dir),
        kind=KINDS.get(raw.kind, "unknown"),
        ts=tuple(int(t) for t in raw.ts),
        skb=int(raw.skb),
        length=int(raw.len),
        ifindex=(int(raw.ifindex[0]), int(raw.ifindex[1]), int(raw.ifindex[2])),
        cpu_first=int(raw.cpu_first),
        cpu_last=int(raw.cpu_last),
        drop_reason=int(raw.drop_reason),
        protocol=PROTOCOLS.get(a.proto) if family else None,
        saddr=_addr(family, a.saddr),
        daddr=_addr(family, a.daddr),
        sport=socket.ntohs(a.sport) if family and has_ports else None,
        dport=socket.ntohs(a.dport) if family and has_ports else None,
    )


class EventReader:
    """Polls the ring buffer on its own thread into a bounded queue."""

    def __init__(self, tracer: Tracer, capacity: int = 4096):
        self.tracer = tracer
        self._queue: collections.deque[PacketEvent] = collections.deque(maxlen=capacity)
        self._lock = threading.Lock()
        self.dropped = 0  # decoded but pushed out of the queue unread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._polls = 0  # ring buffer polls completed by the reader thread
        self._polled = threading.Condition()
        self._table = tracer.table("lt_events")
        self._table.open_ring_buffer(self._on_event)

    def _on_event(self, ctx, data, size) -> None:
        ev = decode(self._table.event(data))
        with self._lock:
            if len(self._queue) == self._queue.maxlen:
                self.dropped += 1
            self._queue.append(ev)

    def start(self) -> EventReader:
        self._thread = threading.Thread(target=self._run, name="lt-events", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._table.poll(100)
            with self._polled:
                self._polls += 1
                self._polled.notify_all()

    def settle(self, timeout: float = 10.0) -> bool:
        """Wait until every event the kernel submitted before this call is in the queue: two more polls
        have completed, so one of them began after the call (the poll under way may have emptied the ring
        before those events were submitted).
        The kernel wakes the poller for each record it commits once the reader has caught up, so a
        completed poll leaves nothing behind that was there when it began. False on timeout."""
        with self._polled:
            target = self._polls + 2
            return self._polled.wait_for(lambda: self._polls >= target, timeout)

    def drain(self) -> list[PacketEvent]:
        with self._lock:
            out = list(self._queue)
            self._queue.clear()
        return out

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self.tracer.running:
            self._table.consume()
