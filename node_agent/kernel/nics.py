"""The host's physical NICs as the probes need them: the IRQ numbers of their queues, so that the hardirq
probe ignores every other interrupt, and the ifindexes of the uplinks, the devices traffic from outside
the node is received on, so that a packet forwarded from one into a pod after NAT can be recognised
before anything reads it."""

from __future__ import annotations

from pathlib import Path

SYS_NET = Path("/sys/class/net")


def nic_irqs(sys_net: Path = SYS_NET) -> list[int]:
    """MSI/MSI-X vectors of every network device backed by hardware (virtio NICs included).

    A virtual device (veth, bridge, ...) has no `device` link. The vectors hang off the PCI function,
    which for virtio is the parent of the device node.
    """
    irqs: set[int] = set()
    for dev in sys_net.iterdir():
        node = dev / "device"
        if not node.exists():
            continue
        node = node.resolve()
        for candidate in (node, node.parent):
            msi = candidate / "msi_irqs"
            if msi.is_dir():
                irqs.update(int(p.name) for p in msi.iterdir() if p.name.isdigit())
                break
            legacy = candidate / "irq"
            if legacy.is_file():
                n = int(legacy.read_text().strip() or 0)
                if n > 0:
                    irqs.add(n)
                break
    return sorted(irqs)


def uplink_ifindexes(sys_net: Path = SYS_NET) -> list[int]:
    """Ifindexes of the devices backed by hardware and of the devices stacked on them (bond, team, VLAN,
    macvlan, a bridge holding the NIC): `upper_*` links, followed to the top. A packet from outside the
    node is received (its skb_iif set) on the topmost of them. Tunnels and veths are not uplinks: what
    arrives through them is addressed to a pod already (seen at netif_receive_skb), or is pod to pod."""
    found: set[str] = set()
    todo = [d.name for d in sys_net.iterdir() if (d / "device").exists()]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        todo += [u.name.removeprefix("upper_") for u in (sys_net / name).glob("upper_*")]
    out = []
    for name in found:
        try:
            out.append(int((sys_net / name / "ifindex").read_text()))
        except (OSError, ValueError):
            continue  # gone meanwhile
    return sorted(out)


def newest_ifindex(sys_net: Path = SYS_NET) -> int:
    """The highest ifindex of the namespace's devices: the kernel numbers a namespace's new devices upward,
    so a higher one than last time means a device created since (a pod's veth, most often)."""
    newest = 0
    for dev in sys_net.iterdir():
        try:
            newest = max(newest, int((dev / "ifindex").read_text()))
        except (OSError, ValueError):  # gone while listed
            continue
    return newest
