"""Pod-like network namespaces on this machine, wired as a CNI bridge plugin would.

Each "pod" is a network namespace with an eth0 veth whose peer sits on a bridge in the host (root)
namespace; the bridge holds the gateway address. A lab without `ipv6` has IPv6 switched off on its
bridge and veths, as a v4-only CNI would: no router solicitation or multicast listener report then
crosses a pod's device while a test counts what the probes saw there. Names carry a per-lab tag so that parallel runs do not
collide, and `close()` removes everything the lab made, also when a test fails.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


@dataclass
class Pod:
    name: str
    netns: str  # `ip netns` name
    ip: str
    host_veth: str
    ip6: str | None = None

    @property
    def path(self) -> str:
        return f"/run/netns/{self.netns}"

    @property
    def inode(self) -> int:
        return os.stat(self.path).st_ino

    def exec(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *cmd]

    def python(self, script: str, *args: str) -> list[str]:
        """Command line running tests/<script> inside the pod. Run by path, never with the repository
        root on sys.path: its operator/ folder would shadow the standard library's `operator`."""
        return self.exec(sys.executable, str(Path(__file__).resolve().parent / script), *args)

    def traffic(self, *args: str, timeout: float = 60) -> dict:
        """Run one traffic.py command in the pod to completion; its JSON result."""
        out = subprocess.run(self.python("traffic.py", *args), capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"traffic.py {' '.join(args)} failed in {self.name}: {out.stderr.strip()}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    @contextlib.contextmanager
    def serve(self, *args: str) -> Iterator[subprocess.Popen]:
        """Start a traffic.py receiver in the pod, wait until it listens, stop it on exit.
        The process's `result` attribute holds its JSON result once it has finished."""
        proc = subprocess.Popen(self.python("traffic.py", *args), stdout=subprocess.PIPE, text=True)
        try:
            ready = proc.stdout.readline()
            if '"ready"' not in ready:
                raise RuntimeError(f"traffic.py {' '.join(args)} did not start in {self.name}")
            yield proc
        finally:
            try:
                out, _ = proc.communicate(timeout=30)
                proc.result = json.loads(out.strip().splitlines()[-1]) if out.strip() else None
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                proc.result = None


def free_subnet() -> str:
    """A /24 in 10.200.0.0/13 that no route on this machine uses yet (labs may run side by side)."""
    used = sh("ip", "-4", "route", "show").stdout
    for _ in range(200):
        cand = f"10.{200 + secrets.randbelow(8)}.{secrets.randbelow(256)}.0/24"
        if cand.split("/")[0].rsplit(".", 1)[0] + "." not in used:
            return cand
    raise RuntimeError("no free /24 left in 10.200.0.0/13")


@dataclass
class NetLab:
    subnet: str = field(default_factory=free_subnet)
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    pods: dict[str, Pod] = field(default_factory=dict)
    ipv6: bool = False  # also give every pod an IPv6 address (dual stack)
    # The node's NAT of what its pods send elsewhere, as the bridge CNI plugin's ipMasq and kube-proxy's
    # rules make it: with a NAT rule the host's conntrack tracks the lab's traffic, bridged traffic too
    # (br_netfilter, bridge-nf-call-iptables=1, as Kubernetes asks), and reassembles its fragments.
    masquerade: bool = False
    made: int = 0  # pods made so far: names a new pod's veth (never that of one removed before, as len(pods) would)

    def __post_init__(self) -> None:
        net = ipaddress.ip_network(self.subnet)
        self._hosts = net.hosts()
        self.gateway = str(next(self._hosts))
        self.prefix = net.prefixlen
        self.subnet6 = f"fd00:1a7:{self.tag}::"
        self.bridge = f"ltbr{self.tag}"
        # No multicast snooping: a snooping bridge joins the multicast router discovery group (224.0.0.106)
        # and reports it (IGMP to 224.0.0.22) out of every port, into every pod, at times of its own;
        # seen straddling a measurement window as one packet more than the test sent.
        sh("ip", "link", "add", self.bridge, "type", "bridge", "mcast_snooping", "0")
        if not self.ipv6:
            self._no_ipv6(self.bridge)
        sh("ip", "addr", "add", f"{self.gateway}/{self.prefix}", "dev", self.bridge)
        if self.ipv6:
            sh("ip", "addr", "add", f"{self.subnet6}1/64", "dev", self.bridge, "nodad")
        sh("ip", "link", "set", self.bridge, "up")
        self._nat: list[tuple[str, ...]] = []  # the rules the lab added
        self._sysctls: dict[Path, str] = {}  # what the lab changed, and the value it had
        if self.masquerade:
            try:
                self._masquerade()
            except BaseException:
                self.close()
                raise

    def _masquerade(self) -> None:
        for name in ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables"):
            knob = Path("/proc/sys/net/bridge") / name
            if (old := knob.read_text().strip()) != "1":
                self._sysctls[knob] = old
                knob.write_text("1")
        rules = [("iptables", "POSTROUTING", "-s", self.subnet, "!", "-d", self.subnet, "-j", "MASQUERADE")]
        if self.ipv6:
            net6 = f"{self.subnet6}/64"
            rules.append(("ip6tables", "POSTROUTING", "-s", net6, "!", "-d", net6, "-j", "MASQUERADE"))
        for tool, *spec in rules:
            sh(tool, "-t", "nat", "-A", *spec)
            self._nat.append((tool, *spec))

    def add_pod(self, name: str, ip: str | None = None, addressed: bool = True) -> Pod:
        """A pod-like namespace on the bridge. With `addressed=False` its eth0 is up but has no address
        yet (as a pod's namespace between its creation and the CNI's IPAM): `assign_address` gives it one."""
        idx = self.made
        self.made += 1
        netns = f"lt{self.tag}-{name}"
        host_veth = f"lth{self.tag}{idx}"
        ip = ip or str(next(self._hosts))
        sh("ip", "netns", "add", netns)
        if not self.ipv6:  # before eth0 exists, so that it never gets an IPv6 address
            sh("ip", "netns", "exec", netns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
               "net.ipv6.conf.default.disable_ipv6=1")
        sh("ip", "link", "add", host_veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        if not self.ipv6:
            self._no_ipv6(host_veth)
        sh("ip", "link", "set", host_veth, "master", self.bridge, "up")
        sh("ip", "-n", netns, "link", "set", "eth0", "up")
        sh("ip", "-n", netns, "link", "set", "lo", "up")
        ip6 = f"{self.subnet6}{idx + 2:x}" if self.ipv6 else None
        pod = Pod(name, netns, ip, host_veth, ip6)
        self.pods[name] = pod
        if addressed:
            self.assign_address(pod)
        return pod

    def assign_address(self, pod: Pod) -> None:
        """What the CNI's IPAM does: the pod's address(es) on eth0 and its default route."""
        sh("ip", "-n", pod.netns, "addr", "add", f"{pod.ip}/{self.prefix}", "dev", "eth0")
        sh("ip", "-n", pod.netns, "route", "add", "default", "via", self.gateway)
        if pod.ip6:
            sh("ip", "-n", pod.netns, "addr", "add", f"{pod.ip6}/64", "dev", "eth0", "nodad")

    def remove_address(self, pod: Pod) -> None:
        sh("ip", "-n", pod.netns, "addr", "del", f"{pod.ip}/{self.prefix}", "dev", "eth0")

    @staticmethod
    def _no_ipv6(dev: str) -> None:
        """Switch IPv6 off on a device of the host namespace before it is up (no address, no packets)."""
        sh("sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1")

    def remove_pod(self, name: str) -> None:
        pod = self.pods.pop(name)
        sh("ip", "netns", "del", pod.netns, check=False)
        sh("ip", "link", "del", pod.host_veth, check=False)

    def cut_off(self) -> None:
        """The bridge and every pod's host-side veth down: from now on nothing a pod sends reaches the host,
        nothing reaches a pod, and the host sends nothing their way (a quiet moment in which to read what
        the probes left, which a pod's own traffic, IPv6's neighbour discovery for one, could change)."""
        for pod in self.pods.values():
            sh("ip", "link", "set", pod.host_veth, "down")
        sh("ip", "link", "set", self.bridge, "down")

    def close(self) -> None:
        for name in list(self.pods):
            self.remove_pod(name)
        for tool, *spec in self._nat:
            sh(tool, "-t", "nat", "-D", *spec, check=False)
        self._nat = []
        for knob, old in self._sysctls.items():
            knob.write_text(old)
        self._sysctls = {}
        sh("ip", "link", "del", self.bridge, check=False)

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Uplink:
    """The world outside the node, as far as NAT goes: a namespace ("outside") behind a veth that the
    host routes through as it would through its NIC, and the NAT a node does on it, as rules the host's
    iptables gets for this lab only (added here, each removed by `close()`): MASQUERADE of the lab's pods
    behind the host's address on the uplink (their outbound connections), and DNAT of a port of that
    address to a pod (a NodePort). Nothing leaves the machine: the outside is a namespace of its own."""

    lab: NetLab
    subnet: str = field(default_factory=free_subnet)

    def __post_init__(self) -> None:
        net = ipaddress.ip_network(self.subnet)
        hosts = net.hosts()
        self.node_ip, outside_ip = str(next(hosts)), str(next(hosts))
        self.dev = f"ltu{self.lab.tag}"
        netns = f"lt{self.lab.tag}-outside"
        self._rules: list[tuple[str, ...]] = []
        self.outside = Pod("outside", netns, outside_ip, self.dev)
        try:
            self._make(net.prefixlen)
        except BaseException:
            self.close()
            raise

    def _make(self, prefix: int) -> None:
        netns, outside_ip = self.outside.netns, self.outside.ip
        sh("ip", "netns", "add", netns)
        sh("ip", "netns", "exec", netns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
           "net.ipv6.conf.default.disable_ipv6=1")
        sh("ip", "link", "add", self.dev, "type", "veth", "peer", "name", "eth0", "netns", netns)
        NetLab._no_ipv6(self.dev)
        sh("ip", "addr", "add", f"{self.node_ip}/{prefix}", "dev", self.dev)
        sh("ip", "link", "set", self.dev, "up")
        sh("ip", "-n", netns, "addr", "add", f"{outside_ip}/{prefix}", "dev", "eth0")
        sh("ip", "-n", netns, "link", "set", "eth0", "up")
        sh("ip", "-n", netns, "link", "set", "lo", "up")
        # The host forwards between the lab's bridge and the uplink (per device: nothing else changes).
        for dev in (self.dev, self.lab.bridge):
            sh("sysctl", "-qw", f"net.ipv4.conf.{dev}.forwarding=1")

    @property
    def ifindex(self) -> int:
        return int((Path("/sys/class/net") / self.dev / "ifindex").read_text())

    def _rule(self, *spec: str) -> None:
        sh("iptables", "-t", "nat", "-I", *spec)
        self._rules.append(spec)

    def masquerade(self) -> None:
        """The lab's pods reach the outside behind the host's address on the uplink."""
        self._rule("POSTROUTING", "-s", self.lab.subnet, "-o", self.dev, "-j", "MASQUERADE")

    def dnat(self, proto: str, port: int, pod: Pod, pod_port: int) -> None:
        """Packets to the host's address on the uplink at `port` go to `pod` at `pod_port`."""
        self._rule("PREROUTING", "-i", self.dev, "-d", self.node_ip, "-p", proto, "--dport", str(port),
                   "-j", "DNAT", "--to-destination", f"{pod.ip}:{pod_port}")

    def close(self) -> None:
        for chain, *rest in reversed(self._rules):
            sh("iptables", "-t", "nat", "-D", chain, *rest, check=False)
        self._rules = []
        sh("ip", "netns", "del", self.outside.netns, check=False)
        sh("ip", "link", "del", self.dev, check=False)

    def __enter__(self) -> Uplink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class ClusterIP:
    """A Service's virtual IP on this node, as kube-proxy makes it: an address nothing routes (the pods'
    default route takes it to the host), and DNAT in the host's PREROUTING of what the lab's pods send to
    it, to a pod of the same lab. The host routes such a packet back out of the bridge it came in on. The
    rules are for this lab only, each removed by `close()`."""

    lab: NetLab
    ip: str = field(default_factory=lambda: str(next(ipaddress.ip_network(free_subnet()).hosts())))

    def __post_init__(self) -> None:
        self._rules: list[tuple[str, ...]] = []
        sh("sysctl", "-qw", f"net.ipv4.conf.{self.lab.bridge}.forwarding=1")

    def to(self, proto: str, port: int, pod: Pod, pod_port: int) -> None:
        """Packets from the lab's pods to this IP at `port` go to `pod` at `pod_port`."""
        spec = ("PREROUTING", "-i", self.lab.bridge, "-s", self.lab.subnet, "-d", self.ip, "-p", proto,
                "--dport", str(port), "-j", "DNAT", "--to-destination", f"{pod.ip}:{pod_port}")
        sh("iptables", "-t", "nat", "-I", *spec)
        self._rules.append(spec)

    def close(self) -> None:
        for chain, *rest in reversed(self._rules):
            sh("iptables", "-t", "nat", "-D", chain, *rest, check=False)
        self._rules = []

    def __enter__(self) -> ClusterIP:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
