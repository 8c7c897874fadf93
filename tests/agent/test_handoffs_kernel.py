"""The handoffs from a packet's receive to its socket's wakeup (lt_cpu.rx_skb, a traced pod's packet in its stack;
lt_cpu.tx_skb, a traced pod's packet that reached the host) end where the CPU receives its next packet
(bpf/latencytrace.h, lt_handoffs_end). lt_softirq_exit ends them with each NET_RX run too, but a trace
without rx_irq and rx_driver attaches no softirq hook: a packet that no socket took (sent to a closed port)
then left its handoff on the CPU, for a later wakeup to take for a packet whose skb had come to its address."""

from __future__ import annotations

import contextlib
import os
import socket

from .conftest import measure
from .test_quiet_runs_kernel import LEAN, cpus


@contextlib.contextmanager
def on_cpu(cpu: int):
    """Run the calling thread on `cpu` alone: what it sends over loopback is received on that CPU."""
    was = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, was)


def send(to: str, port: int, n: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _ in range(n):
            s.sendto(b"x" * 32, (to, port))


def test_a_packet_no_socket_took_leaves_no_handoff_behind(agent, lab):
    traced = lab.add_pod("t")
    left: dict[str, list] = {}

    def traffic() -> None:
        # Into closed ports: the traced pod's datagrams to the host (tx_skb), the host's to the pod (rx_skb).
        traced.traffic("udp-send", "--to", lab.gateway, "--port", "9412", "--count", "50", "--rate", "2000")
        send(traced.ip, 9413, 50)
        left["before"] = handoffs()
        # Then every CPU receives a packet of the host's own: a datagram to a closed port over loopback.
        for cpu in sorted(os.sched_getaffinity(0)):
            with on_cpu(cpu):
                send("127.0.0.1", 9414, 1)
        left["after"] = handoffs()

    def handoffs() -> list:
        return [(i, int(e.rx_skb), int(e.tx_skb)) for i, e in enumerate(cpus(agent)) if e.rx_skb or e.tx_skb]

    measure(agent, [traced], traffic, seg_mask=LEAN)
    # The closed ports' packets left handoffs (else this test shows nothing), and the next packet ended them.
    assert left["before"], left
    assert left["after"] == [], left
