"""Kernel type information from the running kernel's BTF: struct member offsets, enums, tracepoint prototypes.

The probes read kernel structs (skb->dev, dev->nd_net, ...) with bpf_probe_read_kernel at offsets that
come from here, passed to the compiler as -D macros. Kernel header layouts are never trusted: the headers
BCC compiles against may be of another kernel.

We read BTF through `bpftool btf dump -j` rather than parsing the binary format ourselves: bpftool is
the kernel's own, maintained decoder and ships beside BCC on every distribution.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")
_QUALIFIERS = {"TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"}


class BTFError(RuntimeError):
    pass


@dataclass(frozen=True)
class Member:
    offset_bytes: int
    type_id: int


class KernelBTF:
    def __init__(self, types: list[dict]):
        self._by_id: dict[int, dict] = {t["id"]: t for t in types}
        self._by_name: dict[tuple[str, str], dict] = {}
        for t in types:
            key = (t["kind"], t.get("name", "(anon)"))
            # First definition wins; later ones with the same name are duplicates from modules.
            self._by_name.setdefault(key, t)

    @classmethod
    def load(cls, path: str | Path = VMLINUX) -> KernelBTF:
        path = Path(path)
        if not path.exists():
            raise BTFError(f"{path} does not exist: this kernel has no BTF (CONFIG_DEBUG_INFO_BTF); latencytrace "
                           "needs it to find kernel struct offsets (give a BTF file for this kernel with --btf)")
        bpftool = shutil.which("bpftool") or next(
            (p for p in ("/usr/sbin/bpftool", "/sbin/bpftool") if Path(p).exists()), None)
        if bpftool is None:
            raise BTFError("bpftool not found: install it (Debian/Ubuntu: apt install bpftool)")
        out = subprocess.run([bpftool, "btf", "dump", "file", str(path), "-j"],
                             capture_output=True, check=False)
        if out.returncode != 0:
            raise BTFError(f"bpftool could not read {path}: {out.stderr.decode(errors='replace').strip()}")
        return cls(json.loads(out.stdout)["types"])

    def _resolve(self, type_id: int) -> dict:
        t = self._by_id[type_id]
        while t["kind"] in _QUALIFIERS:
            t = self._by_id[t["type_id"]]
        return t

    def struct(self, name: str) -> dict:
        for kind in ("STRUCT", "UNION", "TYPEDEF"):
            t = self._by_name.get((kind, name))
            if t is not None:
                t = self._resolve(t["id"])
                if t["kind"] in ("STRUCT", "UNION"):
                    return t
        raise BTFError(f"struct {name} is not in this kernel's BTF")

    def _find_member(self, t: dict, name: str) -> Member | None:
        """Find `name` in struct/union `t`, descending into anonymous members as C does."""
        for m in t.get("members", []):
            if m["name"] == name:
                return Member(m["bits_offset"] // 8, m["type_id"])
        for m in t.get("members", []):
            if m["name"] == "(anon)":
                inner = self._resolve(m["type_id"])
                if inner["kind"] in ("STRUCT", "UNION"):
                    found = self._find_member(inner, name)
                    if found is not None:
                        return Member(m["bits_offset"] // 8 + found.offset_bytes, found.type_id)
        return None

    def offset(self, struct: str, path: str) -> int:
        """Byte offset of `path` (dotted, e.g. "ns.inum") inside `struct`, through embedded structs."""
        t = self.struct(struct)
        total = 0
        for part in path.split("."):
            m = self._find_member(t, part)
            if m is None:
                raise BTFError(f"struct {t.get('name', struct)} has no member {part!r} (looking up {struct}.{path})")
            total += m.offset_bytes
            t = self._resolve(m.type_id)
        return total

    def has_member(self, struct: str, path: str) -> bool:
        try:
            self.offset(struct, path)
            return True
        except BTFError:
            return False

    def enum(self, name: str) -> dict[int, str]:
        t = self._by_name.get(("ENUM", name)) or self._by_name.get(("ENUM64", name))
        if t is None:
            raise BTFError(f"enum {name} is not in this kernel's BTF")
        return {v["val"]: v["name"] for v in t["values"]}

    def tracepoint_args(self, name: str) -> list[str] | None:
        """Parameter type names of raw tracepoint `name` (from its btf_trace_<name> typedef), or None.

        The first parameter of the prototype is the tracepoint's private data pointer; it is dropped
        so that index i here is ctx->args[i] in a raw tracepoint program.
        """
        t = self._by_name.get(("TYPEDEF", f"btf_trace_{name}"))
        if t is None:
            return None
        proto = self._by_id[t["type_id"]]
        if proto["kind"] == "PTR":
            proto = self._by_id[proto["type_id"]]
        if proto["kind"] != "FUNC_PROTO":
            return None
        return [self._type_name(p["type_id"]) for p in proto["params"][1:]]

    def _type_name(self, type_id: int) -> str:
        t = self._by_id.get(type_id)
        if t is None:
            return "void"
        if t["kind"] == "PTR":
            return self._type_name(t["type_id"]) + " *"
        if t["kind"] in _QUALIFIERS and t.get("name", "(anon)") == "(anon)":
            return self._type_name(t["type_id"])
        return t.get("name", "(anon)")

    @cached_property
    def drop_reasons(self) -> dict[int, str]:
        """skb drop reason codes -> short names (SKB_DROP_REASON_NO_SOCKET -> NO_SOCKET)."""
        try:
            raw = self.enum("skb_drop_reason")
        except BTFError:
            return {}
        return {v: n.removeprefix("SKB_DROP_REASON_") for v, n in raw.items()}
