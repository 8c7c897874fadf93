"""Quiet NET_RX runs (bpf/latencytrace.h, LT_PEND_QUIET): an untraced pod's send of a packet addressed to no
traced pod makes the run it raises read no clock, and lets the host's hooks turn that packet away without a
lookup (lt_quiet_pkt, by its skb's address). The hook that ends each run (lt_softirq_exit) ends that state;
a trace without rx_irq and rx_driver attaches no softirq hook, and then no send may start it: it would
outlive its packet, and a later packet that took the freed skb (a NIC's, which no send of a pod precedes)
would be turned away at the host's netif_receive_skb as if it were the quiet one."""

from __future__ import annotations

import contextlib
import socket

from latencytrace.node_agent import program, segments

from tests.bench.overhead import LEAN_SEGMENTS

from .conftest import measure
from .test_segments_kernel import udp_burst

# The chart's example of limits.segments, which attaches no softirq hook.
LEAN = segments.mask(list(LEAN_SEGMENTS))
QUIET_PENDING = range(1, 5)  # LT_PEND_QUIET .. LT_PEND_UNTIMED_NEXT


def cpus(agent) -> list:
    return list(agent.tracer.table("lt_cpu").values())


def to_the_host(lab, client, port: int, n: int) -> None:
    """`n` datagrams from `client` to a socket of the host itself (the bridge's address: as a pod's query
    to node-local DNS): delivered to the host's stack, they cross no device of the host's after the pod's."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((lab.gateway, port))
        s.settimeout(5)
        client.traffic("udp-send", "--to", lab.gateway, "--port", str(port), "--count", str(n), "--rate", "2000")
        got = 0
        with contextlib.suppress(TimeoutError):
            while got < n:
                s.recv(2048)
                got += 1
    assert got == n, got


def test_an_untraced_pods_sends_leave_no_quiet_state_without_the_hook_that_ends_it(agent, lab):
    traced, client, server = lab.add_pod("t"), lab.add_pod("c"), lab.add_pod("s")
    seen: dict[str, tuple] = {}

    def traffic() -> None:
        udp_burst(server, client, 9410, 200)  # pod to pod: the host's queueing of each ends its state
        to_the_host(lab, client, 9411, 200)  # pod to host: nothing after its own device did

    def look(name: str) -> None:
        entries = cpus(agent)
        seen[name] = ({int(e.want_gen) & program.GEN_QUIET_RUNS for e in entries},
                      [(int(e.t_pending), int(e.quiet_skb)) for e in entries
                       if int(e.t_pending) in QUIET_PENDING or int(e.quiet_skb)])

    for name, mask in (("lean", LEAN), ("all", segments.mask(None))):
        measure(agent, [traced], traffic, then=lambda n=name: look(n), seg_mask=mask)
    # Without softirq_exit, quiet runs are off on every CPU, and the untraced pod's 400 sends started none.
    assert seen["lean"] == ({0}, []), seen["lean"]
    # With it they are on (each run that delivered a quiet packet ended its state: not asserted, as the
    # machine's own traffic may be in a run at this moment).
    assert seen["all"][0] == {program.GEN_QUIET_RUNS}, seen["all"]
