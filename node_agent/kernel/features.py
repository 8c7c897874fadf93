"""What this kernel offers the probes: which raw tracepoints exist, with the prototypes we expect.

Checked before compiling so that a missing or changed tracepoint disables only its own probe (and the
segments that need it), reported by name, instead of failing the whole program.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..probes import PROBES, Probe
from .btf import KernelBTF


@dataclass
class Unavailable:
    probe: Probe
    reason: str


@dataclass
class Features:
    usable: list[Probe] = field(default_factory=list)
    unavailable: list[Unavailable] = field(default_factory=list)
    kfree_skb_reason_arg: int | None = None


def _arg_types_match(expected: tuple[str, ...], actual: list[str]) -> bool:
    if len(actual) < len(expected):
        return False
    norm = [a.replace("const ", "").replace("struct ", "").strip() for a in actual]
    return all(e == a for e, a in zip(expected, norm))


def probe(btf: KernelBTF, probes: tuple[Probe, ...] = PROBES) -> Features:
    """Every probe is a raw tracepoint: its existence and prototype come from BTF (btf_trace_<name>),
    and it attaches by name, so no tracefs is needed."""
    feats = Features()
    for p in probes:
        args = btf.tracepoint_args(p.name)
        if args is None:
            feats.unavailable.append(Unavailable(p, "tracepoint not in this kernel"))
            continue
        if not _arg_types_match(p.args, args):
            feats.unavailable.append(Unavailable(p, f"arguments changed: ({', '.join(args)})"))
            continue
        feats.usable.append(p)
    kfree = btf.tracepoint_args("kfree_skb") or []
    norm = [a.replace("enum ", "") for a in kfree]
    if "skb_drop_reason" in norm:
        feats.kfree_skb_reason_arg = norm.index("skb_drop_reason")
    return feats
