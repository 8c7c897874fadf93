"""The packets a test machine's kernel shows to no BPF program, as its own trace events (ftrace) see them.

On the VMs these tests run on, BPF tracing programs do not run while a thread of the VM's init (PID 1,
the sandbox's process API) is the current task, whatever the context: measured on 2026-12-07 with
bpftrace and ftrace side by side for 10 s (the kernel's mono clock, events matched within 20 µs), 36
of 36 softirq_entry and hrtimer_expire_entry events in its threads' context reached no BPF program
and no recursion miss was counted, against 0 of 627 missed in other contexts (idle, bpftrace,
kernel threads). A NET_RX softirq that runs on the back of an interrupt taken while such a thread is
current (a device's GRO flush timer, say) receives packets that
neither the agent's probes nor bpftrace see. In three failing runs of
test_datagrams_the_hosts_gro_merged_are_each_counted_and_measured, ftrace's netif_receive_skb saw one
skb more at the uplink and in the pod than bpftrace did (of 1, 16 and 16 datagrams), the agent's count
was short by exactly that, each of those skbs was received in the context of a thread of PID 1
(`tokio-rt-worker`), and where a scratch counter sat on the agent's first instruction (two of the
runs), it had not run for that skb. In a run of
test_a_traced_pods_datagrams_the_hosts_gro_chained_are_not_drops, the 62 transmit flights that ended
with no sighting of the host's receive were the 62 datagrams of the one chain received there. A real
node's init (systemd) is traced like any other process: this is the machine, not the product.

`BpfBlindReceives` records, for the length of a `with` block, the netif_receive_skb events in the
context of PID 1's threads, in a tracefs instance of its own (the global trace buffer stays as it
was). A test whose count can fall short that way accepts the full count or the full count less
exactly what was received there: still exact. (ftrace prints an skb's address hashed, the same hash
for the same address, so an skb's sightings on several devices pair up.)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
# netif_receive_skb: dev=eth0 skbaddr=00000000c34efd63 len=1052
_EVENT = re.compile(r"netif_receive_skb: dev=(\S+) skbaddr=(\S+) len=(\d+)")


def blind_tasks() -> list[int]:
    """The thread ids of PID 1: the tasks that no BPF program sees on these VMs (see above)."""
    return sorted(int(t) for t in os.listdir("/proc/1/task"))


class BpfBlindReceives:
    """netif_receive_skb events in the context of PID 1's threads: `receives` holds (device, hashed skb
    address, skb length) in order (an skb GRO made of several datagrams is one, with its whole length)."""

    def __init__(self) -> None:
        self.dir = TRACEFS / "instances" / f"lt-blind-{os.getpid()}"
        self.receives: list[tuple[str, str, int]] = []

    def __enter__(self) -> BpfBlindReceives:
        self.dir.mkdir()
        event = self.dir / "events" / "net" / "netif_receive_skb"
        (event / "filter").write_text(" || ".join(f"common_pid == {t}" for t in blind_tasks()))
        (event / "enable").write_text("1")
        return self

    def __exit__(self, *exc) -> None:
        try:
            (self.dir / "events" / "net" / "netif_receive_skb" / "enable").write_text("0")
            text = (self.dir / "trace").read_text()
            self.receives = [(m.group(1), m.group(2), int(m.group(3))) for m in _EVENT.finditer(text)]
        finally:
            self.dir.rmdir()

    def on(self, dev: str) -> list[tuple[str, int]]:
        """(hashed skb address, length) of the skbs received on `dev` unseen."""
        return [(addr, n) for d, addr, n in self.receives if d == dev]


def udp_datagrams(length: int, header: int = 28, payload: int = 64) -> int:
    """The UDP datagrams of `payload` bytes each in an skb of `length` bytes at netif_receive_skb: one IP
    and UDP header (`header` bytes; GRO keeps the first datagram's), then the datagrams' payloads."""
    return max(0, (length - header) // payload)
