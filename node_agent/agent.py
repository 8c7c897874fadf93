"""The agent core shared by the standalone command and the in-cluster loop.

It owns the tracer and the target registry, turns a desired set of targets into kernel map contents
(reconcile), and once per interval gathers what the kernel measured into an `Interval` that it hands
to its sinks (table or JSON report, OTLP exporters, node status). Sinks never see the kernel.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from . import histogram
from .collectors import CounterCollector, DropCollector, HistogramCollector, PacketCollector, SlotEpoch
from .events import EventReader, PacketEvent
from .kernel import bpfsys, nics
from .probestats import StatsPolicy
from .program import Sizes
from .targets import Namespace, Registry, Target, TargetError
from .tracer import ProbeStatus, TargetSettings, Tracer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Desired:
    """A target the agent should trace. `resolve` finds its namespace now (it may fail: pod gone)."""

    key: str
    label: str
    resolve: Callable[[], Namespace]
    settings: TargetSettings
    pod: object | None = None  # contract.PodRef in a cluster
    traces: tuple[str, ...] = ()


@dataclass
class TargetState:
    key: str
    state: str  # Tracing | NotFound | Failed
    message: str = ""
    target: Target | None = None


@dataclass
class Interval:
    """What the kernel measured between two collections."""

    start_ns: int  # wall clock, ns since the epoch
    end_ns: int
    targets: dict[int, Target]  # slot -> target as it was during the interval
    histograms: dict[int, dict[int, histogram.SegmentHistogram]]  # slot -> segment id -> delta
    drops: dict[tuple[int, int, int], int]  # (slot, direction, reason code) -> count
    drop_reasons: dict[int, str]
    events: list[PacketEvent]
    counters: dict[str, int]  # cumulative kernel and reader counters
    probes: dict[str, bpfsys.ProgStats]  # cumulative, per program
    overflow_targets: int = 0
    # slot -> (receive, transmit) packets counted at their first boundary: exact, whether timed or not
    packets: dict[int, tuple[int, int]] = field(default_factory=dict)


class Sink(Protocol):
    def consume(self, interval: Interval) -> None: ...

    def close(self) -> None: ...


@dataclass
class Agent:
    sizes: Sizes = field(default_factory=Sizes)
    sinks: list[Sink] = field(default_factory=list)
    event_queue: int = 4096
    btf_path: str = "/sys/kernel/btf/vmlinux"
    stats_policy: StatsPolicy = field(default_factory=StatsPolicy)
    tracepoints: str = "auto"  # tracer.TRACEPOINT_KINDS

    def __post_init__(self) -> None:
        self.tracer = Tracer(self.sizes, btf_path=self.btf_path, stats_policy=self.stats_policy,
                             tracepoints=self.tracepoints)
        self.registry: Registry | None = None
        self.states: dict[str, TargetState] = {}
        self._keys: dict[str, int] = {}  # desired key -> netns inode
        self._last_wall = time.time_ns()
        self._newest_dev = 0  # the host's highest ifindex when its devices were last read

    def start(self) -> ProbeStatus:
        status = self.tracer.start()
        self.refresh_host_devices()
        self.registry = Registry(self.tracer, self.sizes.max_targets)
        self.hists = HistogramCollector(self.tracer)
        self.packets = PacketCollector(self.tracer)
        self.drops = DropCollector(self.tracer)
        self.counters = CounterCollector(self.tracer)
        self.events = EventReader(self.tracer, self.event_queue).start()
        self._last_wall = time.time_ns()
        return status

    def reconcile(self, desired: list[Desired]) -> dict[str, TargetState]:
        """Make the traced set equal `desired`, without reloading any program."""
        assert self.registry is not None, "start() first"
        wanted = {d.key: d for d in desired}
        for key in [k for k in self._keys if k not in wanted]:
            inode = self._keys.pop(key)
            if inode not in self._keys.values():
                target = self.registry.remove(inode)
                if target is not None:
                    self.drops.forget_slot(target.slot)
        for key in [k for k in self.states if k not in wanted]:  # also those never found: no state outlives its pod
            del self.states[key]
        for key, d in wanted.items():
            try:
                ns = self._still_there(key) or d.resolve()
            except TargetError as e:
                was = self.states.get(key)
                # A traced namespace that is gone (deleted with the pod still listed): said once, as it
                # stops being traced; a pod still not found on later rounds is not logged again.
                self._forget(key, str(e) if was is not None and was.state == "Tracing" else None)
                self.states[key] = TargetState(key, "NotFound", str(e))
                continue
            old = self._keys.get(key)
            if old is not None and old != ns.inode:
                self._forget(key)  # same pod, new namespace (sandbox restarted)
            held = self.registry.by_inode.get(ns.inode)
            if held is not None and held.ns.path != ns.path:
                # The inode number, found at another path: the namespace traced under it is gone and the
                # kernel gave its number to this one (another pod's, or the same one held by another process).
                self._drop_inode(ns.inode, f"its network namespace ({held.ns.path}) is gone")
            try:
                fresh = ns.inode not in self.registry.by_inode
                target = self.registry.add(ns, d.label, d.settings, d.pod, d.traces)
                if fresh:
                    self.hists.baseline(SlotEpoch(target.slot, target.added_ns))
                    self.packets.baseline(SlotEpoch(target.slot, target.added_ns))
                self._keys[key] = ns.inode
                self.states[key] = TargetState(key, "Tracing", "", target)
            except TargetError as e:
                self.states[key] = TargetState(key, "Failed", str(e))
        self.registry.readdress()  # a namespace found earlier (or by a cached lookup) may have new addresses
        self._sync()
        return dict(self.states)

    def _sync(self) -> None:
        refused = self.registry.sync()  # a full lookup table fails only the targets that do not fit
        for key, inode in [(k, i) for k, i in self._keys.items() if i in refused]:
            target, why = refused[inode]
            del self._keys[key]
            self.drops.forget_slot(target.slot)
            self.states[key] = TargetState(key, "Failed", why)

    def refresh_addresses(self) -> bool:
        """Between reconciles (the loops call this every interval): the lookup tables follow the traced
        namespaces' addresses, which a CNI assigns after the namespace exists. True if any changed."""
        if self.registry is None or not self.registry.readdress():
            return False
        self._sync()
        return True

    def refresh_host_devices(self) -> None:
        """At start and every interval: the host's NIC queue IRQs and uplinks, which change when a NIC,
        a bond or a VLAN is added, removed or renumbered while the agent runs (the maps are written only
        when the answer changed); and whether the host has a device it did not have (a new pod's veth):
        the probes' per-CPU caches, keyed by a device's address, then forget their answers, since a new
        device may sit at a freed one's address (an untraced pod's eth0 where a host-side veth was)."""
        try:
            self.tracer.set_nic_irqs(nics.nic_irqs())
            self.tracer.set_uplinks(nics.uplink_ifindexes())
            newest = nics.newest_ifindex()
        except OSError as e:  # a device vanishing while /sys is walked: the next interval sees the rest
            log.debug("host devices not re-read: %s", e)
            return
        if newest > self._newest_dev:
            if self._newest_dev:
                self.tracer.forget_devices()
            self._newest_dev = newest

    def _still_there(self, key: str) -> Namespace | None:
        """The namespace of a target already traced, if it still exists (saves finding it again; its
        addresses are the registry's to keep current, see Registry.readdress)."""
        st = self.states.get(key)
        if st is None or st.target is None:
            return None
        try:
            return st.target.ns if os.stat(st.target.ns.path).st_ino == st.target.ns.inode else None
        except OSError:
            return None

    def vanished(self) -> bool:
        """A traced namespace no longer opens where it was found: the caller should reconcile (its
        resolvers tell a deleted namespace from one still held by another process)."""
        return self.registry is not None and bool(self.registry.vanished())

    def _drop_inode(self, inode: int, why: str) -> None:
        """Stop tracing the namespace under `inode` for every key that had it (they are found again)."""
        for k in [k for k, i in self._keys.items() if i == inode]:
            del self._keys[k]
            st = self.states.get(k)
            if st is not None and st.target is not None and st.target.ns.inode == inode:
                self.states[k] = TargetState(k, "NotFound", why)
        target = self.registry.remove(inode, why)
        if target is not None:
            self.drops.forget_slot(target.slot)

    def _forget(self, key: str, why: str | None = None) -> None:
        inode = self._keys.pop(key, None)
        if inode is not None and inode not in self._keys.values():
            target = self.registry.remove(inode, why)
            if target is not None:
                self.drops.forget_slot(target.slot)

    def collect(self) -> Interval:
        assert self.registry is not None, "start() first"
        now = time.time_ns()
        targets = self.registry.by_slot()
        keys = [SlotEpoch(slot, t.added_ns) for slot, t in targets.items()]
        hists = {k.slot: v for k, v in self.hists.deltas(keys).items()}
        packets = {k.slot: v for k, v in self.packets.deltas(keys).items()}
        counters = self.counters.read()
        counters["events_dropped_userspace"] = self.events.dropped
        interval = Interval(
            start_ns=self._last_wall, end_ns=now, targets=targets, histograms=hists,
            drops=self.drops.deltas(), drop_reasons=self.tracer.btf.drop_reasons,
            events=self.events.drain(), counters=counters, probes=self.tracer.probe_stats(),
            overflow_targets=self.registry.overflow, packets=packets)
        self._last_wall = now
        return interval

    def publish(self, interval: Interval) -> None:
        for sink in self.sinks:
            try:
                sink.consume(interval)
            except Exception:  # a failing sink must not stop measuring or the other sinks
                log.exception("sink %s failed", type(sink).__name__)

    def close(self) -> None:
        if self.registry is not None:
            self.events.stop()
            try:
                self.publish(self.collect())  # the last partial interval
            finally:
                for sink in self.sinks:
                    try:
                        sink.close()
                    except Exception:
                        log.exception("closing sink %s failed", type(sink).__name__)
        self.tracer.close()
        self.registry = None
