"""The final BPF source and its compiler flags: bpf/*.c sources plus -D macros.

Three kinds of configuration, each with one job: -D macros for sizes, constants and BTF offsets (here);
BPF maps for run-time tunables and target sets (tracer.py); nothing is rendered into the C text.
"""

from __future__ import annotations

import importlib.resources
import os
from dataclasses import dataclass

from . import histogram, lookup, segments
from .kernel.bpfsys import possible_cpus
from .probes import SOURCES, send_syscalls


@dataclass(frozen=True)
class Sizes:
    max_targets: int = 32
    # In-flight arrays, each rounded up to a power of two: received packets (and, as many again, the
    # UDP packets waiting in their sockets' rings), transmitted packets, and UDP sockets followed
    # (send starts need no table: they are per-CPU slots).
    rx_inflight: int = 16384
    tx_inflight: int = 16384
    send_inflight: int = 8192
    ringbuf_pages: int = 64  # ring buffer for slow-packet events, in pages; a power of two
    lookup_bits: int = lookup.TABLE_BITS  # target lookup tables of 2**bits positions (lookup.py)

    def __post_init__(self) -> None:
        if self.ringbuf_pages <= 0 or self.ringbuf_pages & (self.ringbuf_pages - 1):
            raise ValueError(f"ringbuf_pages must be a power of two, not {self.ringbuf_pages}")
        if not 2 <= self.lookup_bits <= 16:
            raise ValueError(f"lookup_bits must be 2-16, not {self.lookup_bits}")
        for name in ("max_targets", "rx_inflight", "tx_inflight", "send_inflight"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


# lt_filter_dev()'s answer for a device in the host's namespace (untraced, but the host side of pods'
# paths); -1 is any other untraced namespace, another pod's, whose packets' addresses are never read.
HOST_SLOT = -2
MAX_IRQ = 4096  # NIC IRQ numbers at or above this get no hardirq boundary (their softirq raise still is one)
# Host devices the probes treat apart, each kind a bitmap of ifindexes below MAX_HOSTDEV_IFINDEX (8 KiB
# each) in lt_hostdev: the uplinks (NICs and what is stacked on them), and the host sides of traced pods'
# veths. A device at or above it is not followed past NAT.
MAX_HOSTDEV_IFINDEX = 1 << 16
HOSTDEV_KINDS = ("UPLINK", "POD")
# In each CPU's generation word (lt_cpu want_gen): the hook that ends every NET_RX run (softirq_exit) is
# attached, so a pod's send may make the run it raises quiet (LT_PEND_QUIET): that hook bounds the quiet
# state's life. Without it the state would outlive the run, and a packet that took a quiet one's freed
# skb would be turned away as quiet (bpf/tx.bpf.c, lt_net_dev_queue).
GEN_QUIET_RUNS = 1 << 31
QUIET_RUNS_END = "lt_softirq_exit"


def table_bits(entries: int) -> int:
    """log2 of the power of two at or above `entries` (at least 4 entries: two sets of two)."""
    return max(2, (entries - 1).bit_length())


def bpf_dir():
    return importlib.resources.files("latencytrace.bpf")


def source() -> str:
    """All probe sources, concatenated in dependency order (header first, via its include guard)."""
    root = bpf_dir()
    parts = [root.joinpath("latencytrace.h").read_text()]
    parts += [root.joinpath(f"{name}.bpf.c").read_text() for name in SOURCES]
    return "\n".join(parts)


@dataclass(frozen=True)
class TailCall:
    """A program that goes on in a fresh run of itself (bpf_tail_call): the C calls slot `index` of the
    program array `array` as LT_TAIL_<macro>; the loader fills the slot with `program` once loaded."""

    macro: str
    array: str
    index: int
    program: str


TAIL_CALLS = (TailCall("TCP_READS", "lt_tail", 0, "lt_tcp_rcv_space_adjust"),)


def tail_calls(programs: list[str]) -> list[tuple[str, int, str]]:
    """(array, index, program) of the tail calls among the programs to load."""
    return [(t.array, t.index, t.program) for t in TAIL_CALLS if t.program in programs]


def macros(offsets: dict[str, int], sizes: Sizes, kfree_skb_reason_arg: int | None,
           typed: bool = False, not_specified_reason: int | None = None) -> dict[str, int | str]:
    """typed: the programs load as typed tracepoints and read kernel memory with plain loads (LT_TYPED).
    not_specified_reason: the kernel's SKB_DROP_REASON_NOT_SPECIFIED (its number changed across kernels)."""
    m: dict[str, int | str] = {}
    m.update(offsets)
    # Imported here: both import the tracer, which imports this module.
    from . import collectors, events

    m.update(segments.bpf_macros())
    m.update(collectors.bpf_macros())
    m.update(events.bpf_macros())
    m.update(
        LT_MAX_TARGETS=sizes.max_targets,
        LT_NCPU=possible_cpus(),  # lt_cpu: an entry per CPU the kernel may run
        LT_MAX_IRQ=MAX_IRQ,
        LT_HOSTDEV_WORDS=MAX_HOSTDEV_IFINDEX // 64,
        LT_GEN_QUIET_RUNS=f"{GEN_QUIET_RUNS}U",
        # In-flight arrays: the configured sizes rounded up to a power of two (direct-mapped by hash).
        LT_RX_BITS=table_bits(sizes.rx_inflight),
        LT_TX_BITS=table_bits(sizes.tx_inflight),
        LT_SOCKQ_BITS=table_bits(sizes.rx_inflight),
        LT_SOCK_BITS=table_bits(sizes.send_inflight),
        LT_RINGBUF_PAGES=sizes.ringbuf_pages,
        LT_NB=histogram.N_BUCKETS,
        LT_INDEX_MIN=histogram.INDEX_MIN,
        LT_OCTAVE_BASE=histogram.OCTAVE_BASE,
        LT_TBL_BITS=sizes.lookup_bits,
        LT_TBL_SIZE=1 << sizes.lookup_bits,
        LT_TBL_PROBES=lookup.PROBES,
        LT_SLOT_HOST=HOST_SLOT,
        LT_TAIL_SLOTS=len(TAIL_CALLS),
        LT_TYPED=int(typed),
        # The host's namespace (the agent's own: hostNetwork in a cluster), where a packet's address
        # decides whether it is on its way into a traced pod.
        LT_HOST_NETNS=os.stat("/proc/self/ns/net").st_ino,
    )
    m.update({f"LT_TAIL_{t.macro}": t.index for t in TAIL_CALLS})
    m.update({f"LT_HOSTDEV_{k}": i for i, k in enumerate(HOSTDEV_KINDS)})
    m["LT_HOSTDEV_KINDS"] = len(HOSTDEV_KINDS)
    for j, t in enumerate(histogram.MANTISSA_THRESHOLDS):
        m[f"LT_M{j}"] = f"{t}ULL"
    if kfree_skb_reason_arg is not None:
        m["LT_KFREE_REASON_ARG"] = kfree_skb_reason_arg
        if not_specified_reason is not None:
            m["LT_REASON_NOT_SPECIFIED"] = not_specified_reason
    # Unknown architecture: -1 matches no syscall, so the send-start probe stays inert.
    m.update({f"LT_NR_{k}": v for k, v in (send_syscalls() or dict.fromkeys(
        ("WRITE", "WRITEV", "SENDTO", "SENDMSG", "SENDMMSG"), -1)).items()})
    return m


def cflags(macro_values: dict[str, int | str]) -> list[str]:
    include = str(bpf_dir())
    return [f"-I{include}"] + [f"-D{k}={v}" for k, v in sorted(macro_values.items())]
