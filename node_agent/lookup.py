"""The probes' target lookup tables: namespace inode -> slot and pod IP -> slot.

Every packet on the node is looked up here, traced or not, so these are BPF *arrays* laid out as
open-addressing hash tables rather than BPF hash maps: the verifier inlines array lookups, which saves
a helper call (30-40 ns each on the machines we measured) per lookup on every packet. The layout is
decided here and written whole at every change (one batched update); bpf/latencytrace.h probes it
with the same hash function and probe count (LT_TBL_*).
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
from dataclasses import dataclass

TABLE_BITS = 10
TABLE_SIZE = 1 << TABLE_BITS
PROBES = 4  # positions tried from the hashed one; the table refuses keys it cannot place within them
_GOLDEN = 2654435769  # 2**32 / phi: Knuth's multiplicative hash


class TableFull(RuntimeError):
    pass


def hash32(x: int) -> int:
    """Same as lt_hash32() in bpf/latencytrace.h."""
    return ((x * _GOLDEN) & 0xFFFFFFFF) >> (32 - TABLE_BITS)


def ip_words(ip: str) -> tuple[int, ...]:
    """An address as the u32 words the kernel reads from the packet (network order, read little-endian)."""
    packed = ipaddress.ip_address(ip).packed
    return tuple(int.from_bytes(packed[i:i + 4], "little") for i in range(0, len(packed), 4))


def key_hash(words: tuple[int, ...]) -> int:
    x = 0
    for w in words:
        x ^= w
    return hash32(x)


def layout(entries: dict[tuple[int, ...], int]) -> dict[int, tuple[tuple[int, ...], int]]:
    """Position -> (key words, slot) for every entry, by linear probing."""
    placed: dict[int, tuple[tuple[int, ...], int]] = {}
    for words, slot in sorted(entries.items()):
        start = key_hash(words)
        for p in range(PROBES):
            pos = (start + p) % TABLE_SIZE
            if pos not in placed:
                placed[pos] = (words, slot)
                break
        else:
            raise TableFull(f"no free position for a target key within {PROBES} probes of the lookup table")
    return placed


@dataclass
class LookupTable:
    """One BPF array in the layout above; `write()` replaces its whole content."""

    table: object  # the BCC table
    width: int  # key words: 1 (inode, IPv4) or 4 (IPv6)

    def write(self, entries: dict[tuple[int, ...], int]) -> None:
        placed = layout(entries)
        keys = (ct.c_int * TABLE_SIZE)(*range(TABLE_SIZE))
        values = (self.table.Leaf * TABLE_SIZE)()
        for pos, (words, slot) in placed.items():
            v = values[pos]
            if self.width == 1:
                v.key = words[0]
            else:
                for i, w in enumerate(words):
                    v.key[i] = w
            v.slot = slot
        self.table.items_update_batch(keys, values)
