"""Targets: which network namespaces are traced, how one is found, and their slots in the kernel maps.

A target is one network namespace (a pod's), identified in the kernel by its inode; its IP addresses
let the host-side probes recognise packets addressed to it before they enter it. A target is given as
a namespace path, a PID, or (in a cluster) a pod, which is found on the host by its UID in the cgroup
paths of its processes (needs the host PID namespace) or else by the namespace holding its pod IP.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import lookup, netns
from .contract import PodRef
from .tracer import TargetSettings, Tracer

log = logging.getLogger(__name__)

PROC = Path("/proc")
NETNS_DIRS = (Path("/run/netns"), Path("/var/run/netns"))
# Slots of removed targets wait this long before reuse, so that packets still in flight under the
# old slot cannot be counted for a new pod.
SLOT_COOLDOWN_S = 2.0


class TargetError(ValueError):
    pass


@dataclass(frozen=True)
class Namespace:
    inode: int
    path: str  # a path that opens it (/run/netns/x or /proc/<pid>/ns/net)
    ips: tuple[str, ...]
    # The host sides of its veths (ifindexes in the host's namespace): where the host queues its packets.
    host_links: tuple[int, ...] = ()


def _no_permission(path: str | os.PathLike) -> TargetError:
    return TargetError(f"no permission to open network namespace {path}: run as root, with CAP_SYS_PTRACE to open "
                       "another process's namespace")


def _exists(path: Path) -> bool:
    try:
        return path.exists()  # raises, rather than says False, where the path cannot be looked at
    except PermissionError:
        raise _no_permission(path) from None
    except OSError as e:
        raise TargetError(f"cannot open network namespace {path}: {e.strerror or e}") from None


def netns_inode(path: str | os.PathLike) -> int:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        raise TargetError(f"network namespace {path} does not exist") from None
    except PermissionError:
        raise _no_permission(path) from None
    except OSError as e:
        raise TargetError(f"cannot open network namespace {path}: {e.strerror or e}") from None


def namespace_ips(path: str) -> tuple[str, ...]:
    """Global addresses of the namespace's interfaces (loopback excluded)."""
    return namespace_interfaces(path)[0]


def namespace_interfaces(path: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Global addresses of the namespace's interfaces (loopback excluded), and the host sides of its
    veths (their ifindexes across)."""
    try:
        addrs, peers = netns.interfaces(path)
    except OSError as e:
        if e.errno == errno.EINVAL:  # setns() refused it: a file or directory, but not a namespace
            raise TargetError(f"{path} is not a network namespace: give /run/netns/NAME, /proc/PID/ns/net "
                              "or an `ip netns` name") from None
        raise TargetError(f"cannot list addresses in network namespace {path}: {e}") from None
    except Exception as e:  # an unopenable namespace raises several types
        raise TargetError(f"cannot list addresses in network namespace {path}: {e}") from None
    out = []
    for a in addrs:
        if a is None:
            continue
        ip = ipaddress.ip_address(a)
        if not (ip.is_loopback or ip.is_link_local):
            out.append(str(ip))
    return tuple(out), tuple(sorted(set(peers)))


def from_path(path: str) -> Namespace:
    p = Path(path)
    if not _exists(p) and "/" not in path:
        for d in NETNS_DIRS:  # a bare name as `ip netns` knows it
            if _exists(d / path):
                p = d / path
                break
    if not _exists(p):
        raise TargetError(f"network namespace {path} does not exist")
    return Namespace(netns_inode(p), str(p), namespace_ips(str(p)))


def from_pid(pid: int) -> Namespace:
    path = PROC / str(pid) / "ns" / "net"
    if pid <= 0 or not _exists(PROC / str(pid)):
        raise TargetError(f"no process with PID {pid}")
    return Namespace(netns_inode(path), str(path), namespace_ips(str(path)))


# A pod's UID in the cgroup path of its processes: with dashes (cgroupfs driver) or underscores (systemd).
_POD_UID = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")


class PodLocator:
    """Finds pods' network namespaces on this host, many pods at a time.

    refresh() walks /proc once: every namespace reachable from /proc/*/ns/net and /run/netns, and the pod
    UID in each process's cgroup path (seen with the host's PID namespace). It lists the addresses of the
    namespaces it has not met before; entering a namespace costs a thread and a netlink dump, so a namespace's
    addresses are kept (by inode) once it has some, to locate pods by IP; the addresses the probes use are
    those the Registry reads again for the namespaces it traces (Registry.readdress). locate() is then a
    lookup: by UID, else by pod IP.
    """

    def __init__(self, proc: Path = PROC):
        self.proc = proc
        self._paths: dict[int, str] = {}  # inode -> a path that opens it
        self._ips: dict[int, tuple[str, ...]] = {}  # inode -> its addresses
        # Addresses kept by (inode, path): the kernel gives a deleted namespace's inode number to the next
        # namespace made, which a new pod's sandbox then holds at another path.
        self._known: dict[tuple[int, str], tuple[str, ...]] = {}
        self._by_uid: dict[str, int] = {}
        self._by_ip: dict[str, int] = {}
        self._host = 0

    def refresh(self) -> None:
        self._host = os.stat("/proc/self/ns/net").st_ino
        paths: dict[int, str] = {}
        by_uid: dict[str, int] = {}
        for d in NETNS_DIRS:
            if d.is_dir():
                for f in d.iterdir():
                    try:
                        paths.setdefault(os.stat(f).st_ino, str(f))
                    except OSError:
                        continue
        for entry in self.proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                inode = os.stat(entry / "ns" / "net").st_ino
                m = _POD_UID.search((entry / "cgroup").read_text())
            except OSError:
                continue  # the process is gone
            paths.setdefault(inode, str(entry / "ns" / "net"))
            if m:
                by_uid.setdefault(m.group(1).replace("_", "-"), inode)
        ips: dict[int, tuple[str, ...]] = {}
        known_now: dict[tuple[int, str], tuple[str, ...]] = {}
        for inode, path in paths.items():
            known = self._known.get((inode, path))
            if known is None and inode != self._host:
                try:
                    known = namespace_ips(path)
                except TargetError:
                    continue
            if known:
                ips[inode] = known_now[(inode, path)] = known
        self._paths, self._ips, self._by_uid, self._known = paths, ips, by_uid, known_now
        self._by_ip = {ip: inode for inode, addrs in ips.items() for ip in addrs}

    def locate(self, pod: PodRef) -> Namespace:
        inode = self._by_uid.get(pod.uid)
        if inode is None:
            inode = next((self._by_ip[str(ipaddress.ip_address(ip))] for ip in pod.ips
                          if str(ipaddress.ip_address(ip)) in self._by_ip), None)
        if inode == self._host and inode is not None:
            raise TargetError(f"pod {pod.namespace}/{pod.name} uses the node's network namespace (hostNetwork): "
                              "its packets cannot be told from the node's")
        if inode is None or inode not in self._paths:
            raise TargetError(f"pod {pod.namespace}/{pod.name} has no network namespace on this node "
                              f"(no process in its cgroup, no namespace holding {', '.join(pod.ips) or 'its IP'})")
        return Namespace(inode, self._paths[inode], self._ips.get(inode, ()))


@dataclass
class Target:
    slot: int
    ns: Namespace
    label: str
    settings: TargetSettings
    pod: PodRef | None = None
    traces: tuple[str, ...] = ()  # "namespace/name" of the LatencyTraces that selected it
    added_ns: int = field(default_factory=time.monotonic_ns)


class Registry:
    """Slots in the kernel maps for the current targets; adds and removes without reloading programs.
    add() and remove() change the targets' slots; sync() then writes the lookup tables once for all of them."""

    def __init__(self, tracer: Tracer, max_targets: int):
        self.tracer = tracer
        self.max_targets = max_targets
        self.by_inode: dict[int, Target] = {}
        self._cooling: dict[int, float] = {}  # slot -> monotonic time it became free
        self.overflow = 0  # targets refused for want of a slot

    def _free_slot(self) -> int | None:
        used = {t.slot for t in self.by_inode.values()}
        now = time.monotonic()
        for slot in range(self.max_targets):
            if slot not in used and now - self._cooling.get(slot, -SLOT_COOLDOWN_S) >= SLOT_COOLDOWN_S:
                return slot
        return None

    def add(self, ns: Namespace, label: str, settings: TargetSettings, pod: PodRef | None = None,
            traces: tuple[str, ...] = ()) -> Target:
        existing = self.by_inode.get(ns.inode)
        if existing is not None:  # its addresses are kept current by readdress(), not by the caller's copy
            existing.label, existing.pod, existing.traces = label, pod, traces
            if existing.settings != settings:
                existing.settings = settings
                self.tracer.set_target(existing.slot, settings)
            return existing
        slot = self._free_slot()
        if slot is None:
            self.overflow += 1
            raise TargetError(f"cannot trace {label}: all {self.max_targets} target slots of this agent are in use "
                              "(raise agent.maxTargets)")
        target = Target(slot, ns, label, settings, pod, traces)
        self.tracer.set_target(slot, settings)
        self.by_inode[ns.inode] = target
        log.info("tracing %s (netns %d, slot %d, ips %s)", label, ns.inode, slot, ", ".join(ns.ips) or "none")
        return target

    def remove(self, inode: int, why: str | None = None) -> Target | None:
        """Stop tracing the namespace `inode`; one log line, a warning when `why` says it went wrong."""
        target = self.by_inode.pop(inode, None)
        if target is not None:
            self.tracer.clear_target(target.slot)
            self._cooling[target.slot] = time.monotonic()
            if why:
                log.warning("stopped tracing %s (slot %d): %s", target.label, target.slot, why)
            else:
                log.info("stopped tracing %s (slot %d)", target.label, target.slot)
        return target

    def vanished(self) -> list[Target]:
        """Targets whose namespace no longer opens at the path they were found by. Such a target is over:
        the namespace was deleted, and its inode number may already be another namespace's (the kernel
        reuses them). Where the path was a process's (/proc/PID/ns/net) and the namespace lives on in
        another process, it is found again, by its new path, and traced as a new target."""
        out = []
        for t in self.by_inode.values():
            try:
                if os.stat(t.ns.path).st_ino == t.ns.inode:
                    continue
            except OSError:
                pass
            out.append(t)
        return out

    def readdress(self) -> bool:
        """Read the traced namespaces' addresses again (True if any changed; sync() then writes them).

        A pod's namespace exists before the CNI gives it an address, and dual-stack addresses may come one
        after the other: the IP lookup table must learn a traced namespace's new addresses and forget the
        removed ones, or the host-side probes do not recognise its packets. One netlink dump per target."""
        changed = False
        for t in self.by_inode.values():
            try:
                ips, links = namespace_interfaces(t.ns.path)
            except TargetError:
                continue  # gone: the next reconcile finds out and removes it
            if ips != t.ns.ips:
                log.info("addresses of %s (netns %d): %s -> %s", t.label, t.ns.inode, ", ".join(t.ns.ips) or "none",
                         ", ".join(ips) or "none")
            if (ips, links) != (t.ns.ips, t.ns.host_links):
                t.ns = replace(t.ns, ips=ips, host_links=links)
                changed = True
        return changed

    def sync(self) -> dict[int, tuple[Target, str]]:
        """After adds and removes: the lookup tables written once for the current targets, and only the
        probes the targets' segments need attached (none at all while there is no target). Targets whose
        namespace or IPs find no room in the lookup tables are removed (the oldest keep theirs) and
        returned, {inode: (target, why)}; the others are traced."""
        oldest_first = sorted(self.by_inode.values(), key=lambda t: (t.added_ns, t.slot))
        bits = self.tracer.sizes.lookup_bits
        kept, refused = lookup.fitting({t.ns.inode: (t.slot, t.ns.ips) for t in oldest_first}, bits)
        out = {}
        for inode in refused:
            target = self.remove(inode)
            self.overflow += 1
            out[inode] = (target, f"cannot trace {target.label}: no room for its network namespace or IPs in the "
                                  f"probes' lookup tables ({1 << bits} positions, {lookup.PROBES} tried per key) next "
                                  "to the targets already traced on this node; trace fewer pods here")
            log.warning("%s", out[inode][1])
        self.tracer.write_lookup(kept)
        self.tracer.set_pod_links(sorted({i for t in self.by_inode.values() for i in t.ns.host_links}))
        wanted = 0
        for t in self.by_inode.values():
            wanted |= t.settings.wanted_segments()
        self.tracer.want(wanted)
        return out

    def by_slot(self) -> dict[int, Target]:
        return {t.slot: t for t in self.by_inode.values()}
