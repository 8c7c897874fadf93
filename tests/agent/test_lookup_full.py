"""A full target lookup table fails only the targets that do not fit, each with the reason, and the
others are traced (measured on the real kernel) instead of the whole reconcile aborting.

The agent here has tables of 4 positions (Sizes.lookup_bits=2) and 6 pods to trace: with 4 probes per
key every position is tried, so exactly 4 fit; the 2 added last are refused.
"""

from __future__ import annotations

from latencytrace.node_agent.agent import Agent
from latencytrace.node_agent.program import Sizes
from latencytrace.node_agent.report import Report

from .conftest import desired, segment_counts

N = 200


def test_targets_that_do_not_fit_fail_alone(lab):
    pods = [lab.add_pod(f"p{i}") for i in range(6)]
    client = lab.add_pod("client")
    agent = Agent(sizes=Sizes(max_targets=16, lookup_bits=2))
    agent.start()
    try:
        states = agent.reconcile([desired(p) for p in pods])
        by_pod = {p.name: states[f"netns:{p.inode}"] for p in pods}
        tracing = [p for p in pods if by_pod[p.name].state == "Tracing"]
        failed = [p for p in pods if by_pod[p.name].state == "Failed"]
        assert [p.name for p in tracing] == ["p0", "p1", "p2", "p3"], by_pod  # the first ones keep their place
        assert [p.name for p in failed] == ["p4", "p5"]
        for p in failed:
            assert "no room for its network namespace or IPs in the probes' lookup tables (4 positions" \
                in by_pod[p.name].message and by_pod[p.name].message.endswith("trace fewer pods here")
        assert len(agent.registry.by_inode) == 4

        agent.collect()
        for p in (tracing[0], tracing[-1], failed[0]):
            with p.serve("udp-recv", "--port", "9000", "--count", str(N), "--timeout", "20") as rx:
                client.traffic("udp-send", "--to", p.ip, "--port", "9000", "--count", str(N), "--rate", "4000")
            assert rx.result == {"received": N}
        report = Report()
        report.consume(agent.collect())
        for p in (tracing[0], tracing[-1]):
            assert segment_counts(report, p).get("rx_total", 0) >= N * 0.99, p.name
        assert segment_counts(report, failed[0]) == {}

        # Room again (one traced pod gone): the next reconcile traces a refused pod.
        states = agent.reconcile([desired(p) for p in pods[1:]])
        assert states[f"netns:{pods[4].inode}"].state == "Tracing", states
        assert states[f"netns:{pods[5].inode}"].state == "Failed"
    finally:
        agent.close()
