"""Which devices the agent marks as the host's uplinks, read from a sysfs tree laid out as the kernel's
(a tree under tmp_path: the machine's own has one virtio NIC and nothing stacked on it), and from the
machine's own, in the kernel's bitmap, as devices come and go."""

from __future__ import annotations

import ctypes as ct
import os
import subprocess
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
    assert nics.newest_ifindex(net) == 11  # the newest device, whatever its kind


def test_this_machines_nics_are_uplinks():
    hw = [int((d / "ifindex").read_text()) for d in nics.SYS_NET.iterdir() if (d / "device").exists()]
    assert hw and set(hw) <= set(nics.uplink_ifindexes())


def test_a_device_stacked_on_the_nic_while_the_agent_runs_becomes_an_uplink(agent):
    """The agent reads the host's devices again every interval: a macvlan created on the NIC after it
    started (as a VLAN or bond would be) is marked in the kernel's uplink bitmap, unmarked once deleted."""
    nic = next(d.name for d in sorted(nics.SYS_NET.iterdir()) if (d / "device").exists())
    name = f"ltup{os.getpid() % 100000}"

    def marked(ifindex: int) -> bool:
        word = agent.tracer.table("lt_hostdev")[ct.c_uint32(ifindex // 64)].value  # the uplinks: words 0..
        return bool(word >> (ifindex % 64) & 1)

    subprocess.run(["ip", "link", "add", "link", nic, "name", name, "type", "macvlan"], check=True)
    try:
        ifindex = int((nics.SYS_NET / name / "ifindex").read_text())
        assert not marked(ifindex)
        agent.refresh_host_devices()
        assert marked(ifindex)
    finally:
        subprocess.run(["ip", "link", "del", name], check=True)
    agent.refresh_host_devices()
    assert not marked(ifindex)
