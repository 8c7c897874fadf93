"""Fixtures for the agent's kernel tests: pod-like namespaces and one real agent per module."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from latencytrace.node_agent import targets
from latencytrace.node_agent.agent import Agent, Desired
from latencytrace.node_agent.events import PacketEvent
from latencytrace.node_agent.program import Sizes
from latencytrace.node_agent.report import Report
from latencytrace.node_agent.tracer import TargetSettings
from tests.agent import kernel
from tests.netlab import NetLab, Pod

AGENT = str(Path(sys.executable).with_name("latencytrace-agent"))


@pytest.fixture
def lab():
    """A node's pods, with the NAT every Kubernetes node has (kube-proxy's, a CNI's ipMasq): the host's
    conntrack tracks their traffic, bridged too, as on a real node (a CI machine once had it on and
    found what its absence here had hidden)."""
    with NetLab(masquerade=True) as lab:
        yield lab


def wait_ready(agent: subprocess.Popen) -> str:
    """Read the agent's stderr up to its readiness line (probes attached, targets set); fail if it
    ends first. Whatever it logged on the way is returned with the line."""
    seen = []
    for line in agent.stderr:
        seen.append(line)
        if "probes attached" in line:
            return "".join(seen)
    raise AssertionError(f"agent exited ({agent.wait()}) before it was ready:\n{''.join(seen)}")


@contextlib.contextmanager
def running_agent(lab: NetLab) -> Iterator[subprocess.Popen]:
    """`latencytrace-agent trace` on a new pod of `lab`, ready (its probes attached); killed with
    SIGKILL (no cleanup of its own) and reaped when the block ends."""
    pod = lab.add_pod("a")
    agent = subprocess.Popen([AGENT, "trace", "--netns", pod.path, "--format", "json"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(agent)
        yield agent
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.wait()


class CollectingSink:
    """Keeps every interval an agent publishes."""

    def __init__(self) -> None:
        self.intervals = []

    def consume(self, interval) -> None:
        self.intervals.append(interval)

    def close(self) -> None:
        pass


@contextlib.contextmanager
def started_agent(tracepoints: str = "auto", sizes: Sizes | None = None) -> Iterator[Agent]:
    a = Agent(sizes=sizes or Sizes(max_targets=32), event_queue=100_000, tracepoints=tracepoints)
    a.start()
    try:
        if tracepoints != "auto":
            assert a.tracer.tracepoints == tracepoints
        yield a
    finally:
        a.close()


@pytest.fixture(scope="module")
def agent():
    with started_agent() as a:
        yield a


# The modules that check what the probes measure run each test with both ways of attaching them
# (node_agent/tracer.py TRACEPOINT_KINDS): typed tracepoints, as deployed on this kernel, and raw ones,
# what kernels without them get. They override `agent` with this.
def agent_of_each_kind(request) -> Iterator[Agent]:
    with started_agent(request.param) as a:
        yield a


def desired(pod: Pod, **settings) -> Desired:
    ns = targets.from_path(pod.path)
    return Desired(f"netns:{ns.inode}", pod.name, lambda: ns, TargetSettings(**settings))


class Measured(Report):
    """What the agent reported for one measurement, and what the kernel's maps say happened meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.event_list: list[PacketEvent] = []
        self.slots: dict[str, int] = {}  # pod name -> its slot while traced
        self.slot_counts: dict[int, int] = {}  # every slot -> latencies recorded in it during the action
        self.kernel_counters: dict[str, int] = {}  # lt_counters: change during the action
        self.kernel: dict[str, dict[str, kernel.SegStat]] = {}  # pod -> segment -> change in lt_stat


def measure(agent: Agent, pods: list[Pod], action, *, read_kernel: bool = False, then=None, **settings) -> Measured:
    """Trace `pods`, run `action()`, and return what the agent measured meanwhile (events included, once
    the event reader has caught up), with the change of every slot's counts, the kernel's counters and,
    with `read_kernel`, each traced pod's lt_stat (figures and histograms) as the kernel holds them;
    `then()` runs just after the counters are read, still tracing. The targets are removed whatever
    happens, so that a failure leaves nothing to the next test."""
    wanted = [desired(p, **settings) for p in pods]
    tracer, out = agent.tracer, Measured()
    try:
        states = agent.reconcile(wanted)
        assert all(s.state == "Tracing" for s in states.values()), states
        out.slots = {p.name: states[d.key].target.slot for p, d in zip(pods, wanted, strict=True)}
        agent.collect()  # start from a clean interval
        slots0, counters0 = kernel.slot_counts(tracer, agent.sizes.max_targets), kernel.counters(tracer)
        before = {p: kernel.slot_stats(tracer, s) for p, s in out.slots.items()} if read_kernel else {}
        action()
        assert agent.events.settle(), "the event reader did not catch up"
        slots1, counters1 = kernel.slot_counts(tracer, agent.sizes.max_targets), kernel.counters(tracer)
        if then is not None:
            then()
        out.kernel = {p: {seg: st - before[p][seg] for seg, st in kernel.slot_stats(tracer, s).items()}
                      for p, s in out.slots.items()} if read_kernel else {}
        out.slot_counts = {s: slots1[s] - slots0[s] for s in slots0}
        out.kernel_counters = {k: counters1[k] - counters0[k] for k in counters0}
        interval = agent.collect()
        out.consume(interval)
        out.event_list = interval.events
    finally:
        agent.reconcile([])
    return out


def segment_counts(report: Report, pod: Pod) -> dict[str, int]:
    doc = report.as_json()
    for t in doc["targets"]:
        if t["netns_inode"] == pod.inode:
            return {name: s["count"] for name, s in t["segments"].items()}
    return {}
