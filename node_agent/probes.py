"""The probes: which BPF program runs on which tracepoint, and which segments depend on it.

Only the probes that the targets' segments need are attached: a trace of the receive side only costs
nothing on the transmit path, one without tx_app_to_dev nothing on every syscall of the node.

One row per attachment. `args` is the prototype we read ctx->args[] by (checked against the kernel's
BTF before loading: a tracepoint whose arguments changed is treated as missing, never misread).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import segments


@dataclass(frozen=True)
class Probe:
    program: str      # function in bpf/*.c
    tracepoint: str   # category:name
    source: str       # bpf/<source>.bpf.c
    args: tuple[str, ...] = ()  # leading raw tracepoint argument types the program relies on
    feeds: tuple[str, ...] = ()  # segments that cannot be measured without it (and need it attached)
    always: bool = False  # attached whatever segments the targets ask for

    @property
    def name(self) -> str:
        return self.tracepoint.split(":", 1)[1]


SOURCES = ("irq", "tx", "rx", "drops")  # concatenation order: later files use earlier helpers

# Numbers of the send syscalls lt_sys_enter looks for (LT_NR_* macros), per architecture.
SEND_SYSCALLS = {
    "x86_64": {"WRITE": 1, "WRITEV": 20, "SENDTO": 44, "SENDMSG": 46, "SENDMMSG": 307},
    "aarch64": {"WRITE": 64, "WRITEV": 66, "SENDTO": 206, "SENDMSG": 211, "SENDMMSG": 269},
}


def send_syscalls(machine: str | None = None) -> dict[str, int] | None:
    return SEND_SYSCALLS.get(machine or os.uname().machine)


def needed(probe: Probe, seg_mask: int) -> bool:
    """Whether `probe` must be attached for the segments in `seg_mask` (bit per segment id; 0: nothing
    is traced, so nothing is needed)."""
    return bool(seg_mask) and (probe.always or any(seg_mask >> segments.BY_NAME[s].id & 1 for s in probe.feeds))


_RX_ALL = tuple(s.name for s in segments.segments_of(segments.Direction.RX))
_TX_ALL = tuple(s.name for s in segments.segments_of(segments.Direction.TX))

PROBES: tuple[Probe, ...] = (
    Probe("lt_irq_handler_entry", "irq:irq_handler_entry", "irq", ("int",), feeds=("rx_irq",)),
    Probe("lt_softirq_raise", "irq:softirq_raise", "irq", ("unsigned int",), feeds=("rx_irq",)),
    Probe("lt_softirq_entry", "irq:softirq_entry", "irq", ("unsigned int",), feeds=("rx_irq", "rx_driver")),
    Probe("lt_softirq_exit", "irq:softirq_exit", "irq", ("unsigned int",), feeds=("rx_irq", "rx_driver")),
    # Also where a transmitted packet reaches the host, and another pod (the completion of a veth transmit).
    Probe("lt_netif_receive_skb", "net:netif_receive_skb", "rx", ("sk_buff *",),
          feeds=_RX_ALL + ("tx_pod_to_host", "tx_qdisc", "tx_driver", "tx_total")),
    Probe("lt_sk_data_ready", "sock:sk_data_ready", "rx", ("sock *",),
          feeds=("rx_pod_stack", "rx_socket_queue", "rx_total", "tx_total")),
    # Which skb a TCP socket's sk_data_ready is about, also when TCP processes it from the backlog.
    Probe("lt_tcp_probe", "tcp:tcp_probe", "rx", ("sock *", "sk_buff *"),
          feeds=("rx_pod_stack", "rx_socket_queue", "rx_total")),
    Probe("lt_tcp_rcv_space_adjust", "tcp:tcp_rcv_space_adjust", "rx", ("sock *",),
          feeds=("rx_socket_queue", "rx_total")),
    Probe("lt_sock_recv_length", "sock:sock_recv_length", "rx", ("sock *", "int", "int"),
          feeds=("rx_socket_queue", "rx_total")),
    # Also the host-side boundary of packets the host itself sends into a pod, and of packets it forwards
    # from an uplink into a pod after de-NATing them (where rx_driver ends for them).
    Probe("lt_net_dev_queue", "net:net_dev_queue", "tx", ("sk_buff *",),
          feeds=_TX_ALL + ("rx_driver", "rx_host_to_pod", "rx_total")),
    Probe("lt_net_dev_start_xmit", "net:net_dev_start_xmit", "tx", ("sk_buff *",),
          feeds=("tx_qdisc", "tx_driver", "tx_total")),
    Probe("lt_net_dev_xmit", "net:net_dev_xmit", "tx", ("sk_buff *", "int"), feeds=("tx_driver", "tx_total")),
    Probe("lt_consume_skb", "skb:consume_skb", "tx", ("sk_buff *",), feeds=("tx_driver", "tx_total")),
    Probe("lt_tcp_sendmsg_locked", "tcp:tcp_sendmsg_locked", "tx", ("sock *",), feeds=("tx_app_to_dev",)),
    Probe("lt_sys_enter", "raw_syscalls:sys_enter", "tx", ("pt_regs *", "long int"), feeds=("tx_app_to_dev",)),
    # Drops are counted whatever segments are asked for.
    Probe("lt_kfree_skb", "skb:kfree_skb", "drops", ("sk_buff *",), always=True),
)
