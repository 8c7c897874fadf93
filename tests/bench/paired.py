"""Two builds of the agent measured against each other on the same packets: a paired comparison.

Separate sessions, even alternating, compare packets at different moments on a machine whose cost per
run drifts by 20-30% between minutes here; a difference of 50 ns per hook drowns in that. So both
agents run at once, tracing the same pod, and each program's run time is read from the kernel's
statistics for the same workloads: every packet runs both agents' programs back to back. What one
agent's program leaves in the caches helps the program that runs after it, and the program attached
first pays for the dispatch (about 13 ns more per run, measured with two empty programs), so the attach
order alternates every round and each figure pools all rounds.

The pair compared is A = `latencytrace-agent trace` with `--tracepoints typed` and B = the same with
`--tracepoints raw` (node_agent/kernel/progload.py: what typed tracepoints save); `PAIR` is the one
place to compare other arguments, e.g. `--time-one-in 8` against nothing. `--paired-against AGENT`
compares two builds instead (this checkout's agent and another's), to measure a change to the probes;
`--paired-args` gives both agents of either pair the same further arguments (`with_args`), e.g. both
`--time-one-in 8` to measure a change to the probes when they sample.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from latencytrace.node_agent.kernel import bpfsys

from . import bpfprogs
from .bpfprogs import ProgStats
from .overhead import Pods
from .results import Row, fmt
from .tracers import AGENT, AgentProcess
from .workloads import Traffic

# name -> (agent executable, its arguments)
PAIR = {"typed": (AGENT, ("--tracepoints", "typed")), "raw": (AGENT, ("--tracepoints", "raw"))}


def against(other: Path) -> dict[str, tuple[str, tuple[str, ...]]]:
    """This checkout's agent (A) and another build's (B), with the same (default) arguments."""
    return {"this": (AGENT, ()), "other": (str(other), ())}


def with_args(pair: dict[str, tuple[str, tuple[str, ...]]], extra: list[str]) -> dict[str, tuple[str, tuple[str, ...]]]:
    """The same pair, each agent given `extra` arguments too (--paired-args: e.g. both timing 1 in 8)."""
    return {n: (agent, (*args, *extra)) for n, (agent, args) in pair.items()}


def _workloads(pods: Pods, pps: int, seconds: float):
    return (
        ("udp_rate/traced", f"UDP {pps:,} pkt/s into the traced pod",
         lambda t: t.udp_rate(pods.client, pods.traced, pps, seconds)),
        ("udp_rate/untraced", f"UDP {pps:,} pkt/s into an untraced pod",
         lambda t: t.udp_rate(pods.client, pods.untraced, pps, seconds)),
        ("pp_tcp/traced", "TCP ping-pong with the traced pod",
         lambda t: t.pingpong(pods.client, pods.traced, "tcp", seconds)),
        ("pp_udp/traced", "UDP ping-pong with the traced pod",  # a UDP read that does not race its wakeup
         lambda t: t.pingpong(pods.client, pods.traced, "udp", seconds)),
        ("pp_tcp/untraced", "TCP ping-pong with an untraced pod",
         lambda t: t.pingpong(pods.client, pods.untraced, "tcp", seconds)),
        ("pp_udp/untraced", "UDP ping-pong with an untraced pod",
         lambda t: t.pingpong(pods.client, pods.untraced, "udp", seconds)),
        ("unix_pp/untraced", "unix-socket messages in an untraced pod (per message: no packets)",
         lambda t: t.unix_pingpong(pods.untraced, seconds)),
    )


def run(traffic: Traffic, pods: Pods, pps: int, seconds: float, rounds: int, log_dir: Path,
        expected_programs: int, quiet_wait_s: float, progress, pair=PAIR) -> dict:
    names = list(pair)
    workloads = _workloads(pods, pps, seconds)
    progs: dict[str, dict[str, dict[str, ProgStats]]] = {n: {} for n in names}  # agent -> workload -> program
    packets: dict[str, int] = {}
    stats_fd = bpfsys.enable_stats()
    try:
        for r in range(rounds):
            order = names if r % 2 == 0 else names[::-1]
            bpfprogs.wait_quiet(["self"], quiet_wait_s, progress)
            agents: dict[str, AgentProcess] = {}
            try:
                for n in order:
                    agent, args = pair[n]
                    agents[n] = AgentProcess([pods.traced.path], log_dir, (*args, "--probe-stats", "always"),
                                             agent=agent)
                    agents[n].start(expected_programs if agent == AGENT else None)  # another build: its own count
                for key, label, work in workloads:
                    progress(f"paired round {r + 1}/{rounds} ({' then '.join(order)} attached): {label}")
                    before = {n: a.stats() for n, a in agents.items()}
                    result = work(traffic)
                    after = {n: a.stats() for n, a in agents.items()}
                    packets[key] = packets.get(key, 0) + result["packets"]
                    for n in names:  # by the kernel's name: a tracepoint's variants (prog@tracepoint) pool
                        acc = progs[n].setdefault(key, {})
                        for prog, s in bpfprogs.delta(after[n], before[n]).items():
                            acc[prog] = acc.get(prog, ProgStats()) + s
            finally:
                for a in agents.values():
                    try:
                        a.stop()
                    finally:
                        a.kill()
            time.sleep(0.5)
    finally:
        os.close(stats_fd)
    labels = {key: label for key, label, _ in workloads}
    # Each side as its arguments, after the executable when it is another build's.
    out: dict = {"pair": {n: [*([] if agent == AGENT else [agent]), *args] for n, (agent, args) in pair.items()},
                 "rounds": rounds, "workloads": {}}
    for key, label in labels.items():
        pk = max(packets.get(key, 0), 1)
        w = {"label": label, "packets": packets.get(key, 0), "per_packet_ns": {}, "programs": {}}
        for n in names:
            tot = bpfprogs.total(progs[n].get(key, {}))
            w["per_packet_ns"][n] = tot.run_time_ns / pk
            w["programs"][n] = {p: {"run_cnt": s.run_cnt, "avg_ns": s.avg_ns}
                                for p, s in sorted(progs[n][key].items())}
        out["workloads"][key] = w
    return out


def rows(data: dict) -> list[Row]:
    a, b = list(data["pair"])
    pair = f"{' '.join(data['pair'][a]) or 'this build'} vs {' '.join(data['pair'][b])}"
    out: list[Row] = []
    for w in data["workloads"].values():
        pa, pb = w["per_packet_ns"][a], w["per_packet_ns"][b]
        out.append(Row("paired", f"all agent programs per packet, {w['label']} (statistics' floor included)",
                       f"{fmt(pb, 0, 'ns')} ({b})", f"{fmt(pa, 0, 'ns')} ({a})", f"{pa - pb:+.0f} ns", "—", None,
                       note=f"{pair}, both tracing at once, {data['rounds']} rounds, attach order alternating"))
        # Every program either build ran on a tenth of the packets or more (two builds may differ in their programs: one
        # the other does not load is shown as such, with its runs per packet).
        for prog in sorted(set(w["programs"][a]) | set(w["programs"][b])):
            sa, sb = (_busy(w["programs"][n].get(prog), w["packets"]) for n in (a, b))
            if not sa and not sb:
                continue  # programs that run on a few packets only (IRQs of the machine, drops)
            out.append(Row("paired", f"{prog}: time per run, {w['label']}", _per_run(sb, w["packets"], b),
                           _per_run(sa, w["packets"], a),
                           f"{sa['avg_ns'] - sb['avg_ns']:+.0f} ns" if sa and sb else "—", "—", None))
    return out


def _busy(stats: dict | None, packets: int) -> dict | None:
    """A program's statistics if it ran on at least a tenth of the packets, else None."""
    return stats if stats and stats["run_cnt"] and stats["run_cnt"] >= packets // 10 else None


def _per_run(stats: dict | None, packets: int, name: str) -> str:
    if not stats:
        return f"not run ({name})"
    return f"{fmt(stats['avg_ns'], 0, 'ns')} × {stats['run_cnt'] / max(packets, 1):.1f} ({name})"
