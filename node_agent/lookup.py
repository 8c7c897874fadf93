"""The probes' target lookup tables: namespace inode -> slot and pod IP -> slot.

Every packet on the node is looked up here, traced or not, so these are BPF *arrays* laid out as
open-addressing hash tables rather than BPF hash maps: the verifier inlines array lookups, which saves
a helper call (30-40 ns each on the machines we measured) per lookup on every packet. The layout is
decided here and written whole at every change (one batched update); bpf/latencytrace.h probes it
with the same hash function and probe count (LT_TBL_*). The size is the program's (Sizes.lookup_bits).

A key that cannot be placed within PROBES positions of its hash does not fit: `fitting` keeps the
targets that fit, oldest first, and names the others, so that one crowded table fails only the targets
that do not fit, never the others.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

TABLE_BITS = 10
TABLE_SIZE = 1 << TABLE_BITS
PROBES = 4  # positions tried from the hashed one; the table refuses keys it cannot place within them
_GOLDEN = 2654435769  # 2**32 / phi: Knuth's multiplicative hash


class TableFull(RuntimeError):
    pass


def hash32(x: int, bits: int = TABLE_BITS) -> int:
    """Same as lt_hash32() in bpf/latencytrace.h."""
    return ((x * _GOLDEN) & 0xFFFFFFFF) >> (32 - bits)


def ip_words(ip: str) -> tuple[int, ...]:
    """An address as the u32 words the kernel reads from the packet (network order, read little-endian)."""
    packed = ipaddress.ip_address(ip).packed
    return tuple(int.from_bytes(packed[i:i + 4], "little") for i in range(0, len(packed), 4))


def key_hash(words: tuple[int, ...], bits: int = TABLE_BITS) -> int:
    x = 0
    for w in words:
        x ^= w
    return hash32(x, bits)


def layout(entries: dict[tuple[int, ...], int], bits: int = TABLE_BITS) -> dict[int, tuple[tuple[int, ...], int]]:
    """Position -> (key words, slot) for every entry, by linear probing."""
    placed: dict[int, tuple[tuple[int, ...], int]] = {}
    for words, slot in sorted(entries.items()):
        start = key_hash(words, bits)
        for p in range(PROBES):
            pos = (start + p) % (1 << bits)
            if pos not in placed:
                placed[pos] = (words, slot)
                break
        else:
            raise TableFull(f"no free position for a target key within {PROBES} probes of the lookup table")
    return placed


Targets = Mapping[int, tuple[int, tuple[str, ...]]]  # netns inode -> (slot, pod IPs)


def tables(targets: Targets) -> tuple[dict, dict, dict]:
    """The entries of the three tables (netns inode, IPv4, IPv6 key words -> slot)."""
    netns, ip4, ip6 = {}, {}, {}
    for inode, (slot, ips) in targets.items():
        netns[(inode,)] = slot
        for ip in ips:
            words = ip_words(ip)
            (ip4 if len(words) == 1 else ip6)[words] = slot
    return netns, ip4, ip6


def fits(targets: Targets, bits: int = TABLE_BITS) -> bool:
    try:
        for entries in tables(targets):
            layout(entries, bits)
    except TableFull:
        return False
    return True


def fitting(targets: Targets, bits: int = TABLE_BITS) -> tuple[dict, list[int]]:
    """(the targets that fit the tables, the inodes of those that do not). `targets` in priority order
    (oldest first): each is kept if it fits with the ones kept before it."""
    if fits(targets, bits):
        return dict(targets), []
    kept: dict = {}
    refused = []
    for inode, value in targets.items():
        if fits({**kept, inode: value}, bits):
            kept[inode] = value
        else:
            refused.append(inode)
    return kept, refused


@dataclass
class LookupTable:
    """One BPF array in the layout above; `write()` replaces its whole content."""

    table: object  # the BCC table
    width: int  # key words: 1 (inode, IPv4) or 4 (IPv6)
    bits: int = TABLE_BITS

    def write(self, entries: dict[tuple[int, ...], int]) -> None:
        placed = layout(entries, self.bits)
        size = 1 << self.bits
        keys = (ct.c_int * size)(*range(size))
        values = (self.table.Leaf * size)()
        for pos, (words, slot) in placed.items():
            v = values[pos]
            if self.width == 1:
                v.key = words[0]
            else:
                for i, w in enumerate(words):
                    v.key[i] = w
            v.slot = slot
        self.table.items_update_batch(keys, values)
