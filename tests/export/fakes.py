"""Plain agent data (no kernel) for the exporter's unit tests: targets, histograms, events, intervals."""

from __future__ import annotations

import numpy as np

from latencytrace.node_agent import histogram, segments
from latencytrace.node_agent.agent import Interval
from latencytrace.node_agent.contract import PodRef
from latencytrace.node_agent.events import PacketEvent
from latencytrace.node_agent.histogram import SegmentHistogram
from latencytrace.node_agent.kernel.bpfsys import ProgStats
from latencytrace.node_agent.segments import Direction
from latencytrace.node_agent.targets import Namespace, Target
from latencytrace.node_agent.tracer import TargetSettings

SECOND = 1_000_000_000


def pod_target(slot: int, name: str = "web", namespace: str = "shop", traces: tuple[str, ...] = (),
               spans_per_second: int = 10) -> Target:
    return Target(slot, Namespace(4026530000 + slot, f"/proc/{100 + slot}/ns/net", (f"10.0.0.{slot + 2}",)),
                  f"{namespace}/{name}", TargetSettings(events_per_sec=spans_per_second),
                  PodRef(namespace=namespace, name=name, uid=f"uid-{name}-{slot}", ips=[f"10.0.0.{slot + 2}"]),
                  traces, added_ns=1000 + slot)


def netns_target(slot: int, label: str = "/run/netns/lab") -> Target:
    return Target(slot, Namespace(4026531000 + slot, label, ("10.1.0.2",)), label, TargetSettings(), None, (),
                  added_ns=2000 + slot)


def hist(*latencies_ns: int) -> SegmentHistogram:
    """A histogram holding these latencies, filed as the kernel files them."""
    h = SegmentHistogram()
    for ns in latencies_ns:
        h.count += 1
        h.sum_ns += ns
        h.max_ns = max(h.max_ns, ns)
        idx = histogram.bucket_index(ns)
        if idx is None:
            h.zero_count += 1
        else:
            h.buckets[idx - histogram.INDEX_MIN] += np.uint64(1)
    return h


def rx_event(slot: int, start_ns: int, steps_ns: tuple[int, ...] = (2_000, 5_000, 30_000, 4_000, 100_000),
             kind: str = "slow", drop_reason: int = 0) -> PacketEvent:
    """A received packet that crossed every RX boundary, `steps_ns` apart."""
    ts = [start_ns]
    for step in steps_ns:
        ts.append(ts[-1] + step)
    ts += [0] * (segments.N_BOUNDARIES - len(ts))
    return PacketEvent(slot=slot, direction=Direction.RX, kind=kind, ts=tuple(ts), skb=0xffff0000, length=92,
                       ifindex=(7, 2, 0), cpu_first=0, cpu_last=1, drop_reason=drop_reason, protocol="udp",
                       saddr="10.0.0.9", daddr="10.0.0.2", sport=40000, dport=9000)


def interval(targets: list[Target], start_ns: int = 1_700_000_000 * SECOND, length_s: float = 1.0,
             histograms: dict | None = None, events: list[PacketEvent] = (), drops: dict | None = None,
             counters: dict | None = None, probes: dict | None = None, overflow_targets: int = 0) -> Interval:
    return Interval(
        start_ns=start_ns, end_ns=start_ns + int(length_s * SECOND), targets={t.slot: t for t in targets},
        histograms=histograms or {}, drops=drops or {}, drop_reasons={2: "NOT_SPECIFIED", 3: "NO_SOCKET"},
        events=list(events), counters=counters if counters is not None else {"events_lost": 0, "rate_limited": 0},
        probes=probes or {"lt_netif_receive_skb": ProgStats(run_cnt=10, run_time_ns=5_000)},
        overflow_targets=overflow_targets)


def seg_id(name: str) -> int:
    return segments.BY_NAME[name].id
