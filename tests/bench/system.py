"""What the machine and its processes did: CPU time, memory, interface counters, and what machine it is."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil

_TICK_NS = 1e9 / os.sysconf("SC_CLK_TCK")


def busy_cpu_ns() -> float:
    """CPU time all CPUs spent not idle since boot (user, system, interrupts; steal and iowait excluded)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) * _TICK_NS


@dataclass
class ProcessUsage:
    cpu_s: float  # user + system
    user_s: float
    system_s: float
    rss_bytes: int
    peak_rss_bytes: int
    uss_bytes: int  # private pages only: what the process would give back on exit


def process_usage(pid: int, private: bool = False) -> ProcessUsage:
    """CPU time and memory of a process; `private` also reads its USS (walks smaps: not for tight loops)."""
    p = psutil.Process(pid)
    t = p.cpu_times()
    peak = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
    uss = p.memory_full_info().uss if private else 0
    return ProcessUsage(t.user + t.system, t.user, t.system, p.memory_info().rss, peak, uss)


def link_counts(ifname: str) -> tuple[int, int]:
    """(received, sent) packets of a host-side interface; for a pod's veth peer: (out of, into) the pod."""
    stats = Path("/sys/class/net") / ifname / "statistics"
    return int((stats / "rx_packets").read_text()), int((stats / "tx_packets").read_text())


def link_packets(ifname: str) -> int:
    """Packets into and out of the pod behind a host-side veth."""
    return sum(link_counts(ifname))


def bpf_stats_sysctl() -> int | None:
    """kernel.bpf_stats_enabled as set with sysctl (1: the kernel times every BPF program run, machine-wide,
    whether or not a process holds BPF_ENABLE_STATS), or None if it cannot be read."""
    try:
        return int(Path("/proc/sys/kernel/bpf_stats_enabled").read_text())
    except (OSError, ValueError):
        return None


def machine() -> dict:
    cpu = platform.processor() or ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = psutil.virtual_memory().total
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=root).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, cwd=root).stdout.strip()
        if commit and changed:
            commit += f" with {len(changed.splitlines())} uncommitted changed file(s)"
    except OSError:
        commit = ""
    return {
        "kernel": platform.release(),
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "hostname": platform.node(),
        "git_commit": commit,
        "loadavg_at_start": list(os.getloadavg()),
        "bpf_stats_sysctl_at_start": bpf_stats_sysctl(),
        "tools": {name: _version(cmd) for name, cmd in (("iperf3", ["iperf3", "--version"]),
                                                       ("sockperf", ["sockperf", "--version"]),
                                                       ("bpftrace", ["bpftrace", "--version"]))},
    }


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0].strip() if text else "?"
