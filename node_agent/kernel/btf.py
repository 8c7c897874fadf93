"""Kernel type information from the running kernel's BTF: struct member offsets, enums, tracepoint prototypes.

The probes read kernel structs (skb->dev, dev->nd_net, ...) at offsets that come from here, passed to the
compiler as -D macros (as plain loads in typed tracepoint programs, with bpf_probe_read_kernel in raw
ones). Kernel header layouts are never trusted: the headers
BCC compiles against may be of another kernel.

Why a reader of our own rather than `bpftool btf dump -j` (which we used first): decoding all of
vmlinux's ~130k types into Python objects costs ~130 MB of memory, most of the agent's budget, to answer
a few dozen questions. The BTF format is a stable kernel ABI (Documentation/bpf/btf.rst); this reader
indexes where each type record starts and decodes only the records it is asked about (~10 MB).
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")

MAGIC = 0xEB9F
# Kinds (include/uapi/linux/btf.h)
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
_QUALIFIERS = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG}
_INDEXED = {STRUCT, UNION, ENUM, ENUM64, TYPEDEF}  # kinds looked up by name


class BTFError(RuntimeError):
    pass


@dataclass(frozen=True)
class Member:
    offset_bytes: int
    type_id: int


def _tail_size(kind: int, vlen: int) -> int:
    """Bytes that follow the 12-byte common header of a type record."""
    if kind in (INT, VAR, DECL_TAG):
        return 4
    if kind == ARRAY:
        return 12
    if kind in (STRUCT, UNION, DATASEC, ENUM64):
        return 12 * vlen
    if kind in (ENUM, FUNC_PROTO):
        return 8 * vlen
    return 0


class KernelBTF:
    def __init__(self, data: bytes):
        if len(data) < 24:
            raise BTFError("BTF data too short")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != MAGIC:
            raise BTFError("not BTF data (bad magic)")
        type_off, type_len, str_off, _str_len = struct.unpack_from("<IIII", data, 8)
        self._data = data
        self._types = hdr_len + type_off
        self._strings = hdr_len + str_off
        self._offsets = array("I", [0])  # type id -> record position; id 0 is void
        self._by_name: dict[tuple[int, str], int] = {}
        pos, end = self._types, self._types + type_len
        while pos < end:
            name_off, info = struct.unpack_from("<II", data, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            self._offsets.append(pos)
            if kind in _INDEXED and name_off:
                # First definition wins; later ones with the same name come from modules.
                self._by_name.setdefault((kind, self._str(name_off)), len(self._offsets) - 1)
            pos += 12 + _tail_size(kind, vlen)

    @classmethod
    def load(cls, path: str | Path = VMLINUX) -> KernelBTF:
        path = Path(path)
        if not path.exists():
            raise BTFError(f"{path} does not exist: this kernel has no BTF (CONFIG_DEBUG_INFO_BTF); latencytrace "
                           "needs it to find kernel struct offsets (give a BTF file for this kernel with --btf)")
        try:
            return cls(path.read_bytes())
        except OSError as e:
            raise BTFError(f"cannot read {path}: {e.strerror}") from None

    # -- records -----------------------------------------------------------------------------------
    def _str(self, off: int) -> str:
        start = self._strings + off
        return self._data[start:self._data.index(b"\0", start)].decode()

    def _header(self, type_id: int) -> tuple[int, int, int, int, int]:
        """(kind, vlen, kind_flag, name_off, size_or_type) of a type."""
        pos = self._offsets[type_id]
        name_off, info, size_or_type = struct.unpack_from("<III", self._data, pos)
        return (info >> 24) & 0x1F, info & 0xFFFF, info >> 31, name_off, size_or_type

    def _kind(self, type_id: int) -> int:
        return self._header(type_id)[0] if type_id else 0

    def _resolve(self, type_id: int) -> int:
        """Strip typedefs and qualifiers."""
        while type_id and self._kind(type_id) in _QUALIFIERS:
            type_id = self._header(type_id)[4]
        return type_id

    def _members(self, type_id: int) -> list[tuple[str, int, int]]:
        """(name, type id, bit offset) of a struct or union's members."""
        kind, vlen, kflag, _, _ = self._header(type_id)
        pos = self._offsets[type_id] + 12
        out = []
        for i in range(vlen):
            name_off, mtype, offset = struct.unpack_from("<III", self._data, pos + 12 * i)
            out.append((self._str(name_off) if name_off else "", mtype, offset & 0xFFFFFF if kflag else offset))
        return out

    # -- questions ---------------------------------------------------------------------------------
    def _struct_id(self, name: str) -> int:
        for kind in (STRUCT, UNION, TYPEDEF):
            type_id = self._by_name.get((kind, name))
            if type_id is not None:
                type_id = self._resolve(type_id)
                if self._kind(type_id) in (STRUCT, UNION):
                    return type_id
        raise BTFError(f"struct {name} is not in this kernel's BTF")

    def struct_size(self, name: str) -> int:
        return self._header(self._struct_id(name))[4]

    def _find_member(self, type_id: int, name: str) -> Member | None:
        """Find `name` in a struct/union, descending into anonymous members as C does."""
        members = self._members(type_id)
        for mname, mtype, bits in members:
            if mname == name:
                return Member(bits // 8, mtype)
        for mname, mtype, bits in members:
            if not mname:
                inner = self._resolve(mtype)
                if self._kind(inner) in (STRUCT, UNION):
                    found = self._find_member(inner, name)
                    if found is not None:
                        return Member(bits // 8 + found.offset_bytes, found.type_id)
        return None

    def offset(self, struct_name: str, path: str) -> int:
        """Byte offset of `path` (dotted, e.g. "ns.inum") inside `struct_name`, through embedded structs."""
        type_id = self._struct_id(struct_name)
        total = 0
        for part in path.split("."):
            if self._kind(type_id) not in (STRUCT, UNION):
                raise BTFError(f"{struct_name}.{path}: {part!r} is not inside a struct")
            m = self._find_member(type_id, part)
            if m is None:
                raise BTFError(f"struct {struct_name} has no member {part!r} (looking up {struct_name}.{path})")
            total += m.offset_bytes
            type_id = self._resolve(m.type_id)
        return total

    def enum(self, name: str) -> dict[int, str]:
        type_id = self._by_name.get((ENUM, name)) or self._by_name.get((ENUM64, name))
        if type_id is None:
            raise BTFError(f"enum {name} is not in this kernel's BTF")
        kind, vlen, kflag, _, _ = self._header(type_id)
        pos = self._offsets[type_id] + 12
        out = {}
        for i in range(vlen):
            if kind == ENUM:
                name_off, val = struct.unpack_from("<Ii" if kflag else "<II", self._data, pos + 8 * i)
            else:
                name_off, lo, hi = struct.unpack_from("<III", self._data, pos + 12 * i)
                val = lo | hi << 32
            out[val] = self._str(name_off)
        return out

    def tracepoint_type_id(self, name: str) -> int | None:
        """Type id of raw tracepoint `name`'s btf_trace_<name> typedef (what a typed tracepoint program
        attaches by), or None."""
        return self._by_name.get((TYPEDEF, f"btf_trace_{name}"))

    def tracepoint_args(self, name: str) -> list[str] | None:
        """Parameter type names of raw tracepoint `name` (from its btf_trace_<name> typedef), or None.

        The first parameter of the prototype is the tracepoint's private data pointer; it is dropped
        so that index i here is ctx->args[i] in a raw tracepoint program.
        """
        type_id = self._by_name.get((TYPEDEF, f"btf_trace_{name}"))
        if type_id is None:
            return None
        proto = self._header(type_id)[4]
        if self._kind(proto) == PTR:
            proto = self._header(proto)[4]
        if self._kind(proto) != FUNC_PROTO:
            return None
        _, vlen, _, _, _ = self._header(proto)
        pos = self._offsets[proto] + 12
        params = [struct.unpack_from("<II", self._data, pos + 8 * i)[1] for i in range(vlen)]
        return [self._type_name(p) for p in params[1:]]

    def _type_name(self, type_id: int) -> str:
        if not type_id:
            return "void"
        kind, _, _, name_off, ref = self._header(type_id)
        if kind == PTR:
            return self._type_name(ref) + " *"
        if kind in _QUALIFIERS and not name_off:
            return self._type_name(ref)
        return self._str(name_off) if name_off else "(anon)"

    @cached_property
    def drop_reasons(self) -> dict[int, str]:
        """skb drop reason codes -> short names (SKB_DROP_REASON_NO_SOCKET -> NO_SOCKET)."""
        try:
            raw = self.enum("skb_drop_reason")
        except BTFError:
            return {}
        return {v: n.removeprefix("SKB_DROP_REASON_") for v, n in raw.items()}
