"""Our BTF reader against bpftool's decoding of the same kernel: every offset the probes use, the
tracepoint prototypes the feature check relies on, and the drop reason names."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from latencytrace.node_agent.kernel import offsets
from latencytrace.node_agent.kernel.btf import VMLINUX, BTFError, KernelBTF
from latencytrace.node_agent.probes import PROBES


@pytest.fixture(scope="module")
def bpftool_types() -> dict:
    out = subprocess.run([shutil.which("bpftool") or "/usr/sbin/bpftool", "btf", "dump", "file", str(VMLINUX), "-j"],
                         capture_output=True, check=True)
    types = json.loads(out.stdout)["types"]
    return {"by_id": {t["id"]: t for t in types},
            "by_name": {(t["kind"], t.get("name")): t for t in reversed(types)}}


def _bpftool_offset(bt: dict, struct: str, path: str) -> int:
    def resolve(t):
        while t["kind"] in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
            t = bt["by_id"][t["type_id"]]
        return t

    def find(t, name):
        for m in t["members"]:
            if m["name"] == name:
                return m["bits_offset"] // 8, bt["by_id"][m["type_id"]]
        for m in t["members"]:
            inner = resolve(bt["by_id"][m["type_id"]])
            if m["name"] == "(anon)" and inner["kind"] in ("STRUCT", "UNION"):
                found = find(inner, name)
                if found:
                    return m["bits_offset"] // 8 + found[0], found[1]
        return None

    t = resolve(bt["by_name"].get(("STRUCT", struct)) or bt["by_name"][("TYPEDEF", struct)])
    total = 0
    for part in path.split("."):
        off, mt = find(t, part)
        total += off
        t = resolve(mt)
    return total


def test_offsets_equal_bpftool(bpftool_types):
    btf = KernelBTF.load()
    for macro, (struct, path) in offsets.MEMBERS.items():
        assert btf.offset(struct, path) == _bpftool_offset(bpftool_types, struct, path), macro


def test_tracepoint_prototypes_and_drop_reasons(bpftool_types):
    btf = KernelBTF.load()
    for p in PROBES:
        proto = bpftool_types["by_id"][bpftool_types["by_name"][("TYPEDEF", f"btf_trace_{p.name}")]["type_id"]]
        proto = bpftool_types["by_id"][proto["type_id"]]
        assert len(btf.tracepoint_args(p.name)) == len(proto["params"]) - 1, p.name
    enum = bpftool_types["by_name"][("ENUM", "skb_drop_reason")]
    # (bpftool sign-extends 32-bit enum values; the enum is unsigned: compare them as u32)
    assert btf.drop_reasons == {v["val"] & 0xFFFFFFFF: v["name"].removeprefix("SKB_DROP_REASON_") for v in enum["values"]}


def test_unknown_names_are_clear_errors():
    btf = KernelBTF.load()
    with pytest.raises(BTFError, match="struct no_such_struct is not in this kernel's BTF"):
        btf.offset("no_such_struct", "x")
    with pytest.raises(BTFError, match="has no member 'no_such_member'"):
        btf.offset("sk_buff", "no_such_member")
    assert btf.tracepoint_args("no_such_tracepoint") is None
    with pytest.raises(BTFError, match="not BTF data"):
        KernelBTF(b"\0" * 64)
