"""BPF run-time statistics: the kernel times the probes only when the agent's policy says so."""

from __future__ import annotations

import time

import pytest

from latencytrace.node_agent.agent import Agent
from latencytrace.node_agent.probestats import ProbeStats, StatsPolicy
from latencytrace.node_agent.program import Sizes

from .conftest import measure


def test_statistics_off_traces_without_timing_the_probes(lab):
    """With statistics off the packets are measured all the same, and the kernel counts no probe runs
    (each counted run is two clock reads more on every packet)."""
    pod, client = lab.add_pod("srv"), lab.add_pod("client")
    agent = Agent(sizes=Sizes(max_targets=4), stats_policy=StatsPolicy("off"))
    agent.start()
    try:
        def traffic():
            with pod.serve("udp-recv", "--port", "9500", "--count", "200", "--timeout", "20") as rx:
                client.traffic("udp-send", "--to", pod.ip, "--port", "9500", "--count", "200", "--rate", "2000")
            assert rx.result == {"received": 200}

        report = measure(agent, [pod], traffic)
        probes = agent.tracer.probe_stats()
    finally:
        agent.close()
    (target,) = report.as_json()["targets"]
    assert target["segments"]["rx_pod_stack"]["count"] == 200
    assert probes and all(s.run_cnt == 0 for s in probes.values()), probes
    assert agent.tracer.stats.seconds_on == 0


def test_sampled_statistics_come_on_in_windows_and_go_off_at_close():
    stats = ProbeStats(StatsPolicy("sampled", window_s=0.3, period_s=0.6))
    stats.start()
    assert not stats.enabled  # the first window is at the end of the first period
    time.sleep(1.5)  # two periods and a half: two windows
    stats.close()
    assert not stats.enabled
    assert 0.3 <= stats.seconds_on <= 0.9


def test_always_holds_statistics_until_close():
    stats = ProbeStats(StatsPolicy("always"))
    stats.start()
    assert stats.enabled
    stats.close()
    assert not stats.enabled and stats.seconds_on > 0


@pytest.mark.parametrize("policy, message", [
    (dict(mode="sometimes"), "must be one of always, sampled, off"),
    (dict(mode="sampled", window_s=10, period_s=5), "must be shorter than its period"),
])
def test_bad_policy_is_a_clear_error(policy, message):
    with pytest.raises(ValueError, match=message):
        StatsPolicy(**policy)
