"""The one table of stack segments: names, directions, boundary events and the tracepoints behind them.

Everything that talks about segments reads this table: the BPF programs (segment and boundary ids are
passed to them as -D macros generated here), the collectors, the exporters, the CLI and the README.
A packet's journey is a list of *boundaries* (kernel timestamps taken at tracepoints); a *segment* is the
time between two boundaries.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class Direction(enum.IntEnum):
    RX = 0
    TX = 1

    @property
    def otel(self) -> str:
        """Value of the `network.io.direction` attribute."""
        return "receive" if self is Direction.RX else "transmit"


@dataclass(frozen=True)
class Boundary:
    id: int  # index into the event's timestamp array for its direction
    name: str
    direction: Direction
    tracepoints: tuple[str, ...]
    doc: str


@dataclass(frozen=True)
class Segment:
    id: int
    name: str
    direction: Direction
    start: str  # boundary name, or "first" for the earliest boundary seen
    end: str
    doc: str

    @property
    def is_total(self) -> bool:
        return self.start == "first"


RX_BOUNDARIES: tuple[Boundary, ...] = (
    Boundary(0, "irq", Direction.RX, ("irq:irq_handler_entry", "irq:softirq_raise"),
             "NIC hardirq entry on the CPU (IRQs of physical NICs only), or, where none preceded it, "
             "the moment NET_RX softirq became pending on that CPU (veth and other software devices); for a "
             "packet queued during a quiet NET_RX run (one an untraced pod's send raised), the moment it was "
             "queued."),
    Boundary(1, "softirq", Direction.RX, ("irq:softirq_entry",),
             "NET_RX softirq entry on the CPU that then processes the packet; for a packet queued during a "
             "quiet NET_RX run, the moment it was queued."),
    Boundary(2, "host_rx", Direction.RX, ("net:netif_receive_skb", "net:net_dev_queue"),
             "First netif_receive_skb of the skb outside the pod's network namespace "
             "(host side: NIC, bridge port or veth peer), recognised by the pod IP as destination; for a "
             "packet the host itself sends (hostNetwork clients, kubelet probes, node-local DNS), its first "
             "net_dev_queue outside the pod (the host queues it toward the pod); for a packet received on "
             "an uplink (a physical NIC, or a bond, VLAN or bridge on one) addressed to the node and "
             "de-NATed to the pod (replies to a pod's masqueraded connections, NodePort or Service DNAT: "
             "conntrack rewrites the destination after netif_receive_skb), the first net_dev_queue of its "
             "forward toward the pod, in the same NET_RX run (which gives it its irq and softirq times); "
             "for a packet from another pod on the node to a Service's virtual IP, DNATed to the pod by the "
             "node, its net_dev_queue on the pod's own veth (host side)."),
    Boundary(3, "pod_rx", Direction.RX, ("net:netif_receive_skb",),
             "netif_receive_skb of the skb on a device inside the pod's network namespace."),
    Boundary(4, "sock_ready", Direction.RX, ("sock:sk_data_ready", "tcp:tcp_probe"),
             "sk_data_ready for the socket the skb was queued on (the socket was told data is there); for TCP "
             "the skb is the one tcp_probe (the start of tcp_rcv_established) last named for that socket on "
             "the CPU, also when TCP processes the backlog a reader left; a TCP segment queued out of order "
             "(behind a lost or reordered one), which wakes no reader, at tcp_probe, where TCP queues it (its "
             "socket-queue time includes the wait for the data before it: head-of-line blocking)."),
    Boundary(5, "app_read", Direction.RX, ("tcp:tcp_rcv_space_adjust", "sock:sock_recv_length"),
             "The application reads it: for TCP when the socket's read position (copied_seq) passes the end "
             "of the packet's data, which every TCP read path (recvmsg, splice, zero-copy receive) reports "
             "with tcp_rcv_space_adjust, also for a packet merged into another skb of the queue; UDP copies "
             "without naming the skb, so the n-th datagram a socket returns from recvmsg (sock_recv_length) is "
             "the n-th packet queued on it."),
)

TX_BOUNDARIES: tuple[Boundary, ...] = (
    Boundary(0, "app_send", Direction.TX, ("raw_syscalls:sys_enter", "tcp:tcp_sendmsg_locked"),
             "Start of the send that produced the skb: the thread's send syscall (sendto, sendmsg, sendmmsg, "
             "write, writev), or for TCP tcp_sendmsg_locked of the socket when no syscall of it was seen. "
             "Only the first skb a send produces carries it."),
    Boundary(1, "pod_dev_queue", Direction.TX, ("net:net_dev_queue",),
             "net_dev_queue on the pod's own device (inside the pod's network namespace)."),
    Boundary(2, "host_rx", Direction.TX, ("net:netif_receive_skb",),
             "The skb arrives on the host side (netif_receive_skb on the veth peer outside the pod)."),
    Boundary(3, "egress_queue", Direction.TX, ("net:net_dev_queue",),
             "The last net_dev_queue of the skb, on the device it leaves through (the egress device)."),
    Boundary(4, "egress_xmit", Direction.TX, ("net:net_dev_start_xmit",),
             "net_dev_start_xmit on the egress device: the qdisc hands the skb to the driver."),
    Boundary(5, "done", Direction.TX, ("net:net_dev_xmit", "skb:consume_skb", "sock:sk_data_ready"),
             "Transmit completion: consume_skb after the driver transmitted it (physical NICs); for a "
             "virtual egress device (veth to another pod) the return of its xmit routine, known once the "
             "skb shows up in the peer namespace; for delivery to a host socket, sk_data_ready."),
)

SEGMENTS: tuple[Segment, ...] = (
    Segment(0, "rx_irq", Direction.RX, "irq", "softirq",
            "Interrupt processing latency: hardirq (or softirq raise) until NET_RX softirq runs."),
    Segment(1, "rx_driver", Direction.RX, "softirq", "host_rx",
            "Driver and GRO work in the softirq until the stack first sees the skb on the host side "
            "(ends at pod_rx when there is no host-side sighting)."),
    Segment(2, "rx_host_to_pod", Direction.RX, "host_rx", "pod_rx",
            "Host bridge/routing and the veth crossing into the pod, including backlog queueing (for a "
            "packet the host sends: from its queueing on the host's device)."),
    Segment(3, "rx_pod_stack", Direction.RX, "pod_rx", "sock_ready",
            "The pod's IP and TCP/UDP processing until the socket is woken."),
    Segment(4, "rx_socket_queue", Direction.RX, "sock_ready", "app_read",
            "Time in the socket receive queue until the application reads it (for a TCP segment that came "
            "out of order, also the wait for the data before it)."),
    Segment(5, "rx_total", Direction.RX, "first", "app_read",
            "From the first boundary seen for the packet to the application's read."),
    Segment(6, "tx_app_to_dev", Direction.TX, "app_send", "pod_dev_queue",
            "The pod's socket, TCP/UDP and IP output until the pod's device queue."),
    Segment(7, "tx_pod_to_host", Direction.TX, "pod_dev_queue", "host_rx",
            "The pod's device and the veth crossing to the host side."),
    Segment(8, "tx_qdisc", Direction.TX, "egress_queue", "egress_xmit",
            "Queueing discipline of the egress device."),
    Segment(9, "tx_driver", Direction.TX, "egress_xmit", "done",
            "Driver transmit until completion (or hand-over to the peer namespace for veth)."),
    Segment(10, "tx_total", Direction.TX, "first", "done",
            "From the first boundary seen for the packet to transmit completion."),
)

BY_NAME: dict[str, Segment] = {s.name: s for s in SEGMENTS}
NAMES: tuple[str, ...] = tuple(s.name for s in SEGMENTS)
N_SEGMENTS = len(SEGMENTS)
N_BOUNDARIES = 6  # per direction; events carry one timestamp array of this length


def boundaries(direction: Direction) -> tuple[Boundary, ...]:
    return RX_BOUNDARIES if direction is Direction.RX else TX_BOUNDARIES


def boundary_id(direction: Direction, name: str) -> int:
    for b in boundaries(direction):
        if b.name == name:
            return b.id
    raise KeyError(f"no {direction.name} boundary named {name!r}")


def segments_of(direction: Direction) -> tuple[Segment, ...]:
    return tuple(s for s in SEGMENTS if s.direction is direction)


def direction_mask(directions: Iterable[str]) -> int:
    """The kernel's dir_mask (bit per Direction) for `network.io.direction` values."""
    wanted = set(directions)
    return sum(1 << d for d in Direction if d.otel in wanted)


def of_directions(dir_mask: int) -> int:
    """Bit per segment id of every segment of the directions in `dir_mask`."""
    return sum(1 << s.id for s in SEGMENTS if dir_mask >> s.direction & 1)


def bpf_macros() -> dict[str, int]:
    """Segment and boundary ids as C macros (LT_SEG_RX_IRQ, LT_B_RX_IRQ, ...) for bpf/*.c."""
    macros = {f"LT_SEG_{s.name.upper()}": s.id for s in SEGMENTS}
    for d in Direction:
        for b in boundaries(d):
            macros[f"LT_B_{d.name}_{b.name.upper()}"] = b.id
    macros["LT_NSEG"] = N_SEGMENTS
    macros["LT_NBOUND"] = N_BOUNDARIES
    return macros


def mask(names: list[str] | tuple[str, ...] | None) -> int:
    """Bit mask of segment ids; None or empty means all segments."""
    if not names:
        return (1 << N_SEGMENTS) - 1
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown segment(s) {', '.join(unknown)}; known: {', '.join(NAMES)}")
    m = 0
    for n in names:
        m |= 1 << BY_NAME[n].id
    return m


def markdown() -> str:
    """The segment and boundary tables as they appear in the README (tests keep the README in sync)."""
    lines = ["| segment | direction | from | to | what it is |", "|---|---|---|---|---|"]
    for s in SEGMENTS:
        lines.append(f"| `{s.name}` | {s.direction.otel} | {s.start} | {s.end} | {s.doc} |")
    lines += ["", "| boundary | direction | tracepoints | exact point |", "|---|---|---|---|"]
    for d in Direction:
        for b in boundaries(d):
            tps = ", ".join(f"`{t}`" for t in b.tracepoints)
            lines.append(f"| {b.name} | {d.otel} | {tps} | {b.doc} |")
    return "\n".join(lines)
