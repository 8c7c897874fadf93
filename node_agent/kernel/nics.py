"""IRQ numbers of the physical NICs' queues, so that the hardirq probe ignores every other interrupt."""

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
