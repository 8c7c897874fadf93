"""What the kernel holds, read by the tests on their own: the result maps key by key, and the programs
and links `bpftool` lists.

The agent's collectors read the same maps in batches (node_agent/collectors.py); these readers take
another path on purpose (one lookup per key and CPU, and bpftool's view of programs and links), so
that a test compares the kernel with the agent instead of the agent with itself.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from latencytrace.node_agent import histogram, program, segments
from latencytrace.node_agent.collectors import COUNTER_NAMES

__test__ = False


@dataclass(frozen=True)
class SegStat:
    """One (slot, segment) of lt_stat, summed over CPUs."""

    count: int
    sum_ns: int
    zero: int
    buckets: tuple[int, ...]  # lt_stat's hist, positions 0..N_BUCKETS-1

    def __sub__(self, other: SegStat) -> SegStat:
        return SegStat(self.count - other.count, self.sum_ns - other.sum_ns, self.zero - other.zero,
                       tuple(a - b for a, b in zip(self.buckets, other.buckets, strict=True)))

    def bucket_bounds_ns(self) -> tuple[float, float]:
        """(lowest, highest) sum the bucket counts allow: each value lies in (lower, upper] of its bucket."""
        lo = hi = 0.0
        for pos, n in enumerate(self.buckets):
            if n:
                b_lo, b_hi = histogram.bucket_bounds_s(pos + histogram.INDEX_MIN)
                lo += n * b_lo * 1e9
                hi += n * b_hi * 1e9
        return lo, hi


def flights(tracer, sizes, direction: segments.Direction) -> list:
    """One direction's entries of lt_flights, read key by key: the receive ones first (2**LT_RX_BITS of
    them), the transmit ones after them (2**LT_TX_BITS)."""
    t = tracer.table("lt_flights")
    rx = 1 << program.table_bits(sizes.rx_inflight)
    first, n = (0, rx) if direction is segments.Direction.RX else (rx, 1 << program.table_bits(sizes.tx_inflight))
    return [t[t.Key(first + i)] for i in range(n)]


def slot_stats(tracer, slot: int, buckets: bool = True) -> dict[str, SegStat]:
    """Segment name -> what lt_stat (figures and histogram) holds for `slot` now."""
    stat = tracer.table("lt_stat")
    out = {}
    for seg in segments.SEGMENTS:
        sidx = slot * segments.N_SEGMENTS + seg.id
        per_cpu = stat[stat.Key(sidx)]
        counts: tuple[int, ...] = ()
        if buckets:
            counts = tuple(sum(int(v.hist[pos]) for v in per_cpu) for pos in range(histogram.N_BUCKETS))
        out[seg.name] = SegStat(count=sum(v.count for v in per_cpu), sum_ns=sum(v.sum_ns for v in per_cpu),
                                zero=sum(v.zero for v in per_cpu), buckets=counts)
    return out


def slot_counts(tracer, max_targets: int) -> dict[int, int]:
    """Slot -> the number of latencies recorded in it over all segments (lt_stat counts only)."""
    stat = tracer.table("lt_stat")
    return {slot: sum(v.count for seg in range(segments.N_SEGMENTS)
                      for v in stat[stat.Key(slot * segments.N_SEGMENTS + seg)])
            for slot in range(max_targets)}


def counters(tracer) -> dict[str, int]:
    """lt_counters by name, summed over CPUs."""
    table = tracer.table("lt_counters")
    return {name: sum(int(v) for v in table[table.Key(i)]) for i, name in enumerate(COUNTER_NAMES)}


def bpftool(*args: str):
    out = subprocess.run([shutil.which("bpftool") or "/usr/sbin/bpftool", *args, "-j"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout or "[]")


def held_ids(pid: int | str, kind: str) -> set[int]:
    """IDs of the BPF objects of `kind` ("prog", "map") a process holds open, from its fdinfo: other
    processes' objects (other agents, other tests on this machine) never count."""
    ids = set()
    for info in Path(f"/proc/{pid}/fdinfo").glob("*"):
        try:
            m = re.search(rf"^{kind}_id:\s+(\d+)", info.read_text(), re.M)
        except OSError:
            continue
        if m:
            ids.add(int(m.group(1)))
    return ids


def prog_ids_of(pid: int | str = "self") -> set[int]:
    """IDs of the BPF programs a process holds open."""
    return held_ids(pid, "prog")


@dataclass(frozen=True)
class Prog:
    id: int
    name: str  # the function's name (both loaders give the kernel its BTF; prog@tracepoint variants share it)
    run_cnt: int


def programs(ids: set[int]) -> dict[int, Prog]:
    """bpftool's view of the programs with these ids (run_cnt: 0 while statistics are off)."""
    return {p["id"]: Prog(p["id"], p.get("name", ""), p.get("run_cnt", 0))
            for p in bpftool("prog", "show") if p["id"] in ids}


def attached_tracepoints(ids: set[int]) -> dict[str, int]:
    """Raw tracepoint name -> program id, for every raw tracepoint link of one of these programs."""
    return {link["tp_name"]: link["prog_id"] for link in bpftool("link", "show")
            if link.get("prog_id") in ids and link.get("type") == "raw_tracepoint"}


def our_programs(tracer) -> dict[str, int]:
    """Program function name -> id, for the programs this tracer loaded (each fd it holds)."""
    ids = prog_ids_of()
    out = {}
    for name, fd in tracer.program_fds().items():
        m = re.search(r"^prog_id:\s+(\d+)", Path(f"/proc/self/fdinfo/{fd}").read_text(), re.M)
        pid = int(m.group(1))
        assert pid in ids
        out[name] = pid
    return out



def maps_of(pid: int | str) -> dict[str, dict]:
    """The BPF maps a process holds, by the name the kernel knows (bpftool's record: id, type,
    max_entries, ...)."""
    ids = held_ids(pid, "map")
    return {m.get("name", ""): m for m in bpftool("map", "show") if m["id"] in ids}


def _raw(field) -> bytes:
    return bytes(int(b, 16) for b in field)


def map_dump(map_id: int) -> list[tuple[bytes, bytes]]:
    """(key, value) raw bytes of every entry bpftool finds in the map (per-CPU maps: CPU 0's value)."""
    out = []
    for entry in bpftool("map", "dump", "id", str(map_id)):
        value = entry["value"] if "value" in entry else entry["values"][0]["value"]
        out.append((_raw(entry["key"]), _raw(value)))
    return out


def lookup_slots(map_id: int) -> dict[int, int]:
    """An lt_netns or lt_ip4 lookup table (struct lt_ent1 {u32 key; s32 slot}) as the probes see it:
    key -> slot for each occupied position (key 0 marks an empty one)."""
    out = {}
    for _, value in map_dump(map_id):
        key, slot = int.from_bytes(value[0:4], "little"), int.from_bytes(value[4:8], "little", signed=True)
        if key:
            out[key] = slot
    return out


def used_target_slots(map_id: int) -> set[int]:
    """The lt_targets slots in use (struct lt_target: dir_mask, at byte 16, is 0 in an unused slot)."""
    return {int.from_bytes(k[:4], "little") for k, v in map_dump(map_id) if int.from_bytes(v[16:20], "little")}


def ip4_key(ip: str) -> int:
    """An IPv4 address as the key lt_ip4 holds (the packet's bytes read as a little-endian u32)."""
    return int.from_bytes(ipaddress.ip_address(ip).packed, "little")
