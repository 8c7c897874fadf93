"""Soak: the agent at the highest steady packet rate for a long while (`.ci/bench --only soak`: 10 minutes).

One `latencytrace-agent trace` process (the Agent core the cluster agent runs, as a user starts it)
traces the "traced" pod and exports to a real OTLP receiver, with the span settings of a trace that asks
for nothing, or ("max") with every packet asked for as a span at the highest rate the chart's default
limits allow, so that the event ring, the span path and the exporter work all along. iperf3 sends 64-byte UDP datagrams at the steady rate
into that pod for the whole run. The agent's resident memory is sampled every few seconds; "start" is
the first sample after a warm-up (its first exports, imports and caches), "end" the last one before it
is stopped. The agent's own report gives the events lost (ring buffer full) and dropped in user space
(queue full) and the packets it counted. tests/bench/test_soak.py runs the same for about a minute.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.export.receiver import Receiver
from tests.netlab import Pod

from .results import Row
from .tracers import AgentProcess
from .workloads import Traffic

RSS_FLAT = 0.10  # end within 10% of start
MAX_SPANS_PER_SECOND = 1000  # the most the chart's default limits let a trace ask for (limits.maxSpansPerSecond)
# The trace settings of a soak: a trace that asks for nothing (the CRD's defaults: packets slower than
# 1 ms become spans, at most 10 a second), or one asking for every packet as a span at the highest rate
# the chart's default limits allow.
SPANS = {"default": ("--slow-threshold-us", "1000", "--spans-per-second", "10"),
         "max": ("--sample-one-in", "1", "--spans-per-second", str(MAX_SPANS_PER_SECOND))}


@dataclass(frozen=True)
class Settings:
    pps: int
    seconds: float
    log_dir: Path
    expected_programs: int
    spans: str = "default"  # a key of SPANS
    sample_every_s: float = 5.0

    @property
    def warmup_s(self) -> float:
        return min(30.0, max(5.0, self.seconds / 10))


def run(traffic: Traffic, client: Pod, traced: Pod, s: Settings, progress) -> dict:
    receiver = Receiver().start()
    agent = AgentProcess([traced.path], s.log_dir,
                         ("--probe-stats", "sampled", *SPANS[s.spans], "--otlp-endpoint", receiver.grpc_endpoint))
    samples: list[tuple[float, int]] = []  # (seconds since the traffic started, RSS bytes)
    done = threading.Event()
    try:
        agent.start(s.expected_programs)
        t0 = time.monotonic()

        def sample() -> None:
            while True:
                if agent.alive():
                    samples.append((time.monotonic() - t0, agent.usage().rss_bytes))
                if done.wait(s.sample_every_s):
                    return

        sampler = threading.Thread(target=sample, name="soak-rss", daemon=True)
        sampler.start()
        progress(f"soak: {s.pps:,} packets/s of 64-byte UDP into the traced pod for {s.seconds:.0f} s, "
                 f"{s.spans} span settings ({' '.join(SPANS[s.spans])})")
        traffic_result = traffic.udp_rate(client, traced, s.pps, s.seconds)
        done.set()
        sampler.join(30)
        alive = agent.alive()
        exit_error = None
        report: dict = {}
        try:
            report = agent.stop()
        except RuntimeError as e:
            exit_error = str(e)
    finally:
        done.set()
        agent.kill()
        receiver.stop()
    after_warmup = [(t, r) for t, r in samples if t >= s.warmup_s] or samples[-1:]
    start, end = after_warmup[0], samples[-1] if samples else (0.0, 0)
    counters = report.get("counters", {})
    counted = sum(seg.get("count", 0) for seg in _segments(report, "rx_socket_queue"))
    out = {
        "pps": s.pps, "seconds": s.seconds, "warmup_s": s.warmup_s, "spans": s.spans, "traffic": traffic_result,
        "alive_at_end": alive, "exit_error": exit_error,
        "rss_samples": [(round(t, 1), r) for t, r in samples],
        "rss_start_bytes": start[1], "rss_start_at_s": round(start[0], 1),
        "rss_end_bytes": end[1], "rss_end_at_s": round(end[0], 1),
        "rss_change": (end[1] - start[1]) / start[1] if start[1] else None,
        "events_lost": counters.get("events_lost"), "events_dropped_userspace": counters.get("events_dropped_userspace"),
        "rate_limited": counters.get("rate_limited"), "counters": counters,
        "datagrams_counted": counted,
    }
    progress(f"soak: RSS {start[1] / 2**20:.1f} MiB at {start[0]:.0f} s -> {end[1] / 2**20:.1f} MiB at {end[0]:.0f} s; "
             f"events lost {out['events_lost']}, dropped in user space {out['events_dropped_userspace']}; "
             f"agent {'alive' if alive and not exit_error else 'FAILED: ' + str(exit_error)}")
    return out


def _segments(report: dict, name: str) -> list[dict]:
    """The agent report's summaries of segment `name`, one per target that has it."""
    return [t["segments"][name] for t in report.get("targets", []) if name in t.get("segments", {})]


def flat(data: dict) -> bool:
    return data["rss_change"] is not None and abs(data["rss_change"]) <= RSS_FLAT


def rows(data: dict) -> list[Row]:
    t = data["traffic"]
    ok = data["alive_at_end"] and not data["exit_error"]
    how = ("a trace asking for nothing (spans of packets over 1 ms, 10/s)" if data["spans"] == "default" else
           f"every packet asked for as a span, {MAX_SPANS_PER_SECOND}/s cap")
    return [
        Row("soak", f"agent resident memory over {data['seconds'] / 60:.0f} min at {data['pps']:,} pkt/s ({how})",
            f"{data['rss_start_bytes'] / 2**20:.1f} MiB at {data['rss_start_at_s']:.0f} s",
            f"{data['rss_end_bytes'] / 2**20:.1f} MiB at {data['rss_end_at_s']:.0f} s",
            f"{data['rss_change'] * 100:+.1f}%" if data["rss_change"] is not None else "n/a",
            "within ±10%", flat(data), note=f"start: first sample after a {data['warmup_s']:.0f} s warm-up"),
        Row("soak", f"events lost (ring buffer full) / dropped in user space (queue full); {how}", "—",
            f"{data['events_lost']} / {data['events_dropped_userspace']}",
            f"rate-limited in the kernel: {data['rate_limited']}", "reported", data["events_lost"] is not None,
            note=f"{t['received']:,} of {t['sent']:,} datagrams read by the application"),
        Row("soak", f"agent process through the run; {how}", "—", "alive, stopped cleanly" if ok else
            f"failed: {data['exit_error'] or 'exited during the run'}", "", "no crash", ok),
    ]
