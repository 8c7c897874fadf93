"""`python -m tests.bench`: run the benchmarks and write results.md, results.json and plot.png.

Parts: overhead (alternating agent off/on rounds, probe cost, agent process, bpftrace comparison),
fidelity (agent vs an independent bpftrace measurement, packet accounting), soak (the agent for 10
minutes at the steady rate) and controlplane (operator and agents against a real control plane with
kwok nodes). A part that fails is reported as failed
in the results and the others still run; the exit status says whether all of them ran.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tests.netlab import NetLab

from . import controlplane, cost, fidelity, overhead, paired, plot, results, soak
from .system import bpf_stats_sysctl, machine
from .tracers import AgentProcess
from .workloads import Traffic

PARTS = ("overhead", "cost", "paired", "fidelity", "soak", "controlplane")  # overhead includes cost
TOOLS = ("iperf3", "sockperf", "bpftrace", "bpftool", "taskset")


@dataclass(frozen=True)
class Plan:
    """How long and how often: the full run (about 55 minutes on 2 cores) or --quick (a smoke test)."""

    rounds: int = 4  # overhead, and the paired comparison
    extra_rounds: int = 2
    seconds: float = 5
    pingpong_seconds: float = 5
    steady_seconds: float = 10
    calibrate_seconds: float = 3
    rate_candidates: tuple[int, ...] = (100_000, 80_000, 60_000, 50_000, 40_000, 30_000, 20_000)
    fidelity_accounting_seconds: float = 10
    fidelity_pingpong_seconds: float = 8
    fidelity_nic: bool = True  # the NIC path arm: a download from a package registry (fidelity.nic_path)
    quiet_wait_s: float = 45
    overhead_budget_s: float = 12 * 60
    cp_scales: tuple[int, ...] = (10, 100, 1000)
    cp_pods_per_node: int = 30
    cp_agents: int = 2
    soak_seconds: float = 600
    soak_max_spans_seconds: float = 180  # then with every packet asked for as a span


QUICK = Plan(rounds=1, extra_rounds=0, seconds=1, pingpong_seconds=1, steady_seconds=1, calibrate_seconds=1,
             rate_candidates=(20_000,), fidelity_accounting_seconds=1, fidelity_pingpong_seconds=1, fidelity_nic=False,
             quiet_wait_s=0, overhead_budget_s=0, cp_scales=(3,), cp_pods_per_node=5, cp_agents=1,
             soak_seconds=6, soak_max_spans_seconds=6)


class Progress:
    """Progress lines on stderr; also samples the load average at every step, for the results header."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.loads: list[float] = []

    def __call__(self, message: str) -> None:
        self.loads.append(os.getloadavg()[0])
        print(f"[bench {time.strftime('%H:%M:%S')} +{time.monotonic() - self.t0:5.0f}s] {message}",
              file=sys.stderr, flush=True)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench-results", type=Path, help="output directory (default bench-results/)")
    p.add_argument("--only", action="append", choices=PARTS, default=[],
                   help="run only this part (repeatable; default: all)")
    p.add_argument("--quick", action="store_true", help="a tiny run of every part, to check the harness works")
    p.add_argument("--cp-scales", type=_scales, default=None, metavar="N[,N...]",
                   help="control plane: node counts to measure, e.g. 1000 (default 10,100,1000; --quick 3)")
    p.add_argument("--soak-seconds", type=_soak_seconds, default=None, metavar="S,S",
                   help="soak: seconds of the run with a trace asking for nothing, then of the one with every "
                        "packet a span (default 600,180)")
    p.add_argument("--paired-against", type=Path, default=None, metavar="AGENT",
                   help="paired part: compare this checkout's agent with another build's latencytrace-agent "
                        "(e.g. another worktree's .venv/bin/latencytrace-agent, also one from before a program "
                        "was added or removed), same arguments; default: typed against raw tracepoints")
    p.add_argument("--paired-args", default="", metavar="ARGS",
                   help="paired part: further arguments for both agents of the pair, e.g. \"--time-one-in 8\"")
    p.add_argument("--host-nat", action="store_true",
                   help="the lab's pods behind the node's NAT, as kube-proxy's rules and a CNI's masquerade make it: "
                        "the host's conntrack tracks their traffic, bridged too (default: no NAT rule of the lab's)")
    args = p.parse_args(argv)
    if args.paired_against is not None and not os.access(args.paired_against, os.X_OK):
        p.error(f"--paired-against: {args.paired_against} is not an executable")
    return args


def _scales(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of node counts: {text!r}") from None
    if not out or min(out) < 1 or list(out) != sorted(set(out)):
        raise argparse.ArgumentTypeError(f"node counts must be positive and increasing: {text!r}")
    return out


def _soak_seconds(text: str) -> tuple[float, float]:
    try:
        default, most = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"two comma-separated numbers of seconds: {text!r}") from None
    if min(default, most) < 5:
        raise argparse.ArgumentTypeError(f"a soak run takes at least 5 s: {text!r}")
    return default, most


def preflight() -> None:
    if os.geteuid() != 0:
        raise SystemExit("python -m tests.bench: run as root (it loads BPF programs and creates network namespaces)")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"python -m tests.bench: missing {', '.join(missing)} (run .ci/setup, which installs them)")


def _stop_on_term(*_) -> None:
    raise SystemExit(143)  # unwinds like Ctrl-C: lab namespaces, tracers and servers are cleaned up


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    preflight()
    if threading.current_thread() is not threading.main_thread():
        return run(args, argv)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, _stop_on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    try:
        return run(args, argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    plan = QUICK if args.quick else Plan()
    if args.cp_scales:
        plan = replace(plan, cp_scales=args.cp_scales)
    if args.soak_seconds:
        plan = replace(plan, soak_seconds=args.soak_seconds[0], soak_max_spans_seconds=args.soak_seconds[1])
    parts = [p for p in PARTS if not args.only or p in args.only or (p == "cost" and "overhead" in args.only)]
    progress = Progress()
    out_dir: Path = args.out.resolve()
    log_dir = out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    doc: dict = {
        "machine": machine(),
        "command": os.environ.get("LATENCYTRACE_BENCH_COMMAND")
        or shlex.join(["python", "-m", "tests.bench", *(argv if argv is not None else sys.argv[1:])]),
        "plan": asdict(plan), "parts": parts, "sections": {}, "rows": [], "notes": [],
    }
    progress(f"latencytrace benchmarks: {', '.join(parts)}{' (quick)' if args.quick else ''}; results in {out_dir}")
    failed = False

    def attempt(section: str, fn) -> None:
        nonlocal failed
        try:
            fn()
        except Exception as e:  # one part failing must not lose the others' figures
            failed = True
            progress(f"{section} FAILED: {e}")
            doc["sections"].setdefault(section, {})["error"] = f"{type(e).__name__}: {e}"
            (log_dir / f"{section}-error.txt").write_text(traceback.format_exc())

    if {"overhead", "cost", "paired", "fidelity", "soak"} & set(parts):
        expected = AgentProcess.expected_programs()
        traffic = Traffic()
        with NetLab(masquerade=args.host_nat) as lab:
            pods = overhead.Pods(traced=lab.add_pod("traced"), untraced=lab.add_pod("untraced"),
                                 client=lab.add_pod("client"))
            progress(f"lab: bridge {lab.bridge}, pods traced {pods.traced.ip}, untraced {pods.untraced.ip}, "
                     f"client {pods.client.ip}; client on CPU {traffic.client_cpu}, servers on CPU {traffic.server_cpu}"
                     f"{'; behind the node NAT (--host-nat)' if args.host_nat else ''}")
            progress("finding the highest steady UDP rate (64-byte datagrams, no tracing)")
            steady = overhead.steady_rate(traffic, pods.client, pods.untraced, list(plan.rate_candidates),
                                          plan.calibrate_seconds, progress)
            doc["steady_rate"] = steady
            pps = steady["pps"]

            if "overhead" in parts:
                def run_overhead() -> None:
                    s = overhead.Settings(rounds=plan.rounds, extra_rounds=plan.extra_rounds, seconds=plan.seconds,
                                          pingpong_seconds=plan.pingpong_seconds, steady_pps=pps,
                                          quiet_wait_s=plan.quiet_wait_s, budget_s=plan.overhead_budget_s,
                                          log_dir=log_dir, expected_programs=expected,
                                          lean_programs=AgentProcess.expected_programs(overhead.LEAN_SEGMENTS))
                    data = overhead.run(traffic, pods, s, progress)
                    doc["sections"]["overhead"] = data
                    doc["rows"] += [asdict(r) for r in overhead.rows(data, pps)]
                    doc["sections"]["agent"] = {}
                    doc["rows"] += [asdict(r) for r in overhead.agent_rows(data, pps)]

                attempt("overhead", run_overhead)
            if "cost" in parts:
                def run_cost() -> None:
                    data = cost.run(traffic, pods, pps, plan.seconds, plan.steady_seconds, log_dir, expected,
                                    plan.quiet_wait_s, progress, lab.bridge if plan.fidelity_nic else None)
                    doc["sections"]["probe_cost"] = data
                    doc["sections"]["comparison"] = {}
                    doc["rows"] += [asdict(r) for r in cost.rows(data)]

                attempt("probe_cost", run_cost)
            if "paired" in parts:
                def run_paired() -> None:
                    pair = paired.against(args.paired_against) if args.paired_against else paired.PAIR
                    pair = paired.with_args(pair, shlex.split(args.paired_args))
                    data = paired.run(traffic, pods, pps, plan.seconds, max(plan.rounds, 2), log_dir, expected,
                                      plan.quiet_wait_s, progress, pair)
                    doc["sections"]["paired"] = data
                    doc["rows"] += [asdict(r) for r in paired.rows(data)]

                attempt("paired", run_paired)
            if "fidelity" in parts:
                def run_fidelity() -> None:
                    data = fidelity.run(traffic, pods.client, pods.traced, pods.untraced, pps,
                                        plan.fidelity_accounting_seconds, plan.fidelity_pingpong_seconds,
                                        log_dir, plan.quiet_wait_s, progress, lab.bridge, nic=plan.fidelity_nic)
                    doc["sections"]["fidelity"] = data
                    doc["sections"]["accounting"] = {}
                    doc["rows"] += [asdict(r) for r in fidelity.rows(data)]

                attempt("fidelity", run_fidelity)
            if "soak" in parts:
                def run_soak() -> None:
                    doc["sections"]["soak"] = {}
                    for spans, seconds in (("default", plan.soak_seconds), ("max", plan.soak_max_spans_seconds)):
                        data = soak.run(traffic, pods.client, pods.traced,
                                        soak.Settings(pps, seconds, log_dir, expected, spans), progress)
                        doc["sections"]["soak"][spans] = data
                        doc["rows"] += [asdict(r) for r in soak.rows(data)]

                attempt("soak", run_soak)

    if "controlplane" in parts:
        def run_controlplane() -> None:
            data = controlplane.run(plan.cp_scales, plan.cp_pods_per_node, plan.cp_agents, out_dir / "controlplane",
                                    log_dir, progress)
            doc["sections"]["controlplane"] = data
            doc["rows"] += [asdict(r) for r in controlplane.rows(data)]

        attempt("controlplane", run_controlplane)

    doc["duration_s"] = time.time() - started
    doc["loadavg_1min_samples"] = progress.loads
    doc["bpf_stats_sysctl_at_end"] = bpf_stats_sysctl()
    doc["notes"] += notes(doc)
    results.write(out_dir, doc)
    try:
        plot.write(out_dir / "plot.png", doc)
    except Exception as e:
        failed = True
        progress(f"plot FAILED: {e}")
        (log_dir / "plot-error.txt").write_text(traceback.format_exc())
    met = [r["met"] for r in doc["rows"] if r["met"] is not None]
    progress(f"done in {doc['duration_s'] / 60:.1f} min: {sum(met)}/{len(met)} targets met; "
             f"{out_dir / 'results.md'}, {out_dir / 'results.json'}, {out_dir / 'plot.png'}")
    return 1 if failed else 0


def notes(doc: dict) -> list[str]:
    out = []
    m = doc["machine"]
    loads = doc.get("loadavg_1min_samples") or [m["loadavg_at_start"][0]]
    out.append(f"The machine is shared: other engineers ran their tests on it during this run (1-minute load "
               f"average over {len(loads)} steps: min {min(loads):.2f}, median {sorted(loads)[len(loads) // 2]:.2f}, "
               f"max {max(loads):.2f}, on {m['cores']} cores). Every figure is therefore a ratio or difference against "
               "a baseline measured in this run, overhead rounds alternate off/on, and rounds during which other "
               "processes had tracing programs loaded are repeated.")
    if 1 in (m.get("bpf_stats_sysctl_at_start"), doc.get("bpf_stats_sysctl_at_end")):
        out.append("kernel.bpf_stats_enabled was 1 during this run (a sysctl set outside the benchmark, at start "
                   f"{m.get('bpf_stats_sysctl_at_start')}, at end {doc.get('bpf_stats_sysctl_at_end')}): the kernel "
                   "timed every BPF program run, also in the arms with the agent's probe statistics off, whose "
                   "overhead then includes the statistics' clock reads (run `sysctl kernel.bpf_stats_enabled=0` "
                   "first).")
    st = doc.get("steady_rate")
    if st:
        out.append(f"Highest steady UDP rate (64-byte datagrams, client and server pinned to different CPUs, "
                   f"tracing off): {st['pps']:,} packets/s (tried: "
                   + ", ".join(f"{t['pps']:,} -> {t['sent_pps']:,} sent, {t['loss_pct']}% lost" for t in st["tried"])
                   + ")." + (" " + st["note"] if st.get("note") else ""))
    ov = doc["sections"].get("overhead", {})
    crashes = [r["on"].get("agent_stop_error") or r["on"].get("agent_died") for r in ov.get("rounds", [])]
    crashes += list(doc["sections"].get("probe_cost", {}).get("stop_errors", {}).values())
    crashes = [c for c in crashes if c]
    if crashes:
        out.append(f"The agent process failed {len(crashes)} time(s): " + "; ".join(sorted(set(c[:160] for c in crashes)))
                   + " (stderr, with Python's fault handler stacks, in logs/).")
    if "rounds" in ov:
        dirty = [i + 1 for i, r in enumerate(ov["rounds"]) if not r["clean"]]
        out.append(f"Overhead: {len(ov['rounds'])} rounds run, figures from rounds "
                   f"{', '.join(str(i + 1) for i in ov['rounds_used'])}"
                   + (f"; rounds {', '.join(map(str, dirty))} had other processes' tracing programs loaded"
                      if dirty else "; no other tracing programs were loaded during them") + ".")
    return out
