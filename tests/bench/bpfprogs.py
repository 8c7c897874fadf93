"""BPF programs seen from outside the process that owns them: run-time statistics, owners, strangers.

The kernel keeps run_cnt and run_time_ns per program while statistics are enabled (the benchmark
enables them with BPF_ENABLE_STATS around the phases it reads them in; the agent's standalone command
does so for as long as it runs). /proc/PID/fdinfo of a program's file descriptor shows both counters and the program id,
so the agent's, bpftrace's and our own programs are read alike, without their cooperation.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

from latencytrace.node_agent.kernel import headers
from latencytrace.node_agent.kernel.bpfsys import ProgStats

# Program types that run on kernel events: other people's tracers change what we measure.
TRACING_TYPES = {"tracepoint", "raw_tracepoint", "kprobe", "tracing", "perf_event", "raw_tracepoint_writable"}


def _fdinfo_progs(pid: int | str) -> dict[int, ProgStats]:
    """Program id -> statistics for every BPF program `pid` holds open."""
    out: dict[int, ProgStats] = {}
    for info in Path(f"/proc/{pid}/fdinfo").glob("*"):
        try:
            text = info.read_text()
        except OSError:  # the fd closed meanwhile
            continue
        fields = dict(re.findall(r"^(\w+):\s+(\S+)", text, re.M))
        if "prog_id" not in fields or "prog_type" not in fields:
            continue  # links, maps (a program array names its owner_prog_type) and ordinary files show up here too
        out[int(fields["prog_id"])] = ProgStats(int(fields.get("run_cnt", 0)), int(fields.get("run_time_ns", 0)))
    return out


def all_programs() -> list[dict]:
    out = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout or "[]")


class ProgramSet:
    """The BPF programs of one process, by name (bpftool's names are the full function names)."""

    def __init__(self, pid: int | str = "self"):
        self.pid = pid
        self.names: dict[int, str] = {}

    def ids(self) -> set[int]:
        return set(_fdinfo_progs(self.pid))

    def resolve_names(self) -> None:
        mine = self.ids()
        self.names = {p["id"]: p.get("name", str(p["id"])) for p in all_programs() if p["id"] in mine}

    def snapshot(self) -> dict[str, ProgStats]:
        """Cumulative statistics per program name (a program attached twice is one program)."""
        if not self.names:
            self.resolve_names()
        out: dict[str, ProgStats] = {}
        for pid, stats in _fdinfo_progs(self.pid).items():
            name = self.names.get(pid, f"prog{pid}")
            out[name] = out.get(name, ProgStats()) + stats
        return out


def delta(after: dict[str, ProgStats], before: dict[str, ProgStats]) -> dict[str, ProgStats]:
    return {name: s - before.get(name, ProgStats()) for name, s in after.items()}


def total(stats: dict[str, ProgStats]) -> ProgStats:
    out = ProgStats()
    for s in stats.values():
        out = out + s
    return out


def foreign_tracers(own_pids: list[int | str]) -> list[str]:
    """Tracing programs loaded on this machine by anyone but us (e.g. other test runs' agents)."""
    own: set[int] = set()
    for pid in own_pids:
        own |= set(_fdinfo_progs(pid))
    return sorted(f"{p.get('name', '?')}#{p['id']}" for p in all_programs()
                  if p.get("type") in TRACING_TYPES and p["id"] not in own)


def wait_quiet(own_pids: list[int | str], max_wait_s: float, progress=None) -> list[str]:
    """Wait up to max_wait_s for other people's tracers to go; return those still there."""
    deadline = time.monotonic() + max_wait_s
    # Programs of a tracer that just closed (ours too) take a moment to be freed: not worth a word.
    grace = time.monotonic() + min(3.0, max_wait_s)
    strangers = foreign_tracers(own_pids)
    announced = False
    while strangers and time.monotonic() < deadline:
        if progress and not announced and time.monotonic() >= grace:
            progress(f"waiting up to {max_wait_s:.0f} s for {len(strangers)} tracing program(s) of other "
                     f"processes to go ({', '.join(strangers[:3])}{', ...' if len(strangers) > 3 else ''})")
            announced = True
        time.sleep(0.5 if time.monotonic() < grace else 2)
        strangers = foreign_tracers(own_pids)
    return strangers


class FloorProgram:
    """An empty raw-tracepoint program (on netif_receive_skb unless told): what statistics plus dispatch
    cost alone; with statistics off, dispatch.py's unit of a program run.

    Its run time per run is the floor under every probe's figure (BPF statistics time each run with two
    clock reads, which the probe would not pay with statistics off)."""

    SOURCE = b"int lt_bench_floor(struct bpf_raw_tracepoint_args *ctx) { return 0; }"

    def __init__(self, tracepoint: str = "netif_receive_skb"):
        self.tracepoint = tracepoint
        self.bpf = None
        self.prog_id: int | None = None

    def __enter__(self) -> FloorProgram:
        from bcc import BPF  # Debian's BCC, linked into the virtual environment by .ci/setup

        before = set(_fdinfo_progs("self"))
        headers.ensure()  # BCC needs a kernel header tree, as the agent does (on a fresh machine: none yet)
        self.bpf = BPF(text=self.SOURCE)
        self.bpf.attach_raw_tracepoint(tp=self.tracepoint.encode(), fn_name=b"lt_bench_floor")
        self.prog_id = (set(_fdinfo_progs("self")) - before).pop()
        return self

    def stats(self) -> ProgStats:
        return _fdinfo_progs("self").get(self.prog_id, ProgStats())

    def __exit__(self, *exc) -> None:
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
