"""BPF run-time statistics: the kernel times the probes only when the agent's policy says so."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from latencytrace.node_agent.agent import Agent
from latencytrace.node_agent.probestats import ProbeStats, StatsPolicy
from latencytrace.node_agent.program import Sizes

from .conftest import measure


def test_statistics_off_traces_without_timing_the_probes(lab):
    """With statistics off the packets are measured all the same, and the agent never switches the
    kernel's statistics on (each counted run is two clock reads more on every packet). Whether the kernel
    counts runs is machine-wide: another process on this machine may hold statistics on, so what is
    checked is that this agent holds no statistics descriptor while it traces."""
    pod, client = lab.add_pod("srv"), lab.add_pod("client")
    agent = Agent(sizes=Sizes(max_targets=4), stats_policy=StatsPolicy("off"))
    agent.start()
    held = []
    try:
        def traffic():
            with pod.serve("udp-recv", "--port", "9500", "--count", "200", "--timeout", "20") as rx:
                client.traffic("udp-send", "--to", pod.ip, "--port", "9500", "--count", "200", "--rate", "2000")
                held.extend(stats_fds())
            assert rx.result == {"received": 200}

        report = measure(agent, [pod], traffic)
    finally:
        agent.close()
    (target,) = report.as_json()["targets"]
    assert target["segments"]["rx_pod_stack"]["count"] == 200
    assert held == [] and agent.tracer.stats.seconds_on == 0


def stats_fds(pid: str = "self") -> list[str]:
    """A process's BPF_ENABLE_STATS file descriptors (anonymous inodes named bpf-stats)."""
    out = []
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:  # gone, or a kernel thread
        return out
    for fd in fds:
        try:
            if os.readlink(fd) == "anon_inode:bpf-stats":
                out.append(fd.name)
        except OSError:
            continue
    return out


def test_sampled_statistics_come_on_in_windows_and_go_off_at_close():
    stats = ProbeStats(StatsPolicy("sampled", window_s=0.3, period_s=0.6))
    started = time.monotonic()
    stats.start()
    assert not stats.enabled  # the first window is at the end of the first period
    # Watch two windows open and close (bounded by events: a loaded machine stretches every phase).
    windows, was_on, deadline = 0, False, started + 60
    while windows < 2 and time.monotonic() < deadline:
        on = stats.enabled
        windows += was_on and not on
        was_on = on
        time.sleep(0.01)
    stats.close()
    elapsed = time.monotonic() - started
    assert windows == 2 and not stats.enabled
    # Each window and each idle stretch lasts at least its 0.3 s, however late the thread runs: on for
    # two windows or more, off for two idle stretches or more.
    assert 0.6 <= stats.seconds_on <= elapsed - 0.6, (stats.seconds_on, elapsed)


def test_always_holds_statistics_until_close():
    stats = ProbeStats(StatsPolicy("always"))
    stats.start()
    assert stats.enabled and len(stats_fds()) == 1
    stats.close()
    assert not stats.enabled and stats.seconds_on > 0 and not stats_fds()


@pytest.mark.parametrize("policy, message", [
    (dict(mode="sometimes"), "must be one of always, sampled, off"),
    (dict(mode="sampled", window_s=10, period_s=5), "must be shorter than its period"),
])
def test_bad_policy_is_a_clear_error(policy, message):
    with pytest.raises(ValueError, match=message):
        StatsPolicy(**policy)
