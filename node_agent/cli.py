"""`latencytrace-agent`: the standalone tracer (`trace`), the in-cluster agent (`run`), `--dump-bpf`.

Errors the user can fix (not root, no BTF, a namespace that does not exist) print one line naming the
problem and exit with status 2; they never print a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time

from . import segments
from .kernel.btf import BTFError
from .kernel.headers import HeadersError
from .probestats import MODES, StatsPolicy
from .targets import TargetError

log = logging.getLogger("latencytrace")


class UsageError(Exception):
    pass


def _positive(kind):
    def parse(text: str):
        v = kind(text)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, not {text}")
        return v
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latencytrace-agent",
                                description="Per-pod network stack latency from kernel tracepoints.")
    p.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default), ERROR")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("trace", help="trace network namespaces on this machine (no cluster needed)")
    t.add_argument("--netns", action="append", default=[], metavar="PATH",
                   help="network namespace to trace: a path (/run/netns/x, /proc/PID/ns/net) or an `ip netns` name")
    t.add_argument("--pid", action="append", default=[], type=int, help="trace the network namespace of this process")
    t.add_argument("--duration", type=_positive(float), default=None, metavar="SECONDS",
                   help="stop after this long (default: until Ctrl-C)")
    t.add_argument("--format", choices=("table", "json", "jsonl"), default="table",
                   help="table (live, default), json (one document at the end) or jsonl (one line per interval)")
    t.add_argument("--interval", type=_positive(float), default=1.0, metavar="SECONDS",
                   help="table refresh and export interval (default 1)")
    t.add_argument("--segments", default="", help="comma-separated segments to record (default: all)")
    t.add_argument("--direction", choices=("both", "receive", "transmit"), default="both")
    t.add_argument("--slow-threshold-us", type=_positive(int), default=1000,
                   help="packets slower than this (total, µs) become spans (default 1000)")
    t.add_argument("--sample-one-in", type=int, default=0,
                   help="also make a span of 1 in N other timed packets (0: none)")
    t.add_argument("--time-one-in", type=int, default=1,
                   help="time 1 packet in N, chosen at random when it enters or leaves the pod (default 1: every "
                        "packet); every packet is still counted")
    t.add_argument("--spans-per-second", type=_positive(int), default=10, help="span cap per target (default 10)")
    t.add_argument("--otlp-endpoint", default=None,
                   help="export to this OTLP endpoint (default: $OTEL_EXPORTER_OTLP_ENDPOINT if set)")
    t.add_argument("--otlp-protocol", choices=("grpc", "http/protobuf"), default=None,
                   help="default: $OTEL_EXPORTER_OTLP_PROTOCOL, else grpc")
    t.add_argument("--probe-stats", choices=MODES, default="always",
                   help="when the kernel times the probes: always (default; costs ~2 µs per round trip), "
                        f"sampled ({StatsPolicy.window_s:g} s of every {StatsPolicy.period_s:g} s) or off")
    t.add_argument("--max-targets", type=_positive(int), default=32)
    t.add_argument("--tracepoints", choices=("auto", "typed", "raw"), default="auto",
                   help="typed: the probes read kernel memory with plain loads (kernels with BTF-typed "
                        "tracepoints, 5.5 and later); raw: with a helper call per read, slower; auto "
                        "(default): typed where the kernel loads them")
    t.add_argument("--btf", default="/sys/kernel/btf/vmlinux",
                   help="BTF of the running kernel (default /sys/kernel/btf/vmlinux)")
    t.add_argument("--dump-bpf", action="store_true", help="print the BPF source and compiler flags, then exit")

    r = sub.add_parser("run", help="run as the node agent of a cluster (reads its node's LatencyTraceNode)")
    r.add_argument("--dump-bpf", action="store_true", help="print the BPF source and compiler flags, then exit")
    return p


def _settings(args):
    from .tracer import MAX_TIME_ONE_IN, TargetSettings

    try:
        seg_mask = segments.mask([s.strip() for s in args.segments.split(",") if s.strip()])
    except ValueError as e:
        raise UsageError(str(e)) from None
    dir_mask = segments.direction_mask(("receive", "transmit") if args.direction == "both" else (args.direction,))
    if not 1 <= args.time_one_in <= MAX_TIME_ONE_IN:
        raise UsageError(f"--time-one-in must be 1 to {MAX_TIME_ONE_IN}")
    return TargetSettings(slow_ns=args.slow_threshold_us * 1000, sample_one_in=max(args.sample_one_in, 0),
                          time_one_in=args.time_one_in,
                          seg_mask=seg_mask, dir_mask=dir_mask, events_per_sec=args.spans_per_second)


def _desired(args, settings):
    from . import targets
    from .agent import Desired

    desired = []
    for path in args.netns:
        ns = targets.from_path(path)  # resolve now: a bad path is a usage error, not a runtime state
        desired.append(Desired(f"netns:{ns.inode}", path, (lambda ns=ns: ns), settings))
    for pid in args.pid:
        ns = targets.from_pid(pid)
        desired.append(Desired(f"netns:{ns.inode}", f"pid {pid}", (lambda ns=ns: ns), settings))
    if not desired:
        raise UsageError("nothing to trace: give --netns PATH or --pid PID")
    return desired


def dump_bpf(btf_path: str = "/sys/kernel/btf/vmlinux", tracepoints: str = "auto") -> int:
    from .tracer import Tracer

    src, cflags, feats = Tracer(btf_path=btf_path, tracepoints=tracepoints).build_source()
    print("// cflags: " + " ".join(cflags))
    for u in feats.unavailable:
        print(f"// unavailable: {u.probe.tracepoint}: {u.reason}")
    print(src)
    return 0


def trace(args) -> int:
    from rich.console import Console
    from rich.live import Live

    from .agent import Agent
    from .program import Sizes
    from .report import IntervalLines, Report
    from .tracer import check_privileges

    if args.dump_bpf:
        return dump_bpf(args.btf, getattr(args, "tracepoints", "auto"))
    check_privileges()
    settings = _settings(args)
    desired = _desired(args, settings)
    report = Report()
    sinks = [report]
    endpoint_sink = _otlp_sink(args)
    if endpoint_sink is not None:
        sinks.append(endpoint_sink)
    stop = threading.Event()
    if args.format == "jsonl":  # a reader that goes away (`| head`) ends the run like Ctrl-C
        sinks.append(IntervalLines(sys.stdout, lambda: _run_fields(agent, args), on_broken_pipe=stop.set))
    agent = Agent(sizes=Sizes(max_targets=args.max_targets), sinks=sinks, btf_path=args.btf,
                  stats_policy=StatsPolicy(args.probe_stats), tracepoints=args.tracepoints)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    console = Console(stderr=True)
    try:
        agent.start()
        states = agent.reconcile(desired)
        for st in states.values():
            if st.state != "Tracing":
                raise UsageError(st.message)
        # The readiness line (stderr, whatever the format): from here on the targets' packets are measured.
        status = agent.tracer.status
        console.print(f"[bold]latencytrace[/]: {len(status.attached)} probes attached in "
                      f"{agent.tracer.attach_seconds:.2f} s, tracing {len(states)} target(s)"
                      + (f", unavailable: {', '.join(p.tracepoint for p, _ in status.unavailable)}"
                         if status.unavailable else ""), highlight=False, soft_wrap=True)
        deadline = time.monotonic() + args.duration if args.duration else None
        live = Live(report.table(), console=console, auto_refresh=False) if args.format == "table" else None
        if live:
            live.start()
        try:
            while not stop.is_set():
                left = deadline - time.monotonic() if deadline else args.interval
                if left <= 0:
                    break
                stop.wait(min(args.interval, left))
                agent.refresh_addresses()
                agent.refresh_host_devices()
                agent.publish(agent.collect())
                if live:
                    live.update(report.table(), refresh=True)
        finally:
            if live:
                live.stop()
    finally:
        agent.close()
    if args.format == "json":
        json.dump({**report.as_json(), **_run_fields(agent, args)}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif args.format == "table":
        console.print(report.table(title="latencytrace: whole run"))
    return 0


def _run_fields(agent, args) -> dict:
    """The fields of the JSON documents that describe the run rather than the packets."""
    return {"attach_seconds": round(agent.tracer.attach_seconds or 0, 3), "tracepoints": agent.tracer.tracepoints,
            "probe_stats": {"mode": args.probe_stats, "seconds_on": round(agent.tracer.stats.seconds_on, 3)},
            "unavailable_probes": {p.tracepoint: why for p, why in agent.tracer.status.unavailable}}


def _otlp_sink(args):
    """The OTLP exporter sink, if an endpoint is configured (flag or OTEL_EXPORTER_OTLP_ENDPOINT)."""
    from .export import sink_from_cli

    return sink_from_cli(args)


def run(args) -> int:
    if args.dump_bpf:
        return dump_bpf()
    from .cluster import main as cluster_main

    return cluster_main()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from .export.config import ExportConfigError
        from .tracer import TracerError

        if args.command == "trace":
            return trace(args)
        return run(args)
    except (UsageError, TargetError, BTFError, HeadersError, TracerError, ExportConfigError) as e:
        print(f"latencytrace-agent: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except OSError as e:  # a file or device the command needs cannot be used: say which, no traceback
        where = f" ({e.filename})" if e.filename else ""
        print(f"latencytrace-agent: {e.strerror or e}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
