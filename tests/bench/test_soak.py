"""The soak of `.ci/bench --only soak` (tests/bench/soak.py), for about a minute instead of ten: the agent
traces a pod receiving the highest steady packet rate this machine carries (measured first, tracing
off), with the span settings of a trace that asks for nothing, exporting to a real OTLP receiver. Its
resident memory at the end is within 10% of what it was after the warm-up, its report gives the events
lost, it counted the datagrams the application read, and it never fails. (The bench's second soak, every
packet asked for as a span, reports its figures without a bound: see tests/bench/README.md.)"""

from __future__ import annotations

import pytest

from tests.bench import overhead, soak
from tests.bench.tracers import AgentProcess
from tests.bench.workloads import Traffic
from tests.netlab import NetLab

SECONDS = 60
RATES = (100_000, 80_000, 60_000, 40_000, 20_000)


@pytest.mark.timeout(600)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # BCC warns about str sources, printing them whole
def test_agent_at_the_steady_rate_for_a_minute_memory_flat_events_lost_reported_no_crash(tmp_path):
    traffic = Traffic()
    with NetLab() as lab:
        traced, client = lab.add_pod("traced"), lab.add_pod("client")
        steady = overhead.steady_rate(traffic, client, traced, list(RATES), 2, print)
        data = soak.run(traffic, client, traced,
                        soak.Settings(steady["pps"], SECONDS, tmp_path, AgentProcess.expected_programs()), print)
    assert data["alive_at_end"] and data["exit_error"] is None, data["exit_error"]
    assert len(data["rss_samples"]) >= SECONDS // 5 - 2, data["rss_samples"]
    print("RSS samples (s, bytes):", data["rss_samples"], "counters:", data["counters"])
    assert soak.flat(data), (data["rss_start_bytes"], data["rss_end_bytes"], data["rss_samples"])
    assert isinstance(data["events_lost"], int) and isinstance(data["events_dropped_userspace"], int), data["counters"]
    read = data["traffic"]["received"]
    assert read > steady["pps"] * SECONDS / 4, data["traffic"]  # the rate was carried, not a trickle
    # Every datagram the application read crossed the probes; the in-flight tables are big enough at this rate.
    assert data["datagrams_counted"] >= 0.99 * read, (data["datagrams_counted"], read)
