"""The agent's probes on the real kernel, with pods in real network namespaces on a bridge.

What the probes recorded is read from the kernel's maps by the tests themselves (tests/agent/kernel.py),
and what is attached from bpftool's list of links, so that each check compares the kernel with what
the traffic did, not the agent's bookkeeping with itself.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from latencytrace.node_agent import segments
from latencytrace.node_agent.segments import Direction
from tests.agent import kernel
from tests.agent.conftest import agent_of_each_kind, desired, measure, segment_counts
from tests.netlab import NetLab, sh

agent = pytest.fixture(scope="module", params=["typed", "raw"])(agent_of_each_kind)

N = 2000
EVERY_PACKET = dict(slow_ns=0, sample_one_in=1, events_per_sec=1_000_000)  # each packet an event
# Kernel counters of cases measured as any other packet (not losses): a UDP read ahead of its wakeup's
# probe, a TCP packet merged into the queue's tail skb, a TCP read recorded over further probe runs, a
# fragment whose data the host's reassembly moved to another skb.
COUNTED_CASES = ("early_reads", "coalesced", "read_continuations", "reassembled_on_host")


def udp_burst(dst, src, port: int, count: int, rate: int = 2000) -> None:
    with dst.serve("udp-recv", "--port", str(port), "--count", str(count), "--timeout", "20") as rx:
        src.traffic("udp-send", "--to", dst.ip, "--port", str(port), "--count", str(count), "--rate", str(rate))
    assert rx.result == {"received": count}, rx.result


def in_order(ev) -> bool:
    """The event's boundary timestamps, in the table's order, never go back in time (0: not seen)."""
    seen = [t for t in ev.ts if t]
    return seen == sorted(seen)


def rx_expected(ts: tuple[int, ...]) -> dict[str, int]:
    """What the kernel should have recorded for one received packet, from its raw boundary timestamps
    (irq, softirq, host_rx, pod_rx, sock_ready, app_read), as the segment table defines the segments."""
    irq, softirq, host, pod, ready, read = ts
    out = {}
    if irq and softirq:
        out["rx_irq"] = softirq - irq
    if softirq and (host or pod):
        out["rx_driver"] = (host or pod) - softirq  # ends in the pod when the host side was not seen
    if host and pod:
        out["rx_host_to_pod"] = pod - host
    if pod and ready:
        out["rx_pod_stack"] = ready - pod
    if ready and read:
        out["rx_socket_queue"] = read - ready
    if read:
        out["rx_total"] = read - next(t for t in ts if t)
    return out


def tx_expected(ts: tuple[int, ...]) -> dict[str, int]:
    """Same for a transmitted packet (app_send, pod_dev_queue, host_rx, egress_queue, egress_xmit, done).
    The qdisc and driver segments are those of a host-side egress device: queued after host_rx."""
    app, podq, host, egq, egx, done = ts
    out = {}
    if app and podq:
        out["tx_app_to_dev"] = podq - app
    if podq and host:
        out["tx_pod_to_host"] = host - podq
    host_egress = host and egq != podq and egq >= host
    if host_egress and egx:
        out["tx_qdisc"] = egx - egq
        if done:
            out["tx_driver"] = done - egx
    if done:
        out["tx_total"] = done - next(t for t in ts if t)
    return out


def assert_no_troubles(m, allow=()) -> None:
    """No counter of the kernel's moved but the cases it measures and counts (COUNTED_CASES) and those
    the caller allows (and checks itself)."""
    troubles = {k: v for k, v in m.kernel_counters.items() if k not in (*COUNTED_CASES, *allow)}
    assert troubles == dict.fromkeys(troubles, 0), str(m.kernel_counters)


def check_kernel_against_events(m, pod, direction: Direction, expected, allow=()) -> dict[str, kernel.SegStat]:
    """Each segment's count and sum in the kernel equal what its packets' raw timestamps say; every
    count is in the histogram; nothing negative, nothing clamped, no event lost or held back. (A UDP
    read that ran ahead of the sk_data_ready probe, `early_reads`, and a TCP packet merged into the
    queue's tail skb, `coalesced`, are measured and in their events too; `allow` names further counters
    the caller checks itself.)"""
    assert_no_troubles(m, allow)
    stats = m.kernel[pod.name]
    evs = [e for e in m.event_list if e.direction is direction]
    assert all(in_order(e) for e in evs), [e.ts for e in evs if not in_order(e)][:5]
    want: dict[str, list[int]] = {}
    for ev in evs:
        for seg, ns in expected(ev.ts).items():
            want.setdefault(seg, []).append(ns)
    for seg in segments.segments_of(direction):
        st, vals = stats[seg.name], want.get(seg.name, [])
        assert (st.count, st.sum_ns) == (len(vals), sum(vals)), (seg.name, st.count, st.sum_ns, len(vals), sum(vals))
        assert sum(st.buckets) + st.zero == st.count, seg.name
        lo, hi = st.bucket_bounds_ns()
        assert lo <= st.sum_ns <= hi, (seg.name, lo, st.sum_ns, hi)
    return stats


def test_udp_reads_are_counted_for_the_traced_pod_only(agent, lab):
    a, b, client = lab.add_pod("a"), lab.add_pod("b"), lab.add_pod("client")

    def traffic():
        with a.serve("udp-recv", "--port", "9000", "--count", str(N), "--timeout", "20") as ra, \
             b.serve("udp-recv", "--port", "9000", "--count", str(N), "--timeout", "20") as rb:
            client.traffic("udp-send", "--to", a.ip, "--port", "9000", "--count", str(N), "--rate", "4000")
            client.traffic("udp-send", "--to", b.ip, "--port", "9000", "--count", str(N), "--rate", "4000")
        assert ra.result == {"received": N} and rb.result == {"received": N}

    # Events for every drop (and every slow packet): the packets that enter a's namespace besides the
    # test's own (the bridge's multicast reaches every port) are in them.
    m = measure(agent, [a], traffic, read_kernel=True, events_per_sec=1_000_000)
    # In the kernel: a's slot holds a's datagrams, each once (b's are not in it), and no other slot
    # recorded anything while b carried as many.
    stats = m.kernel["a"]
    for seg in ("rx_host_to_pod", "rx_pod_stack", "rx_socket_queue", "rx_total"):
        assert stats[seg].count == N, (seg, stats[seg].count)
    others = [e for e in m.event_list if e.kind == "drop"]
    assert all(e.daddr != a.ip and not e.ts[2] for e in others), others  # none of them addressed to a
    assert stats["rx_driver"].count == N + len(others), (stats["rx_driver"].count, others)
    assert N * 0.99 <= stats["rx_irq"].count - len(others) <= N, stats["rx_irq"].count
    assert {s: n for s, n in m.slot_counts.items() if n and s != m.slots["a"]} == {}, m.slot_counts
    assert not [e for e in m.event_list if b.ip in (e.saddr, e.daddr)]
    # And the agent reports what the kernel holds.
    counts = segment_counts(m, a)
    assert counts == {seg: st.count for seg, st in stats.items() if st.count}, counts
    assert [t["netns_inode"] for t in m.as_json()["targets"]] == [a.inode]


def test_tx_segments_for_a_sender_inside_a_pod(agent, lab):
    a, server = lab.add_pod("a"), lab.add_pod("server")

    def traffic():
        with server.serve("tcp-sink", "--port", "9100", "--timeout", "20"):
            a.traffic("tcp-send", "--to", server.ip, "--port", "9100", "--count", "300", "--size", "1000")
        with server.serve("udp-recv", "--port", "9001", "--count", "600", "--timeout", "20") as rx:
            a.traffic("udp-send", "--to", server.ip, "--port", "9001", "--count", "300", "--rate", "2000")
            a.traffic("udp-send", "--to", server.ip, "--port", "9001", "--count", "300", "--rate", "2000", "--write")
        assert rx.result == {"received": 600}

    m = measure(agent, [a], traffic, read_kernel=True, dir_mask=0b10, **EVERY_PACKET)
    tx = [e for e in m.event_list if e.direction is Direction.TX]
    # 300 datagrams sent with sendto(2) and 300 with write(2): each one packet, the first (and only)
    # skb of its send, measured from the send to its hand-over to the server's namespace. TCP sends
    # as many skbs as its congestion window and GSO make of 300 writes: at least one, with its start.
    udp = [e for e in tx if (e.protocol, e.daddr, e.dport) == ("udp", server.ip, 9001)]
    assert len(udp) == 600 and all(e.ts[0] and e.ts[1] and e.ts[2] and e.ts[5] for e in udp), len(udp)
    tcp_starts = [e for e in tx if (e.protocol, e.daddr, e.dport) == ("tcp", server.ip, 9100) and e.ts[0]]
    assert tcp_starts
    counts = segment_counts(m, a)
    assert counts.get("tx_app_to_dev", 0) >= 600 + len(tcp_starts), counts
    for seg in ("tx_pod_to_host", "tx_qdisc", "tx_driver", "tx_total"):
        assert counts.get(seg, 0) >= 600 + len(tcp_starts), (seg, counts)
    # Transmit segments add up: each as the packets' timestamps say, and together with the bridge
    # crossing between host_rx and egress_queue (which no segment covers) exactly the total.
    stats = check_kernel_against_events(m, a, Direction.TX, tx_expected)
    assert len(tx) == stats["tx_total"].count
    bridge = sum(e.ts[3] - e.ts[2] for e in tx if e.ts[2] and e.ts[3] >= e.ts[2])
    parts = sum(stats[s].sum_ns for s in ("tx_app_to_dev", "tx_pod_to_host", "tx_qdisc", "tx_driver"))
    assert parts + bridge == stats["tx_total"].sum_ns, (parts, bridge, stats["tx_total"].sum_ns)


def test_receive_segments_add_up_to_the_total_in_the_kernel(agent, lab):
    a, client = lab.add_pod("a"), lab.add_pod("client")
    m = measure(agent, [a], lambda: udp_burst(a, client, 9002, 300, rate=1000), read_kernel=True, **EVERY_PACKET)
    stats = check_kernel_against_events(m, a, Direction.RX, rx_expected)
    rx = [e for e in m.event_list if e.direction is Direction.RX]
    read = [e for e in rx if e.ts[5]]
    unread = [e for e in rx if not e.ts[5]]  # the bridge's multicast, dropped in the pod
    assert all(e.kind == "drop" and e.daddr != a.ip for e in unread), unread
    # Every datagram was read: each segment once per packet, and the kernel's sums of the segments
    # (each recorded at its own tracepoint), less what the unread packets left in the first two, make
    # up its sum of the totals to the nanosecond.
    for seg in ("rx_host_to_pod", "rx_pod_stack", "rx_socket_queue", "rx_total"):
        assert stats[seg].count == 300, (seg, stats[seg].count)
    parts = [stats[s.name] for s in segments.segments_of(Direction.RX) if not s.is_total]
    total = stats["rx_total"]
    not_read = sum(sum(rx_expected(e.ts).values()) for e in unread)
    assert sum(p.sum_ns for p in parts) - not_read == total.sum_ns, ([p.sum_ns for p in parts], not_read, total.sum_ns)
    # The histograms agree: the parts' bucket bounds bracket the total's.
    lo, hi = zip(*(p.bucket_bounds_ns() for p in parts))
    t_lo, t_hi = total.bucket_bounds_ns()
    assert sum(lo) <= t_hi and t_lo <= sum(hi), (sum(lo), sum(hi), t_lo, t_hi)
    # Each event names the packet, and its boundaries were all seen, in order.
    assert len(read) == 300 and all(e.kind == "sampled" for e in read)
    assert {(e.protocol, e.saddr, e.daddr, e.dport) for e in read} == {("udp", client.ip, a.ip, 9002)}
    assert sum(all(e.ts[1:]) for e in read) == 300


def test_udp_reads_that_run_ahead_of_the_wakeup_are_matched(agent, lab):
    """A reader that never sleeps, on the other CPU than the sender's (whose CPU delivers the datagram):
    it often takes a datagram after the kernel queued it and before the sk_data_ready probe has put it in
    the socket's ring, or while the probe is writing it. Each read still ends its own datagram's journey,
    once (counted as `early_reads` when the probe took the read itself): every count and nanosecond sum
    in the kernel is what the packets' timestamps give, nothing lost, nothing shifted onto the next."""
    a, client = lab.add_pod("a"), lab.add_pod("client")
    count = 1000  # each an event: all of them fit the ring buffer (64 pages) even if the agent reads none

    def traffic():
        with a.serve("udp-recv", "--port", "9003", "--count", str(count), "--timeout", "20", "--spin",
                     "--cpu", "1") as rx:
            client.traffic("udp-send", "--to", a.ip, "--port", "9003", "--count", str(count), "--rate", "20000",
                           "--cpu", "0")
        assert rx.result == {"received": count}, rx.result

    m = measure(agent, [a], traffic, read_kernel=True, dir_mask=0b01, **EVERY_PACKET)
    assert_no_troubles(m)
    reads = [e for e in m.event_list if e.direction is Direction.RX and e.ts[5]]
    assert len(reads) == count and all(e.ts[3] <= e.ts[4] <= e.ts[5] for e in reads), len(reads)
    stats = m.kernel[a.name]
    for seg, ns in (("rx_pod_stack", [e.ts[4] - e.ts[3] for e in reads]),
                    ("rx_socket_queue", [e.ts[5] - e.ts[4] for e in reads]),
                    ("rx_total", [e.ts[5] - e.first_ns for e in reads])):
        assert (stats[seg].count, stats[seg].sum_ns) == (count, sum(ns)), (seg, stats[seg].count, stats[seg].sum_ns, sum(ns))
    print("early reads:", m.kernel_counters["early_reads"])


def test_targets_are_added_and_removed_without_reloading(agent, lab):
    """A removed target's slot stays flat in the kernel while its pod carries traffic and another
    target keeps the probes attached and counting."""
    a, c, client = lab.add_pod("a"), lab.add_pod("c"), lab.add_pod("client")
    loaded = kernel.our_programs(agent.tracer)
    tracer, n = agent.tracer, agent.sizes.max_targets
    try:
        states = agent.reconcile([desired(a), desired(c)])
        slot_a, slot_c = (states[desired(p).key].target.slot for p in (a, c))
        before = kernel.slot_stats(tracer, slot_a, buckets=False)
        udp_burst(a, client, 9003, 200)
        assert (kernel.slot_stats(tracer, slot_a, buckets=False)["rx_pod_stack"] - before["rx_pod_stack"]).count == 200

        agent.reconcile([desired(c)])
        counts0, c0 = kernel.slot_counts(tracer, n), kernel.slot_stats(tracer, slot_c, buckets=False)
        udp_burst(a, client, 9004, 200)
        udp_burst(c, client, 9005, 200)
        counts1, c1 = kernel.slot_counts(tracer, n), kernel.slot_stats(tracer, slot_c, buckets=False)
    finally:
        agent.reconcile([])
    assert (c1["rx_pod_stack"] - c0["rx_pod_stack"]).count == 200  # the probes were running
    assert {s: counts1[s] - counts0[s] for s in counts0 if counts1[s] != counts0[s]} == {
        slot_c: counts1[slot_c] - counts0[slot_c]}
    assert kernel.our_programs(agent.tracer) == loaded  # the same programs, never reloaded


def test_datagrams_an_untraced_socket_closed_unread_are_no_traced_pods_drops(agent, lab):
    """An untraced pod's UDP socket closed with datagrams unread, just after the target set changed: the
    kernel drops them (kfree_skb) from the socket's queue, where skb->dev holds UDP's scratch (their
    sizes, not a device) and skb->sk is NULL, so they belong to no pod the probe can tell, and are counted
    for none. The failed read of that "device" once matched an entry of the per-CPU namespace cache that
    the change had emptied, and took its old answer: the traced pod's slot."""
    t, x, u, client = lab.add_pod("t"), lab.add_pod("x"), lab.add_pod("u"), lab.add_pod("client")
    rounds, count = 6, 20

    def traffic():
        for i in range(rounds):
            udp_burst(t, client, 9006, count)  # the traced pod's namespace in every CPU's cache
            agent.reconcile([desired(t), desired(x)] if i % 2 == 0 else [desired(t)])  # emptied
            with u.serve("udp-recv", "--port", "9007", "--count", str(count), "--timeout", "20",
                         "--discard", "1") as rx:
                client.traffic("udp-send", "--to", u.ip, "--port", "9007", "--count", str(count), "--rounds", "2")
            assert rx.result["received"] == count, rx.result

    report = measure(agent, [t], traffic)
    drops = next(d["drops"] for d in report.as_json()["targets"] if d["netns_inode"] == t.inode)
    assert not {k: n for k, n in drops.items() if n >= count}, drops


def test_drop_to_a_closed_port_is_counted_with_its_reason(agent, lab):
    a, client = lab.add_pod("a"), lab.add_pod("client")
    report = measure(agent, [a], lambda: client.traffic("udp-send", "--to", a.ip, "--port", "9999", "--count", "25"))
    drops = next(t["drops"] for t in report.as_json()["targets"] if t["netns_inode"] == a.inode)
    assert drops.get("receive/NO_SOCKET") == 25, drops


def test_probe_cost_is_read_back_from_the_kernel(agent, lab):
    a, client = lab.add_pod("a"), lab.add_pod("client")
    prog = kernel.our_programs(agent.tracer)["lt_netif_receive_skb"]
    before = kernel.programs({prog})[prog].run_cnt
    report = measure(agent, [a], lambda: udp_burst(a, client, 9005, 100))
    after = kernel.programs({prog})[prog].run_cnt
    probes = report.as_json()["probes"]
    assert probes["lt_netif_receive_skb"]["run_cnt"] >= before + 200  # host side and pod side of each datagram
    assert probes["lt_netif_receive_skb"]["run_cnt"] <= after  # what bpftool says the kernel counted
    assert probes["lt_netif_receive_skb"]["run_time_ns"] > 0


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_pod_to_pod_both_traced(agent, lab, protocol):
    """The same skb is the sender's TX and the receiver's RX: both are measured."""
    a, b = lab.add_pod("a"), lab.add_pod("b")

    def traffic():
        if protocol == "tcp":
            with b.serve("tcp-sink", "--port", "9200", "--timeout", "20"):
                a.traffic("tcp-send", "--to", b.ip, "--port", "9200", "--count", "200", "--size", "500")
        else:
            udp_burst(b, a, 9200, 200)

    report = measure(agent, [a, b], traffic)
    ca, cb = segment_counts(report, a), segment_counts(report, b)
    sent = ca.get("tx_total", 0)
    # UDP sends each datagram on its own. TCP merges writes into fewer segments, the more so the slower
    # the receiver (a busy machine: 139 for 200 writes once), and sends SYN, data and FIN at the least.
    least = 200 if protocol == "udp" else 3
    assert sent >= least, ca
    # What a sent, b received: the same skbs, measured on both sides.
    assert cb.get("rx_host_to_pod", 0) >= max(least, sent * 0.95), (ca, cb)
    assert cb.get("rx_pod_stack", 0) >= sent * 0.95, (ca, cb)


def flights_since(agent, start_ns: int, direction: Direction = Direction.RX) -> list[tuple]:
    """The flights of a direction in the kernel that a packet touched since start_ns (time.monotonic_ns(),
    the BPF clock's): (times, flags, protocol, ifindexes) of each."""
    return [(list(f.ts), f.flags, f.addr.proto, list(f.ifindex))
            for f in kernel.flights(agent.tracer, agent.sizes, direction) if f.skb and max(f.ts) >= start_ns]


def test_ipv6_pods_are_traced_from_the_host_side_on(agent):
    with NetLab(ipv6=True, masquerade=True) as lab:
        a, client = lab.add_pod("a"), lab.add_pod("client")
        start, left = time.monotonic_ns(), []

        def traffic():
            with a.serve("udp-recv", "--bind", "::", "--port", "9500", "--count", "300", "--timeout", "20") as rx:
                client.traffic("udp-send", "--to", a.ip6, "--port", "9500", "--count", "300", "--rate", "2000")
            assert rx.result == {"received": 300}
            assert client.traffic("ping", "--to", a.ip6, "--count", "50") == {"replies": 50}
            assert client.traffic("ping", "--to", a.ip6, "--count", "50", "--hop-by-hop") == {"replies": 50}
            left.extend(flights_since(agent, start))

        m = measure(agent, [a], traffic)
        counts = segment_counts(m, a)
    # The host side recognised the pod by its IPv6 address: the whole path is measured.
    for seg in ("rx_driver", "rx_host_to_pod", "rx_pod_stack", "rx_socket_queue", "rx_total"):
        assert counts.get(seg, 0) >= 300, (seg, counts)
    # ICMPv6 into the pod (neighbour discovery, pings; those behind a hop-by-hop header, as MLD is) ended
    # in the pod: nothing was left in flight for a later packet to find.
    assert m.kernel_counters["stale_flights"] == 0 and not left, (m.kernel_counters, left)


FIRST_FRAGMENT = 64  # lt_flight.flags: LT_F_FRAG_FIRST (bpf/latencytrace.h)
RX_POD_RX = segments.boundary_id(Direction.RX, "pod_rx")


def proc_lines(path: str, netns: str | None = None) -> list[str]:
    """The lines of a /proc/net file as a namespace (the host's by default) shows it."""
    cmd = ("cat", path) if netns is None else ("ip", "netns", "exec", netns, "cat", path)
    return sh(*cmd).stdout.splitlines()


def proc_counter(path: str, section: str, name: str, netns: str | None = None) -> int:
    """A counter of /proc/net/snmp or /proc/net/netstat (a section's names on one line, its values on the
    next), in a namespace (the host's by default)."""
    names, values = [ln.split() for ln in proc_lines(path, netns) if ln.startswith(section + ":")]
    return int(values[names.index(name)])


def ip_reassembled(netns: str | None = None) -> int:
    """Datagrams IP reassembled in a namespace (the host's by default): Ip ReasmOKs."""
    return proc_counter("/proc/net/snmp", "Ip", "ReasmOKs", netns)


def left_by_reassembly(flights: list[tuple]) -> list[tuple]:
    """Of flights_since's, those first fragments left whose skb the host's reassembly freed."""
    return [f for f in flights if f[1] & FIRST_FRAGMENT and not f[0][RX_POD_RX]]


def host_reassembly(before: int, host_nat: bool, datagrams: int) -> int:
    """The datagrams the host reassembled since `before`: all of them with the lab's NAT, else none, unless
    the machine's own rules make its conntrack track the lab's traffic (as CI's once did): then a test
    without the lab's NAT is the NAT case too, and checks the same."""
    on_host = ip_reassembled() - before
    assert (on_host == datagrams) if host_nat else (on_host in (0, datagrams)), (on_host, datagrams)
    return on_host


class Leftovers:
    """The receive flights a test's packets left in the kernel, read twice: once its lab is cut off
    (`before`: nothing the lab sends can change them after), and just after the kernel's counters are read
    (`after`). The node's other traffic still can: a flight left at a freed skb's address is counted when
    the address carries another packet, the node's own too (a drop of it: lt_kfree_skb). So one counted
    between the two reads is in `before` and maybe in the counters; one still in `after` is not in them.
    Made before the measurement, it also reads the first fragments an earlier test left (`earlier`),
    which may be counted meanwhile."""

    def __init__(self, agent) -> None:
        self.agent, self.start, self.before, self.after = agent, 0, [], []
        self.earlier = left_by_reassembly(flights_since(agent, 0))

    def begin(self) -> None:
        self.start = time.monotonic_ns()

    def read_before(self) -> None:
        self.before = flights_since(self.agent, self.start)

    def read_after(self) -> None:
        self.after = flights_since(self.agent, self.start)

    def assert_first_fragments_accounted(self, m, on_host: int) -> None:
        """A first fragment's flight the host's reassembly left is counted when its address carries another
        packet (often the clone, at once), or is still there: each of the `on_host` datagrams' is one or
        the other. Nothing else is left. One that a new packet of its set of the flight table took while it
        was young is counted as a collision instead (the probes cannot tell it from a packet still on its
        way). Under load the skbs' addresses spread and left flights stay longer: with a flight table of
        256 entries, 6 runs of 28 in one loop had one or more, 1 of 50 in another."""
        first_before, first_after = left_by_reassembly(self.before), left_by_reassembly(self.after)
        others = [f for f in self.before if f not in first_before]
        assert m.kernel_counters["stale_flights"] == 0 and not others, (m.kernel_counters, others)
        counted, evicted = m.kernel_counters["reassembled_on_host"], m.kernel_counters["collisions"]
        assert counted + evicted + len(first_before) >= on_host, (m.kernel_counters, first_before)
        assert counted + len(first_after) <= on_host + len(self.earlier), (m.kernel_counters, first_after, self.earlier)


@pytest.mark.parametrize("host_nat", [False, True], ids=["no-host-nat", "host-nat"])
def test_packets_no_socket_reads_end_their_journey_in_the_pod(agent, host_nat):
    """Packets into a traced pod that no socket reads: ICMP echo requests, answered by the pod's stack, and
    the fragments of UDP datagrams larger than the MTU, of which reassembly keeps one skb and frees the
    rest. Like a bare ACK, each one's journey ends where it reaches the pod (rx_host_to_pod, no socket
    segments), and so does its flight. Left in flight, each was found by a later packet at its freed skb's
    address, a stale flight for nearly every ping.
    With the node's NAT (host-nat: kube-proxy's rules, a CNI's ipMasq) the host's conntrack reassembles
    each datagram on its way and sends it on fragmented again: the skb that completes it carries on with
    the first fragment's data, the first fragment's skb is freed (counted in reassembled_on_host), and
    its own data goes on in a new skb that starts where the host queues it on the pod's veth. CI once ran
    on a machine whose host NAT was on: each datagram then left a stale flight or two."""
    pings, datagrams, fragments = 200, 100, 3  # 3000 bytes of UDP: 3 fragments at the lab's MTU of 1500
    left = Leftovers(agent)
    with NetLab(masquerade=host_nat) as lab:
        a, client = lab.add_pod("a"), lab.add_pod("client")
        reasm_host, reasm_pod = ip_reassembled(), ip_reassembled(a.netns)

        def traffic():
            left.begin()
            assert client.traffic("ping", "--to", a.ip, "--count", str(pings)) == {"replies": pings}
            with a.serve("udp-recv", "--port", "9510", "--count", str(datagrams), "--timeout", "20") as rx:
                client.traffic("udp-send", "--to", a.ip, "--port", "9510", "--count", str(datagrams),
                               "--size", "3000", "--rate", "2000")
            assert rx.result == {"received": datagrams}, rx.result
            lab.cut_off()
            left.read_before()

        m = measure(agent, [a], traffic, read_kernel=True, then=left.read_after, dir_mask=0b01, **EVERY_PACKET)
        on_host = host_reassembly(reasm_host, host_nat, datagrams)
        assert ip_reassembled(a.netns) - reasm_pod == datagrams
    left.assert_first_fragments_accounted(m, on_host)
    stats = m.kernel[a.name]
    assert stats["rx_host_to_pod"].count == pings + datagrams * fragments, stats["rx_host_to_pod"]
    assert stats["rx_pod_stack"].count == stats["rx_socket_queue"].count == 0, stats


def snmp6(netns: str, name: str) -> int:
    """A counter of a namespace's IPv6 stack (/proc/net/snmp6)."""
    return int(dict(ln.split() for ln in proc_lines("/proc/net/snmp6", netns) if ln.strip())[name])


def conntrack_tracks(family: str, ip: str, port: int) -> bool:
    """Does the host's conntrack hold a flow to ip:port (so that it reassembled its fragments)?"""
    dst = f"dst={ipaddress.ip_address(ip).exploded} "  # as conntrack writes it
    return any(ln.startswith(family) and f"dport={port} " in ln and dst in ln
               for ln in proc_lines("/proc/net/nf_conntrack"))


@pytest.mark.parametrize("host_nat", [False, True], ids=["no-host-nat", "host-nat"])
def test_ipv6_fragments_into_a_pod_end_their_journey_or_are_counted(agent, host_nat):
    """The same for IPv6, whose fragments carry a header of their own (its offset says which is first), and
    whose reassembly by the host's conntrack (nf_conntrack's own, for IPv6) works the same way. A pod's
    IPv6 stack talks on its own (neighbour discovery): the lab is cut off before what is left is read."""
    datagrams, fragments, port = 100, 3, 9512
    left = Leftovers(agent)
    with NetLab(ipv6=True, masquerade=host_nat) as lab:
        a, client = lab.add_pod("a"), lab.add_pod("client")
        # Neighbours found first: a packet held for neighbour discovery is sent from within the NET_RX run
        # that delivers the answer, which the answer's send made quiet: then it cannot be timed (counted
        # in quiet_misses). Those are the node's; here they would take a fragment's rx_host_to_pod.
        assert client.traffic("ping", "--to", a.ip6, "--count", "2") == {"replies": 2}
        # (Ip6ReasmOKs: the pod's own reassembly; the host's conntrack, which reassembles on its own, does
        # not count there.)
        reasm_pod, in_pod = snmp6(a.netns, "Ip6ReasmOKs"), snmp6(a.netns, "Ip6InReceives")

        def traffic():
            left.begin()
            with a.serve("udp-recv", "--bind", "::", "--port", str(port), "--count", str(datagrams),
                         "--timeout", "20") as rx:
                client.traffic("udp-send", "--to", a.ip6, "--port", str(port), "--count", str(datagrams),
                               "--size", "3000", "--rate", "2000")
            assert rx.result == {"received": datagrams}, rx.result
            lab.cut_off()
            left.read_before()

        m = measure(agent, [a], traffic, read_kernel=True, then=left.read_after, dir_mask=0b01, **EVERY_PACKET)
        assert snmp6(a.netns, "Ip6ReasmOKs") - reasm_pod == datagrams
        others_in = snmp6(a.netns, "Ip6InReceives") - in_pod - datagrams * fragments  # neighbour discovery, MLD
        # The host's conntrack tracked the datagrams (and so reassembled them) with the lab's NAT; without
        # it, only if the machine's own rules make it track the lab's traffic.
        tracked = conntrack_tracks("ipv6", a.ip6, port)
        assert tracked or not host_nat
    left.assert_first_fragments_accounted(m, datagrams if tracked else 0)
    # Each fragment's journey to the pod timed, and maybe some of the other packets' the pod received.
    into_pod = m.kernel[a.name]["rx_host_to_pod"].count - datagrams * fragments
    assert 0 <= into_pod <= others_in, (into_pod, others_in, m.kernel_counters)


@pytest.mark.parametrize("host_nat", [False, True], ids=["no-host-nat", "host-nat"])
def test_fragments_a_traced_pod_sends_each_end_or_are_counted(agent, host_nat):
    """A traced pod's datagrams larger than the MTU leave it in fragments, each in transmit flight to where
    it arrives. With the node's NAT the host reassembles each datagram and sends it on fragmented again:
    the skb that completed it goes on with the first fragment's data (its flight with it), the first
    fragment's skb is freed there (counted in reassembled_on_host), and the completing fragment's own data
    goes on in a new skb, which no flight follows. So every fragment that reached the host either
    completes its journey or is counted; none is left for a later packet to find."""
    datagrams, fragments = 100, 3
    with NetLab(masquerade=host_nat) as lab:
        a, client = lab.add_pod("a"), lab.add_pod("client")
        reasm_host = ip_reassembled()

        def traffic():
            with client.serve("udp-recv", "--port", "9511", "--count", str(datagrams), "--timeout", "20") as rx:
                a.traffic("udp-send", "--to", client.ip, "--port", "9511", "--count", str(datagrams),
                          "--size", "3000", "--rate", "2000")
            assert rx.result == {"received": datagrams}, rx.result

        m = measure(agent, [a], traffic, read_kernel=True, dir_mask=0b10, **EVERY_PACKET)
        on_host = host_reassembly(reasm_host, host_nat, datagrams)
    stats, counters = m.kernel[a.name], m.kernel_counters
    assert stats["tx_pod_to_host"].count == datagrams * fragments, stats["tx_pod_to_host"]
    assert counters["reassembled_on_host"] == on_host, counters
    assert stats["tx_total"].count + counters["reassembled_on_host"] == datagrams * fragments, stats["tx_total"]
    assert counters["stale_flights"] == counters["collisions"] == 0, counters


def tcp_ext(pod, name: str) -> int:
    """A TcpExt counter of the pod's network namespace."""
    return proc_counter("/proc/net/netstat", "TcpExt", name, pod.netns)


def test_tcp_segments_queued_out_of_order_end_their_journey(agent, lab):
    """A lost segment leaves the ones after it out of order: TCP keeps them apart (tcp_data_queue_ofo,
    which wakes no reader) until the retransmission fills the hole and moves them all to the receive
    queue at once, with one wakeup. Each is still read (or merged into the skb before it), so each
    journey ends, none is left in flight to be found stale by a later packet at its skb's address.
    The pod's netfilter drops one data segment in ten as it arrives (as a lossy link would lose it; a
    drop at the sender's own output would be retransmitted at once, no hole)."""
    a, client = lab.add_pod("a"), lab.add_pod("client")
    n, size, left = 300, 1000, []
    sh(*a.exec("iptables", "-t", "raw", "-A", "PREROUTING", "-p", "tcp", "--dport", "9230",
               "-m", "length", "--length", "200:65535", "-m", "statistic", "--mode", "nth", "--every", "10",
               "--packet", "0", "-j", "DROP"))

    def traffic():
        start = time.monotonic_ns()
        with a.serve("tcp-sink", "--port", "9230", "--timeout", "20") as srv:
            client.traffic("tcp-send", "--to", a.ip, "--port", "9230", "--count", str(n), "--size", str(size))
        assert srv.result == {"received_bytes": n * size}, srv.result
        left.extend(flights_since(agent, start))

    m = measure(agent, [a], traffic, read_kernel=True, dir_mask=0b01, **EVERY_PACKET)
    assert tcp_ext(a, "TCPOFOQueue") >= 10  # the loss happened: segments were queued out of order
    assert m.kernel_counters["stale_flights"] == 0 and not left, (m.kernel_counters, left)
    stats = {seg: s.count for seg, s in m.kernel[a.name].items()}
    rules = sh(*a.exec("iptables", "-t", "raw", "-L", "PREROUTING", "-v", "-x", "-n")).stdout
    dropped = int(rules.splitlines()[2].split()[0])
    # Every segment that reached the pod and was not dropped there was read, out of order or not; the
    # others carry no data (the handshake's SYN and ACK, a FIN on its own, the ACK of the server's FIN)
    # or only data the pod already had (a retransmission of a segment that was not lost: the pod answers
    # each with a duplicate SACK, which TCP counts).
    dup = tcp_ext(a, "TCPDSACKOldSent") + tcp_ext(a, "TCPDSACKOfoSent")
    assert stats["rx_pod_stack"] == stats["rx_socket_queue"] == stats["rx_total"], (stats, m.kernel_counters)
    assert 0 <= stats["rx_host_to_pod"] - dropped - stats["rx_socket_queue"] <= 4 + dup, (stats, dropped, dup)
    assert m.kernel_counters["out_of_order"] >= 10, m.kernel_counters


# What the receive side's socket queue needs (probes.py says why): the kernel's links must show these.
SOCKET_QUEUE_TRACEPOINTS = {"netif_receive_skb", "sk_data_ready", "tcp_probe", "tcp_rcv_space_adjust",
                            "sock_recv_length",
                            "kfree_skb"}


def test_only_the_probes_the_segments_need_are_attached(agent, lab):
    a, client = lab.add_pod("a"), lab.add_pod("client")
    progs = kernel.our_programs(agent.tracer)
    ids = set(progs.values())
    # The kernel knows each program by its function's whole name (progload gives typed ones a BTF).
    names = {pid: p.name for pid, p in kernel.programs(ids).items()}
    assert names == {pid: n.split("@")[0] for n, pid in progs.items()}, names
    seen = {}

    def traffic():
        seen["links"] = kernel.attached_tracepoints(ids)
        seen["before"] = kernel.programs(ids)
        udp_burst(a, client, 9600, 100)
        seen["after"] = kernel.programs(ids)

    m = measure(agent, [a], traffic, seg_mask=segments.mask(["rx_socket_queue"]), dir_mask=0b01)
    assert segment_counts(m, a) == {"rx_socket_queue": 100}
    # In the kernel: a link for each of these tracepoints, to the program of that name, and no other
    # (nothing on the transmit path, no syscall probe); and those programs ran.
    assert seen["links"] == {tp: progs[f"lt_{tp}"] for tp in SOCKET_QUEUE_TRACEPOINTS}, seen["links"]
    ran = {progs_name for progs_name, pid in progs.items()
           if seen["after"][pid].run_cnt > seen["before"][pid].run_cnt}
    assert {"lt_netif_receive_skb", "lt_sk_data_ready", "lt_sock_recv_length"} <= ran <= {
        f"lt_{tp}" for tp in SOCKET_QUEUE_TRACEPOINTS}, ran
    # No target left: no link of ours at all, and the same traffic runs none of our programs.
    assert kernel.attached_tracepoints(ids) == {}
    idle = kernel.programs(ids)
    udp_burst(a, client, 9601, 100)
    assert {p.name: p.run_cnt for p in kernel.programs(ids).values()} == {p.name: p.run_cnt for p in idle.values()}
    assert all(p.run_cnt for pid, p in idle.items() if pid == progs["lt_netif_receive_skb"])


def test_tcp_request_response_from_the_host_each_request_is_its_own_packet(agent, lab):
    """TCP request/response from a client on the host (its journey starts where the host queues it),
    right after the pod sent the host a bulk transfer, whose bare ACKs into the pod
    nothing ever reads and whose skbs are freed without a tracepoint, their addresses reused at once.
    Every request is read, and none inherits the timestamps of such an earlier packet."""
    a = lab.add_pod("a")
    n = 1000
    traffic_py = str(Path(__file__).resolve().parents[1] / "traffic.py")
    sink = [sys.executable, traffic_py, "tcp-sink", "--port", "9211", "--timeout", "20"]
    client = [sys.executable, traffic_py, "tcp-send", "--to", a.ip, "--port", "9210", "--count", str(n),
              "--size", "64", "--echo"]
    started = {}

    def traffic():
        with subprocess.Popen(sink, stdout=subprocess.PIPE, text=True) as host_sink:
            assert '"ready"' in host_sink.stdout.readline()
            a.traffic("tcp-send", "--to", lab.gateway, "--port", "9211", "--count", "2000", "--size", "16384")
            host_sink.communicate(timeout=30)
        with a.serve("tcp-sink", "--port", "9210", "--echo", "--timeout", "20") as srv:
            started["ns"] = time.monotonic_ns()
            subprocess.run(client, check=True, capture_output=True, timeout=60)
        assert srv.result == {"received_bytes": 64 * n}, srv.result

    m = measure(agent, [a], traffic, read_kernel=True, dir_mask=0b01, **EVERY_PACKET)
    stats = m.kernel["a"]
    read = [e for e in m.event_list if e.direction is Direction.RX and e.ts[5] and e.dport == 9210]
    assert stats["rx_socket_queue"].count == stats["rx_total"].count == len(read) >= n * 0.99, (
        stats["rx_socket_queue"].count, len(read))
    assert all(e.ts[2] and e.ts[3] and not e.ts[1] for e in read)  # sent by the host: its queueing, then the pod
    inherited = [e.ts for e in read if e.first_ns < started["ns"]]
    assert not inherited, (len(inherited), inherited[:3])


@contextlib.contextmanager
def host_udp_reader(port: int, n: int):
    """A socket of the host itself (the node's own namespace: node-local DNS, a hostNetwork server) reading
    up to n datagrams on `port`, spinning on the other CPU; the dict it yields gets the reader's result
    when the block ends."""
    result: dict = {}
    cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "traffic.py"), "udp-recv", "--port", str(port),
           "--count", str(n), "--timeout", "20", "--spin"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as reader:
        assert '"ready"' in reader.stdout.readline()
        yield result
        out, _ = reader.communicate(timeout=30)
    result.update(json.loads(out))


def test_a_traced_pods_datagrams_to_a_host_socket_end_where_the_socket_is_woken(agent, lab):
    """UDP from a traced pod to a socket of the host (as to node-local DNS or a hostNetwork server), whose
    reader, spinning on the other CPU, now and then takes a datagram before the wakeup's program runs
    (the socket's queue is then empty there). Each datagram's journey ends where the host's socket is
    woken for it (tx_total); none is left in flight, where a datagram's free no longer looks (consume_skb
    turns a read datagram away by its device word); and the kernel's total is the events' sum."""
    a = lab.add_pod("a")
    n = 2000
    left = {}

    def traffic():
        left["start"] = time.monotonic_ns()
        with host_udp_reader(9230, n) as got:
            a.traffic("udp-send", "--to", lab.gateway, "--port", "9230", "--count", str(n), "--rate", "50000")
        assert got == {"received": n}, got

    def in_flight():
        left["tx"] = flights_since(agent, left["start"], Direction.TX)

    m = measure(agent, [a], traffic, read_kernel=True, dir_mask=0b10, then=in_flight, **EVERY_PACKET)
    assert_no_troubles(m)
    total = m.kernel["a"]["tx_total"]
    sent = [e for e in m.event_list if e.direction is Direction.TX]
    assert len(sent) == total.count == n, (len(sent), total.count)
    assert sum(e.ts[5] - e.first_ns for e in sent) == total.sum_ns
    assert all(e.ts[1] <= e.ts[2] <= e.ts[5] and e.ts[0] <= e.ts[1] for e in sent)  # queued, at the host, at its socket
    # Addresses are read from the skb when the journey is sent; one whose datagram a reader took before
    # the wakeup's program ran (the reader may have freed the skb: 2-3% of them on some VMs) has those
    # the host's receive read.
    assert all((e.protocol, e.daddr, e.dport) == ("udp", lab.gateway, 9230) for e in sent), \
        f"{sum(not e.protocol for e in sent)} without addresses, {len(sent)} in all"
    assert not left["tx"], (len(left["tx"]), left["tx"][:3])


def test_a_traced_pods_datagrams_the_hosts_gro_chained_are_not_drops(agent, lab):
    """UDP GRO forwarding on a traced pod's host-side veth (`ethtool -K <veth> rx-udp-gro-forwarding on`):
    the host chains the pod's datagrams
    behind one skb, and UDP, copying the chain into new skbs for a host socket, frees the chained ones
    with no drop reason. They are counted as chained (`chained_on_host`), never as the pod's drops, and
    every datagram is either measured to its socket or counted so. (Now and then the host receives a chain
    in a softirq that runs while a thread of this VM's init is current, where no BPF program runs
    (tests/blindspot.py), and frees its datagrams there too: each is counted where it is consumed or where
    its address carries the pod's next datagram, never taken for the next one queued on a further device,
    which would go uncounted; or, its flight evicted young by another packet's, as a collision. A flight
    may also be evicted young when its set's two ways hold young flights already, as when the host's reader
    falls behind: a collision too, counted, never a misattribution. A loop run had 3 with no unseen
    receive.)"""
    from tests.blindspot import BpfBlindReceives, udp_datagrams
    a = lab.add_pod("a")
    sh("ethtool", "-K", a.host_veth, "gro", "on", "rx-udp-gro-forwarding", "on")
    # GRO holds what it chained for up to 200 µs past a poll: the datagrams, 20 µs apart, are chained
    # however the veth's NAPI polls fall (with polls of one datagram each, none was: a CI run).
    Path(f"/sys/class/net/{a.host_veth}/gro_flush_timeout").write_text("200000")
    n = 2000
    got: dict = {}

    def veth_tx_dropped() -> int:  # what the pod's veth itself dropped (its peer's ring full: its NAPI behind)
        out = sh("ip", "-n", a.netns, "-j", "-s", "link", "show", "eth0").stdout
        return json.loads(out)[0]["stats64"]["tx"]["dropped"]

    def traffic():
        got["start"] = time.monotonic_ns()
        got["veth_dropped"] = -veth_tx_dropped()
        with host_udp_reader(9231, n) as result:
            a.traffic("udp-send", "--to", lab.gateway, "--port", "9231", "--count", str(n), "--rate", "50000")
        got.update(result)
        got["veth_dropped"] += veth_tx_dropped()

    def in_flight():  # a datagram neither measured, chained nor dropped: still in flight, or gone unseen?
        got["in_flight"] = flights_since(agent, got["start"], Direction.TX)

    with BpfBlindReceives() as blind:
        m = measure(agent, [a], traffic, read_kernel=True, dir_mask=0b10, then=in_flight, **EVERY_PACKET)
    (doc,) = [t for t in m.as_json()["targets"] if t["netns_inode"] == a.inode]
    chained, total = m.kernel_counters["chained_on_host"], m.kernel["a"]["tx_total"].count
    # The case under test happened.
    assert chained > 0, (chained, total, doc["drops"], got, str(m.kernel_counters))
    # The only drops without a reason are the veth's own (a busy machine: its peer's NAPI behind).
    assert doc["drops"].get("transmit/NOT_SPECIFIED", 0) == got["veth_dropped"], (doc["drops"], got, chained)
    assert doc["packets"]["transmit"] == n, doc["packets"]
    unseen = sum(udp_datagrams(length) for _, length in blind.on(a.host_veth))
    collisions = m.kernel_counters["collisions"]
    assert collisions <= unseen + n // 100, (collisions, unseen, blind.receives)
    assert_no_troubles(m, ("chained_on_host", "collisions"))
    # Each datagram measured to its socket's wakeup, chained on the host, (the host's socket full) dropped, or
    # received unseen and evicted.
    assert total + chained + sum(doc["drops"].values()) + collisions == n, \
        f"{total} measured + {chained} chained + drops {doc['drops']} + {collisions} collisions != {n}; " \
        f"in flight: {got['in_flight'][:5]}"
    assert not got["in_flight"], got["in_flight"][:5]
    # What the host's socket got: all but what the pod's veth dropped and what the socket itself could not
    # take (its drops are of the copies, no flight's).
    assert 0 < got["received"] <= n - got["veth_dropped"], got


def test_packets_the_host_sends_start_where_the_host_queues_them(agent, lab):
    """UDP from a socket of the host (as a hostNetwork client, a kubelet probe or node-local DNS would
    send) into a traced pod and, at the same time, into an untraced one. The traced pod's packets get a
    host-side boundary at their first queueing on a host device (the bridge), so rx_host_to_pod and a
    whole rx_total; no interrupt or driver time, which belongs to other packets; the untraced pod's
    packets are in no slot."""
    import socket
    a, b = lab.add_pod("a"), lab.add_pod("b")
    n = 1000
    traffic_py = str(Path(__file__).resolve().parents[1] / "traffic.py")
    bridge_ifindex = socket.if_nametoindex(lab.bridge)

    def traffic():
        with a.serve("udp-recv", "--port", "9220", "--count", str(n), "--timeout", "20") as ra, \
             b.serve("udp-recv", "--port", "9220", "--count", str(n), "--timeout", "20") as rb:
            for pod in (a, b):
                subprocess.run([sys.executable, traffic_py, "udp-send", "--to", pod.ip, "--port", "9220",
                                "--count", str(n), "--rate", "4000"], check=True, capture_output=True, timeout=60)
        assert ra.result == rb.result == {"received": n}, (ra.result, rb.result)

    m = measure(agent, [a], traffic, read_kernel=True, dir_mask=0b01, **EVERY_PACKET)
    stats = check_kernel_against_events(m, a, Direction.RX, rx_expected)
    read = [e for e in m.event_list if e.direction is Direction.RX and e.dport == 9220 and e.ts[5]]
    assert len(read) == stats["rx_total"].count == n, (len(read), stats["rx_total"].count)
    assert stats["rx_host_to_pod"].count == stats["rx_pod_stack"].count == n, stats
    assert all(e.ts[2] < e.ts[3] and e.ifindex[0] == bridge_ifindex for e in read), \
        [(e.ts, e.ifindex) for e in read if not (e.ts[2] < e.ts[3] and e.ifindex[0] == bridge_ifindex)][:3]
    assert all(e.first_ns == e.ts[2] for e in read)  # rx_total starts at the host's queueing
    assert stats["rx_irq"].count == stats["rx_driver"].count == 0
    assert sum(m.slot_counts.values()) == m.slot_counts[m.slots["a"]], m.slot_counts  # b's in no slot


def udp_through_nat(sender, to: str, ports: tuple[int, ...], pods: list, n: int) -> None:
    """n datagrams from `sender` to `to` at each of `ports`, which the node's NAT sends on to the pods
    (in order, each at its port): every pod reads all of its own."""
    with contextlib.ExitStack() as stack:
        rx = [stack.enter_context(pod.serve("udp-recv", "--port", str(port), "--count", str(n), "--timeout", "20"))
              for pod, port in pods]
        for port in ports:
            sender.traffic("udp-send", "--to", to, "--port", str(port), "--count", str(n), "--rate", "4000")
    assert [r.result for r in rx] == [{"received": n}] * len(rx), [r.result for r in rx]


@pytest.mark.parametrize("nat", ["dnat", "masquerade"])
def test_packets_de_nated_into_a_pod_start_where_the_host_forwards_them(agent, lab, nat):
    """Packets that reach a pod through the host's NAT on its uplink, into a traced pod and, at the same
    time, into an untraced one: UDP to a NodePort-like DNAT of the host's address (`dnat`), or the
    replies to the pod's own TCP connection to the outside, masqueraded behind the host's address
    (`masquerade`). At the uplink's netif_receive_skb they are addressed to the host, not to the pod
    (conntrack rewrites that later). The traced pod's packets get their host-side boundary where the
    host forwards them (the first net_dev_queue, on the bridge), in the NET_RX run that received them:
    irq, softirq, host_rx, pod_rx in this order, so rx_driver ends on the host and rx_host_to_pod
    exists; the untraced pod's packets are in no slot."""
    import socket

    from latencytrace.node_agent.kernel import nics
    from tests.netlab import Uplink

    a, b = lab.add_pod("a"), lab.add_pod("b")
    n = 1000 if nat == "dnat" else 500
    bridge_ifindex = socket.if_nametoindex(lab.bridge)
    with Uplink(lab) as up:
        out = up.outside

        def udp_in():
            up.dnat("udp", 9230, a, 9230)
            up.dnat("udp", 9231, b, 9230)
            udp_through_nat(out, up.node_ip, (9230, 9231), [(a, 9230), (b, 9230)], n)

        def tcp_out():
            up.masquerade()
            for pod, port in ((a, 9240), (b, 9241)):
                with out.serve("tcp-sink", "--port", str(port), "--echo", "--timeout", "20") as srv:
                    pod.traffic("tcp-send", "--to", out.ip, "--port", str(port), "--count", str(n), "--size", "64",
                                "--echo")
                assert srv.result == {"received_bytes": 64 * n}, srv.result

        agent.tracer.set_uplinks(nics.uplink_ifindexes() + [up.ifindex])
        try:
            m = measure(agent, [a], udp_in if nat == "dnat" else tcp_out, read_kernel=True, dir_mask=0b01,
                        **EVERY_PACKET)
        finally:
            agent.tracer.set_uplinks(nics.uplink_ifindexes())
    # The outside is a namespace's veth here, not a NIC: to the probes another pod, whose first packet,
    # addressed to the node, makes its NET_RX run quiet (the first from each CPU at most; counted).
    misses = m.kernel_counters["quiet_misses"]
    assert misses <= 2, m.kernel_counters
    if nat == "dnat":
        stats = check_kernel_against_events(m, a, Direction.RX, rx_expected, allow=("quiet_misses",))
        read = [e for e in m.event_list if e.direction is Direction.RX and e.dport == 9230 and e.ts[5]]
        assert len(read) == stats["rx_total"].count == n - misses, (len(read), stats["rx_total"].count)
    else:
        stats = m.kernel["a"]
        read = [e for e in m.event_list if e.direction is Direction.RX and e.sport == 9240 and e.ts[5]]
        assert stats["rx_socket_queue"].count == len(read) >= n * 0.99, (stats["rx_socket_queue"].count, len(read))
    # Every packet into the pod (the TCP handshake's and bare ACKs included) was seen on the host first,
    # in a NET_RX run: none started in the pod.
    assert stats["rx_driver"].count == stats["rx_host_to_pod"].count >= len(read), stats
    bad = [(e.ts, e.ifindex) for e in read
           if not (e.ts[1] and e.ts[1] <= e.ts[2] < e.ts[3] and e.ifindex[0] == bridge_ifindex)]
    assert not bad, (len(bad), bad[:3])
    assert all(e.first_ns == (e.ts[0] or e.ts[1]) for e in read)  # rx_total starts in the interrupt context
    assert sum(m.slot_counts.values()) == m.slot_counts[m.slots["a"]], m.slot_counts  # b's in no slot


@pytest.mark.parametrize(("gro", "reader"), [("rx-udp-gro-forwarding", "split"), ("rx-gro-list", "split"),
                                             ("rx-udp-gro-forwarding", "whole")])
def test_datagrams_the_hosts_gro_merged_are_each_counted_and_measured(agent, lab, gro, reader):
    """UDP from outside the node, through its uplink and DNATed to a traced pod (as to a NodePort), with GRO
    for forwarded UDP on the uplink (`ethtool -K <uplink> gro on rx-udp-gro-forwarding on`, as nodes that
    forward much UDP set it, or `rx-gro-list on`, fraglist GRO): the host merges datagrams into one skb,
    which crosses into the pod whole. There UDP splits it up again (`split`): each datagram is counted and,
    when timed, measured to its own read with its skb's times up to the pod. Or a socket with UDP_GRO takes
    it whole (`whole`): one read, one journey, each datagram counted. Those after each skb's first are
    counted in `gro_merged`. Before, each skb counted once, and no counter said so: 39 to 41 of 2,000
    datagrams here (965 to 1,477 with the uplink's NAPI threaded and no flush timeout). GRO's flush timer
    now and then fires while a thread of this VM's init is current, whose context no BPF program sees
    (tests/blindspot.py): the datagrams of that softirq are then missing from every count, by exactly
    what the kernel's own trace events saw received there (1 run in 4 to 80 here)."""
    from latencytrace.node_agent.kernel import nics
    from tests.blindspot import BpfBlindReceives, udp_datagrams
    from tests.netlab import Uplink

    a = lab.add_pod("a")
    n = 2000
    got = {}
    with Uplink(lab) as up:
        sh("ethtool", "-K", up.dev, "gro", "on", gro, "on")
        # GRO holds what it merged for up to 200 µs past a poll (as a NIC's interrupt coalescing makes it
        # wait), so that the datagrams, 20 µs apart, are merged however the NAPI polls fall.
        Path(f"/sys/class/net/{up.dev}/gro_flush_timeout").write_text("200000")
        up.dnat("udp", 9260, a, 9260)

        def traffic():
            with a.serve("udp-recv", "--port", "9260", "--count", str(n), "--timeout", "20",
                         *(["--gro"] if reader == "whole" else [])) as rx:
                up.outside.traffic("udp-send", "--to", up.node_ip, "--port", "9260", "--count", str(n),
                                   "--rate", "50000")
            got.update(rx.result)

        agent.tracer.set_uplinks(nics.uplink_ifindexes() + [up.ifindex])
        try:
            with BpfBlindReceives() as blind:
                m = measure(agent, [a], traffic, read_kernel=True, dir_mask=0b01, **EVERY_PACKET)
        finally:
            agent.tracer.set_uplinks(nics.uplink_ifindexes())
    assert got["received"] == n, got
    (doc,) = [t for t in m.as_json()["targets"] if t["netns_inode"] == a.inode]
    segs = {k: v.count for k, v in m.kernel["a"].items() if v.count}
    # Every datagram counted, or all but those received where no BPF program runs: an skb the pod received
    # unseen is uncounted whole if the host's receive of it was unseen too, else but for its first datagram,
    # counted where the host forwarded it (a string, which pytest prints whole).
    host_unseen = {addr for dev, addr, _ in blind.receives if dev != "eth0"}
    pod_unseen = [(k, addr in host_unseen) for addr, length in blind.on("eth0") if (k := udp_datagrams(length))]
    unseen = sum(k - (not whole) for k, whole in pod_unseen)
    assert doc["packets"]["receive"] in {n, n - unseen}, \
        f"{doc['packets']} unseen={unseen} {blind.receives} {m.kernel_counters} {segs} {got}"
    # The case under test happened (GRO holds what it merged for 200 µs: most are).
    merged = m.kernel_counters["gro_merged"]
    assert merged > 0, str(m.kernel_counters)
    stats = check_kernel_against_events(m, a, Direction.RX, rx_expected, allow=("gro_merged", "quiet_misses"))
    read = [e for e in m.event_list if e.direction is Direction.RX and e.dport == 9260 and e.ts[5]]
    counts = {seg: stats[seg].count for seg in ("rx_host_to_pod", "rx_pod_stack", "rx_socket_queue", "rx_total")}
    assert set(counts.values()) == {len(read)}, (counts, len(read))
    # Every journey timed, but those of an skb a quiet NET_RX run carried (the outside's first packet to
    # the node, as in the NAT test above; up to 64 datagrams a GRO skb).
    misses = m.kernel_counters["quiet_misses"]
    by_skb: dict[int, list] = {}  # journeys by their time at the pod: one skb's share it
    for e in read:
        by_skb.setdefault(e.ts[3], []).append(e)
    if reader == "whole":
        # Each read an skb, whole (those after the first of an skb the pod received unseen not in gro_merged).
        assert n - merged in {got["reads"], got["reads"] + sum(k - 1 for k, _ in pod_unseen)}, (got, merged)
        assert misses <= 2 and got["reads"] - misses - len(pod_unseen) <= len(read) <= got["reads"], \
            (len(read), got, misses)
        assert len(by_skb) == len(read), (len(by_skb), len(read))
        return
    assert misses <= 2 and n - unseen - 64 * misses <= len(read) <= n, (len(read), unseen, str(m.kernel_counters))
    # Datagrams of one skb share its times up to the pod, and each has its own wakeup and read.
    shared = [evs for evs in by_skb.values() if len(evs) > 1]
    assert shared, "no two datagrams shared an skb's times"
    assert all(len({tuple(e.ts[:4]) for e in evs}) == 1 and len({e.ts[4] for e in evs}) == len(evs) for evs in shared)


def test_packets_through_a_service_ip_on_the_node_start_where_the_host_queues_them(agent, lab):
    """A pod sends to a Service's virtual IP, which the node DNATs (as kube-proxy does) to a traced pod and
    to an untraced one on the same node. At the host's netif_receive_skb the packets are addressed to the
    Service; the traced pod's start where the host queues them on that pod's own veth, in the NET_RX run
    that received them (irq, softirq, host_rx, pod_rx in this order: rx_host_to_pod exists and rx_total
    starts on the host); the untraced pod's are in no slot. The client's first packet, addressed to no
    traced pod, made its NET_RX run quiet (no clock read): that one is counted in `quiet_misses`, not
    timed, and every later one is timed."""
    import socket

    from tests.netlab import ClusterIP

    a, b, client = lab.add_pod("a"), lab.add_pod("b"), lab.add_pod("client")
    n = 1000
    with ClusterIP(lab) as svc:
        svc.to("udp", 9250, a, 9250)
        svc.to("udp", 9251, b, 9250)

        m = measure(agent, [a], lambda: udp_through_nat(client, svc.ip, (9250, 9251), [(a, 9250), (b, 9250)], n),
                    read_kernel=True, dir_mask=0b01, **EVERY_PACKET)
    stats = check_kernel_against_events(m, a, Direction.RX, rx_expected, allow=("quiet_misses",))
    read = [e for e in m.event_list if e.direction is Direction.RX and e.dport == 9250 and e.ts[5]]
    misses = m.kernel_counters["quiet_misses"]
    assert 1 <= misses <= 2, m.kernel_counters  # the first packet (from each CPU at most): then the client is loud
    assert len(read) == stats["rx_total"].count == stats["rx_host_to_pod"].count == n - misses, stats
    veth = socket.if_nametoindex(a.host_veth)
    bad = [(e.ts, e.ifindex) for e in read
           if not (e.ts[1] and e.ts[1] <= e.ts[2] < e.ts[3] and e.ifindex[0] == veth and e.saddr == client.ip)]
    assert not bad, (len(bad), bad[:3])
    assert sum(m.slot_counts.values()) == m.slot_counts[m.slots["a"]], m.slot_counts  # b's in no slot


def test_a_traced_pods_packets_through_a_service_ip_start_where_the_host_queues_them_too(agent, lab):
    """A traced pod sends to a Service's virtual IP that the node DNATs to another traced pod: the packet
    is in the sender's transmit flight when the host queues it on the receiver's veth, and its receive
    journey starts there as another pod's would (it had none: no rx_host_to_pod, rx_driver ending in the
    pod). Every packet is timed both ways."""
    from tests.netlab import ClusterIP

    a, client = lab.add_pod("a"), lab.add_pod("client")
    n = 1000
    with ClusterIP(lab) as svc:
        svc.to("udp", 9252, a, 9252)
        m = measure(agent, [a, client], lambda: udp_through_nat(client, svc.ip, (9252,), [(a, 9252)], n),
                    read_kernel=True, **EVERY_PACKET)
    assert m.kernel_counters["quiet_misses"] == 0, m.kernel_counters  # a traced sender's runs are timed
    rx, tx = m.kernel[a.name], m.kernel[client.name]
    assert rx["rx_host_to_pod"].count == rx["rx_driver"].count == rx["rx_total"].count == n, rx
    assert tx["tx_pod_to_host"].count == tx["tx_total"].count == n, tx
    # rx_driver ends on the host, where rx_host_to_pod starts: the two add up to the span between them.
    assert rx["rx_driver"].sum_ns + rx["rx_host_to_pod"].sum_ns <= rx["rx_total"].sum_ns, rx


def check_tcp_reads(m, pod) -> list:
    """The packets read into `pod` over TCP: each read after its wakeup, the kernel's socket-queue and
    total times exactly those of the events, and every data packet that woke the socket read (its
    SYN, bare ACKs and FIN end in the pod's stack: no wakeup, no read, no event). A segment queued out of
    order (behind one the busy machine lost: 7 once in CI) is such a packet too, its socket-queue time
    including the wait for the data before it, and is checked with the rest."""
    assert_no_troubles(m, ("out_of_order",))
    stats = m.kernel[pod.name]
    reads = [e for e in m.event_list if e.direction is Direction.RX and e.ts[5]]
    assert reads and {(e.protocol, e.daddr) for e in reads} == {("tcp", pod.ip)}
    assert all(e.ts[3] <= e.ts[4] <= e.ts[5] for e in reads)  # pod_rx, sock_ready, app_read
    for seg, ns in (("rx_socket_queue", [e.ts[5] - e.ts[4] for e in reads]),
                    ("rx_total", [e.ts[5] - e.first_ns for e in reads])):
        assert (stats[seg].count, stats[seg].sum_ns) == (len(ns), sum(ns)), (seg, stats[seg], len(ns), sum(ns))
    assert stats["rx_pod_stack"].count == len(reads), (stats["rx_pod_stack"].count, len(reads))
    return reads


@pytest.mark.parametrize("reader", ["recv", "splice"])
def test_tcp_reads_end_when_the_read_position_passes_the_data(agent, lab, reader):
    """Every TCP read path moves the socket's read position and reports it (tcp_rcv_space_adjust):
    recv(2), and splice(2) into a pipe, as proxies and Go's io.Copy between sockets read, which no copy
    out of an skb names. Every data packet that woke the socket is read, after its wakeup, and the
    kernel recorded exactly the times the packets' own boundaries give."""
    a, client = lab.add_pod("a"), lab.add_pod("client")
    prog = kernel.our_programs(agent.tracer)["lt_tcp_rcv_space_adjust"]
    runs0 = kernel.programs({prog})[prog].run_cnt
    splice = ["--splice"] if reader == "splice" else []

    def traffic():
        with a.serve("tcp-sink", "--port", "9705", "--timeout", "20", *splice) as rx:
            client.traffic("tcp-send", "--to", a.ip, "--port", "9705", "--count", "200", "--size", "1000")
        assert rx.result == {"received_bytes": 200_000}

    m = measure(agent, [a], traffic, read_kernel=True, dir_mask=0b01, **EVERY_PACKET)
    check_tcp_reads(m, a)
    assert kernel.programs({prog})[prog].run_cnt > runs0


def held_tcp_transfer(agent, lab, port: int, count: int, size: int, *sink_args: str):
    """`count` segments of `size` bytes from a client pod into pod "a", whose tcp-sink reads nothing until
    all are sent, then reads (with `sink_args`). What the agent measured, the pod, and when the reader was
    let go (CLOCK_MONOTONIC ns)."""

    a, client = lab.add_pod("a"), lab.add_pod("client")
    go = Path(f"/tmp/lt-test-hold-{a.netns}")
    go.unlink(missing_ok=True)
    started = {}

    def traffic():
        with a.serve("tcp-sink", "--port", str(port), "--timeout", "20", "--hold-until", str(go), *sink_args) as rx:
            client.traffic("tcp-send", "--to", a.ip, "--port", str(port), "--count", str(count), "--size", str(size))
            started["ns"] = time.monotonic_ns()
            go.touch()
        assert rx.result == {"received_bytes": count * size}

    try:
        m = measure(agent, [a], traffic, read_kernel=True, dir_mask=0b01, **EVERY_PACKET)
    finally:
        go.unlink(missing_ok=True)
    return m, a, started["ns"]


@pytest.mark.parametrize("reader", ["recv", "splice"])
def test_tcp_packets_merged_into_the_queue_tail_are_read_with_its_data(agent, lab, reader):
    """A reader that holds off while 300 small segments arrive: TCP merges most of them into the skb at
    the tail of the socket's queue (the kernel counts them as coalesced). Each is still measured to the
    read of its own data, none is lost: as many reads as wakeups, and every read after the reader
    started. A splice reads them all at once, one report of the read position for them all (more than
    one run of the probe records)."""
    m, a, started = held_tcp_transfer(agent, lab, 9706, 300, 100, *(["--splice"] if reader == "splice" else []))
    assert m.kernel_counters["coalesced"] > 0, m.kernel_counters  # the case under test happened
    reads = check_tcp_reads(m, a)
    assert all(e.ts[5] >= started for e in reads), [e.ts for e in reads if e.ts[5] < started][:3]
    if reader == "splice":  # one read of them all: more than one run of the probe recorded them
        assert m.kernel_counters["read_continuations"] > 0, m.kernel_counters


def test_a_tcp_read_of_part_of_the_queue_costs_one_probe_run(agent, lab):
    """A reader that takes 100 bytes at a time from a queue of 200 packets of 1,000 bytes: each read ends at
    most one packet, and the walk of the socket's ring stops at the first unread one, in one run of the
    probe. (A further run whenever packets were left unread, a bulk reader's usual state, ran the probe
    up to 33 times at every read: in TCP bulk, 592 of the 1,424 ns all probes took a packet.) Every
    packet is still read, once, after the reader started."""
    m, a, started = held_tcp_transfer(agent, lab, 9708, 200, 1000, "--chunk", "100")
    reads = check_tcp_reads(m, a)
    assert len(reads) >= 200, len(reads)
    assert all(e.ts[5] >= started for e in reads), [e.ts for e in reads if e.ts[5] < started][:3]
    assert m.kernel_counters["read_continuations"] == 0, m.kernel_counters


@pytest.mark.parametrize("packets,further_runs", [(16, 0), (17, 1)])
def test_a_tcp_read_of_one_run_s_share_takes_one_run(agent, lab, packets, further_runs):
    """One splice of 16 packets' data (what one run of the read probe records) is recorded in one run, and
    one of 17 in two: a further run goes on only when packets wait after a run's share (it went on after
    exactly 16 too, and returned at once, counted)."""
    m, a, _ = held_tcp_transfer(agent, lab, 9709 + packets % 2, packets, 100, "--splice")
    reads = check_tcp_reads(m, a)
    assert len(reads) == packets, len(reads)  # each send its own packet (TCP_NODELAY), all read at once
    assert m.kernel_counters["read_continuations"] == further_runs, m.kernel_counters


def socket_reads(m, pod, sport: int) -> list:
    """The packets read in `pod`: all from the client's port `sport`, each read after its wakeup, the
    kernel's socket-queue and total times exactly the events'."""
    reads = [e for e in m.event_list if e.direction is Direction.RX and e.ts[5]]
    assert reads and {e.sport for e in reads} == {sport}, sorted({e.sport for e in reads})
    assert all(e.ts[3] <= e.ts[4] <= e.ts[5] for e in reads)
    stats = m.kernel[pod.name]
    for seg, ns in (("rx_socket_queue", [e.ts[5] - e.ts[4] for e in reads]),
                    ("rx_total", [e.ts[5] - e.first_ns for e in reads])):
        assert (stats[seg].count, stats[seg].sum_ns) == (len(ns), sum(ns)), (seg, stats[seg], len(ns), sum(ns))
    return reads


def test_a_tcp_connection_at_a_closed_ones_address_starts_afresh(agent, lab):
    """Connections the server closes with their data unread leave packets in the socket's ring that no
    read will end; a later connection's socket, at the same address (the kernel reuses the memory), must
    not inherit them: its reads are its own packets', each read, no earlier connection's taken as read."""
    a, client = lab.add_pod("a"), lab.add_pod("client")
    rounds, sent = 30, {}

    def traffic():
        # One CPU for both ends: the server's sockets are made there (the handshake's softirq runs on the
        # sender's CPU) and freed there, into that CPU's free list, where the next one comes from.
        with a.serve("tcp-sink", "--port", "9707", "--timeout", "20", "--discard", str(rounds - 1),
                     "--count", "20", "--size", "100", "--cpu", "0") as rx:
            sent.update(client.traffic("tcp-send", "--to", a.ip, "--port", "9707", "--count", "20", "--size", "100",
                                       "--rounds", str(rounds), "--cpu", "0"))
        assert rx.result == {"received_bytes": 2000, "reused": True}, rx.result  # the case under test happened

    m = measure(agent, [a], traffic, read_kernel=True, dir_mask=0b01, **EVERY_PACKET)
    reads = socket_reads(m, a, sent["sport"])
    assert sum(e.length - 20 - 32 for e in reads) == 2000, [e.length for e in reads]  # IPv4, TCP with timestamps
    assert_no_troubles(m, ("collisions",))


def test_a_udp_socket_at_a_closed_ones_address_starts_afresh(agent, lab):
    """The same for UDP, whose reads are matched by order: datagrams a closed socket never read must not
    shift a later socket's reads at its address (each would take an earlier datagram's entry)."""
    a, client = lab.add_pod("a"), lab.add_pod("client")
    rounds, sent = 30, {}

    def traffic():
        with a.serve("udp-recv", "--port", "9004", "--count", "20", "--timeout", "20",
                     "--discard", str(rounds - 1), "--cpu", "0") as rx:  # one CPU's free sockets
            sent.update(client.traffic("udp-send", "--to", a.ip, "--port", "9004", "--count", "20",
                                       "--rounds", str(rounds)))
        assert rx.result == {"received": 20, "reused": True}, rx.result  # the case under test happened

    m = measure(agent, [a], traffic, read_kernel=True, dir_mask=0b01, **EVERY_PACKET)
    reads = socket_reads(m, a, sent["sport"])
    assert len(reads) == 20, len(reads)
    assert_no_troubles(m, ("collisions",))

