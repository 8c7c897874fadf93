"""Fixtures for the agent's kernel tests: pod-like namespaces and one real agent per module."""

from __future__ import annotations

import pytest

from latencytrace.node_agent import targets
from latencytrace.node_agent.agent import Agent, Desired
from latencytrace.node_agent.program import Sizes
from latencytrace.node_agent.report import Report
from latencytrace.node_agent.tracer import TargetSettings
from tests.netlab import NetLab, Pod


@pytest.fixture
def lab():
    with NetLab() as lab:
        yield lab


class CollectingSink:
    """Keeps every interval an agent publishes."""

    def __init__(self) -> None:
        self.intervals = []

    def consume(self, interval) -> None:
        self.intervals.append(interval)

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def agent():
    a = Agent(sizes=Sizes(max_targets=32), event_queue=100_000)
    a.start()
    try:
        yield a
    finally:
        a.close()


def desired(pod: Pod, **settings) -> Desired:
    ns = targets.from_path(pod.path)
    return Desired(f"netns:{ns.inode}", pod.name, lambda: ns, TargetSettings(**settings))


def measure(agent: Agent, pods: list[Pod], action, **settings) -> Report:
    """Trace `pods`, run `action()`, and return what the agent measured meanwhile (events included)."""
    states = agent.reconcile([desired(p, **settings) for p in pods])
    assert all(s.state == "Tracing" for s in states.values()), states
    agent.collect()  # start from a clean interval
    report = Report()
    report.event_list = []
    try:
        action()
    finally:
        interval = agent.collect()
        report.consume(interval)
        report.event_list = interval.events
        agent.reconcile([])
    return report


def segment_counts(report: Report, pod: Pod) -> dict[str, int]:
    doc = report.as_json()
    for t in doc["targets"]:
        if t["netns_inode"] == pod.inode:
            return {name: s["count"] for name, s in t["segments"].items()}
    return {}
