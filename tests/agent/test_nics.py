"""Which devices the agent marks as the host's uplinks, read from a sysfs tree laid out as the kernel's
(a tree under tmp_path: the machine's own has one virtio NIC and nothing stacked on it)."""

from __future__ import annotations

from pathlib import Path

from latencytrace.node_agent.kernel import nics


def _dev(root: Path, name: str, ifindex: int, hardware: bool = False, uppers: tuple[str, ...] = ()) -> None:
    d = root / name
    d.mkdir()
    (d / "ifindex").write_text(f"{ifindex}\n")
    if hardware:
        (root.parent / "pci" / name).mkdir(parents=True)
        (d / "device").symlink_to(root.parent / "pci" / name)
    for u in uppers:
        (d / f"upper_{u}").symlink_to(root / u)


def test_uplinks_are_the_nics_and_what_is_stacked_on_them(tmp_path):
    net = tmp_path / "net"
    net.mkdir()
    _dev(net, "eth0", 2, hardware=True, uppers=("bond0",))
    _dev(net, "eth1", 3, hardware=True, uppers=("bond0",))
    _dev(net, "bond0", 7, uppers=("bond0.100",))
    _dev(net, "bond0.100", 8)
    _dev(net, "cni0", 9)  # a bridge of pods
    _dev(net, "veth1", 10, uppers=("cni0",))  # a pod's host side, on that bridge
    _dev(net, "flannel.1", 11)  # a tunnel
    assert nics.uplink_ifindexes(net) == [2, 3, 7, 8]


def test_this_machines_nics_are_uplinks():
    hw = [int((d / "ifindex").read_text()) for d in nics.SYS_NET.iterdir() if (d / "device").exists()]
    assert hw and set(hw) <= set(nics.uplink_ifindexes())
