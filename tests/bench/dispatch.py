"""Dispatch: what the kernel spends to run one BPF program on a tracepoint, statistics off.

The probe-cost figures come from the kernel's BPF statistics, which time a program from its first
instruction to its last: they leave out the tracepoint's call into the program (bpf_trace_run: the RCU
read section, the recursion guard, the indirect call into the JIT's code, each with this CPU's
speculation mitigations), which every program on a hook pays whatever it does. That is the floor under
any set of hooks: an untraced pod's packet pays it once per program run, before the first instruction of
the agent's.

Measured with statistics off by a getppid() loop inside a pod (no packets), in alternating order over a
few rounds: with no program, with an empty raw-tracepoint program on sys_enter (which also switches on
the system-call tracing path, for every system call of the node), and with a second one on sys_exit, its
own tracepoint, as every agent program has its own. The last step is one program run's dispatch; the
first, less it, the tracing path a system call pays once any syscall tracepoint has a program.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from . import bpfprogs, stats
from .workloads import Traffic

ARMS = {"none": (), "sys_enter": ("sys_enter",), "sys_enter+sys_exit": ("sys_enter", "sys_exit")}
STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")


def run(traffic: Traffic, pod, seconds: float, rounds: int, progress) -> dict:
    """ns per getppid() in each arm, and what one program run's dispatch and the tracing path cost."""
    if STATS_SYSCTL.exists() and STATS_SYSCTL.read_text().strip() != "0":
        return {"skipped": "BPF statistics were on (kernel.bpf_stats_enabled): they would be timed too"}
    per: dict[str, list[float]] = {k: [] for k in ARMS}
    for r in range(rounds):
        for arm in (list(ARMS) if r % 2 == 0 else list(ARMS)[::-1]):
            on = ", ".join(ARMS[arm]) or "nothing"
            progress(f"dispatch: round {r + 1} of {rounds}, empty programs on {on}")
            with ExitStack() as attached:
                for tp in ARMS[arm]:
                    attached.enter_context(bpfprogs.FloorProgram(tp))  # an empty program
                per[arm].append(traffic.syscalls(pod, seconds)["ns_per_call"])
    med = {k: stats.median(v) for k, v in per.items()}
    run_ns = med["sys_enter+sys_exit"] - med["sys_enter"]
    return {"ns_per_call": per, "median_ns_per_call": med, "dispatch_ns": run_ns,
            "syscall_path_ns": med["sys_enter"] - med["none"] - run_ns, "rounds": rounds, "seconds": seconds}
