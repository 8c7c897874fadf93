"""Readers of the kernel's result maps: histograms, drops and counters, as per-interval deltas.

Each collector reads its map in batches (one bpf(2) call per chunk, not per key and CPU), sums the
per-CPU values and keeps the previous cumulative reading per slot, so that what it returns is what
happened since the last call. A slot reused by a new target starts from a fresh baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import histogram, segments
from .kernel import bpfsys, libbpf
from .tracer import Tracer

_STAT_FIELDS = 4  # struct lt_seg_stat: count, sum_ns, max_ns, zero, then u32 hist[N_BUCKETS]


@dataclass(frozen=True)
class SlotEpoch:
    slot: int
    epoch: int  # Target.added_ns: identifies one occupant of the slot


class SlotCollector:
    """What one slot map holds for each slot occupant, as the change since the last call: the occupant's
    first reading is its baseline, and occupants no longer asked for are forgotten. Subclasses say how
    a slot is read and how two readings are subtracted."""

    def __init__(self, tracer: Tracer):
        self.tracer = tracer
        self.ncpu = bpfsys.possible_cpus()
        self._lib = libbpf.BATCH
        self._prev: dict[SlotEpoch, object] = {}

    def _read_slot(self, slot: int):
        raise NotImplementedError

    def _subtract(self, current, prev):
        """current - prev; prev is None for an occupant without a baseline."""
        raise NotImplementedError

    def baseline(self, key: SlotEpoch) -> None:
        """Start counting this slot's occupant from now (what an earlier occupant left is not its)."""
        self._prev[key] = self._read_slot(key.slot)

    def deltas(self, keys: list[SlotEpoch]) -> dict:
        out = {}
        for key in keys:
            current = self._read_slot(key.slot)
            out[key] = self._subtract(current, self._prev.get(key))
            self._prev[key] = current
        for stale in set(self._prev) - set(keys):
            del self._prev[stale]
        return out


class HistogramCollector(SlotCollector):
    """Per segment: count, sum, maximum and histogram buckets (lt_stat)."""

    def _read_slot(self, slot: int) -> dict[int, histogram.SegmentHistogram]:
        nseg, nb = segments.N_SEGMENTS, histogram.N_BUCKETS
        stat_fd = self.tracer.table("lt_stat").map_fd
        stats = bpfsys.read_percpu_array(self._lib, stat_fd, slot * nseg, nseg, 8 * _STAT_FIELDS + 4 * nb, self.ncpu)
        # The u32 buckets after the four u64 figures, summed over CPUs.
        buckets = np.ascontiguousarray(stats[:, :, _STAT_FIELDS:]).view(np.uint32).sum(axis=1, dtype=np.uint64)
        out = {}
        for seg in range(nseg):
            s = stats[seg]
            out[seg] = histogram.SegmentHistogram(
                count=int(s[:, 0].sum()), sum_ns=int(s[:, 1].sum()), max_ns=int(s[:, 2].max()),
                zero_count=int(s[:, 3].sum()), buckets=buckets[seg].astype(np.uint64))
        return out

    def _subtract(self, current, prev):
        return {seg: histogram.delta(h, prev.get(seg) if prev else None) for seg, h in current.items()}


class PacketCollector(SlotCollector):
    """Packets per slot and direction counted at their first boundary (lt_packets), as (receive,
    transmit): every packet of a traced pod, timed or not (with timing 1 in N, the histograms hold the
    timed ones)."""

    def _read_slot(self, slot: int) -> tuple[int, int]:
        fd = self.tracer.table("lt_packets").map_fd
        v = bpfsys.read_percpu_array(self._lib, fd, slot * 2, 2, 8, self.ncpu)
        return int(v[0, :, 0].sum()), int(v[1, :, 0].sum())

    def _subtract(self, current, prev):
        prev = prev or (0, 0)
        return (current[0] - prev[0], current[1] - prev[1])


class DropCollector:
    """Drop counts per (slot, direction, reason) since the last call."""

    def __init__(self, tracer: Tracer):
        self.tracer = tracer
        self._prev: dict[tuple[int, int, int], int] = {}

    def deltas(self) -> dict[tuple[int, int, int], int]:
        table = self.tracer.table("lt_drops")
        current = {}
        for k, per_cpu in table.items():
            current[(k.slot, k.dir, k.reason)] = sum(int(v) for v in per_cpu)
        out = {}
        for key, n in current.items():
            d = n - self._prev.get(key, 0)
            if d:
                out[key] = d
        self._prev = current
        return out

    def forget_slot(self, slot: int) -> None:
        """Remove a freed slot's drop counters so that its next occupant starts at zero."""
        table = self.tracer.table("lt_drops")
        for k in [k for k in table.keys() if k.slot == slot]:
            del table[k]
        self._prev = {k: v for k, v in self._prev.items() if k[0] != slot}


@dataclass(frozen=True)
class Counter:
    index: int  # position in the kernel's lt_counters array (LT_C_<MACRO>)
    name: str   # as reported (JSON, OTLP)
    macro: str
    doc: str


# The one table of the kernel's own counters: bpf/*.c counts with the LT_C_* macros generated from it
# (bpf_macros()), user space reads them by these names; a test keeps both in step.
COUNTERS: tuple[Counter, ...] = (
    Counter(0, "events_lost", "EVENTS_LOST", "Events not sent: the ring buffer was full."),
    Counter(1, "rate_limited", "RATE_LIMITED", "Slow packets over their target's event rate (no event sent)."),
    Counter(2, "stale_flights", "STALE", "In-flight entries of freed skbs whose address carried a new packet."),
    Counter(3, "clamped", "CLAMPED", "Latencies above the histogram range (recorded in its top bucket)."),
    Counter(4, "negative", "NEGATIVE", "Segments that ended before they started (counted, not recorded)."),
    Counter(5, "collisions", "COLLISION",
            "Packets in flight whose entry another packet took (in-flight arrays, socket rings), or left unread "
            "in a closed socket's ring: the rest of their journey is not measured; never misattributed."),
    Counter(6, "coalesced", "COALESCED",
            "TCP packets merged into the socket queue's tail skb (not a loss: each is measured to the read "
            "of its data, like any other)."),
    Counter(7, "early_reads", "EARLY_READ",
            "UDP datagrams read before the probe on their socket's sk_data_ready had put them in the socket's "
            "ring (the reader ran ahead on another CPU): their read is taken as the probe's moment, a "
            "socket-queue time of 0."),
    Counter(8, "quiet_misses", "QUIET_MISS",
            "Packets into a traced pod, chosen for timing, that a NET_RX run raised by an untraced pod's "
            "send carried, the send addressed elsewhere (to a Service's virtual IP the node DNATs to the "
            "pod): that run read no clock, so they are counted but not timed, and the sender is timed from "
            "then on."),
    Counter(9, "out_of_order", "OUT_OF_ORDER",
            "TCP segments queued out of order, behind a lost or reordered one: each is measured from where TCP "
            "queued it to the read of its data, so its socket-queue time includes the wait for the data before "
            "it (head-of-line blocking)."),
    Counter(10, "read_continuations", "READ_CONTINUED",
            "Further runs of the TCP read probe: a read that passed more than 16 packets' data at once (a splice, "
            "or one skb TCP merged many small packets into) records them 16 a run, up to 33 runs (the rest at the "
            "socket's next read)."),
    Counter(11, "reassembled_on_host", "HOST_REASM",
            "Fragments into a traced pod whose skb the host's reassembly freed (a node's conntrack, as "
            "kube-proxy's, reassembles the traffic it tracks, bridged traffic too, and sends it on fragmented "
            "again): a datagram's first fragment, whose data goes on in another skb. Not a loss: measured to "
            "the host, and no further."),
    Counter(12, "chained_on_host", "HOST_CHAIN",
            "Packets a traced pod sent that the host's GRO chained behind another one's skb (fraglist GRO: "
            "rx-udp-gro-forwarding on the pod's host-side veth) and freed once their data had gone on with it "
            "(with no drop reason), or that the host received unseen and freed. Not a loss: measured as far as "
            "the pod's device, and no further."),
    Counter(13, "gro_merged", "GRO_MERGED",
            "UDP datagrams into a traced pod that the host's GRO merged into another one's skb (rx-udp-gro-"
            "forwarding or rx-gro-list on the device they came in on): counted each, and measured each to its "
            "own read, with the merged skb's times up to the pod, when the pod's UDP splits the skb up again "
            "(a socket without UDP_GRO); a socket with UDP_GRO reads the skb whole, one journey.")
)
N_COUNTER_SLOTS = 16  # size of lt_counters
COUNTER_NAMES = tuple(c.name for c in COUNTERS)


def bpf_macros() -> dict[str, int]:
    """LT_C_* (counter positions) and LT_NCOUNTERS for bpf/*.c."""
    assert len(COUNTERS) <= N_COUNTER_SLOTS and [c.index for c in COUNTERS] == list(range(len(COUNTERS)))
    return {f"LT_C_{c.macro}": c.index for c in COUNTERS} | {"LT_NCOUNTERS": N_COUNTER_SLOTS}


class CounterCollector:
    """The agent's own health counters from the kernel (cumulative)."""

    def __init__(self, tracer: Tracer):
        self.tracer = tracer

    def read(self) -> dict[str, int]:
        table = self.tracer.table("lt_counters")
        out = {}
        for i, name in enumerate(COUNTER_NAMES):
            out[name] = sum(int(v) for v in table[table.Key(i)])
        return out
