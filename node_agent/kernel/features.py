"""What this kernel offers the probes: tracepoints present, their prototypes, raw tracepoint support.

Checked before compiling so that a missing or changed tracepoint disables only its own probe (and the
segments that need it), reported by name, instead of failing the whole program.
"""

from __future__ import annotations

import ctypes as ct
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..probes import PROBES, Probe
from .btf import KernelBTF

log = logging.getLogger(__name__)

TRACEFS_ROOTS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))


@dataclass
class Unavailable:
    probe: Probe
    reason: str


@dataclass
class Features:
    usable: list[Probe] = field(default_factory=list)
    unavailable: list[Unavailable] = field(default_factory=list)
    kfree_skb_reason_arg: int | None = None
    tracefs: Path | None = None


def tracefs_root() -> Path | None:
    for root in TRACEFS_ROOTS:
        if (root / "events").is_dir():
            return root
    return None


def ensure_tracefs() -> Path | None:
    """Mount tracefs where the kernel expects it if nobody has (classic tracepoints need it to attach)."""
    root = tracefs_root()
    if root is not None:
        return root
    target = TRACEFS_ROOTS[0]
    libc = ct.CDLL(None, use_errno=True)
    if libc.mount(b"tracefs", str(target).encode(), b"tracefs", 0, None) != 0:
        log.warning("tracefs is not mounted and mounting it on %s failed (%s): syscall probes will be unavailable",
                    target, os.strerror(ct.get_errno()))
        return None
    log.info("mounted tracefs on %s", target)
    return target


def _arg_types_match(expected: tuple[str, ...], actual: list[str]) -> bool:
    if len(actual) < len(expected):
        return False
    norm = [a.replace("const ", "").replace("struct ", "").strip() for a in actual]
    return all(e == a for e, a in zip(expected, norm))


def probe(btf: KernelBTF, probes: tuple[Probe, ...] = PROBES, tracefs: Path | None = None) -> Features:
    feats = Features(tracefs=tracefs or tracefs_root())
    for p in probes:
        if p.raw:
            args = btf.tracepoint_args(p.name)
            if args is None:
                feats.unavailable.append(Unavailable(p, "tracepoint not in this kernel"))
                continue
            if not _arg_types_match(p.args, args):
                feats.unavailable.append(Unavailable(p, f"arguments changed: ({', '.join(args)})"))
                continue
        else:
            if feats.tracefs is None:
                feats.unavailable.append(Unavailable(p, "tracefs not mounted (mount -t tracefs tracefs /sys/kernel/tracing)"))
                continue
            if not (feats.tracefs / "events" / p.category / p.name).is_dir():
                feats.unavailable.append(Unavailable(p, "tracepoint not in this kernel"))
                continue
        feats.usable.append(p)
    kfree = btf.tracepoint_args("kfree_skb") or []
    norm = [a.replace("enum ", "") for a in kfree]
    if "skb_drop_reason" in norm:
        feats.kfree_skb_reason_arg = norm.index("skb_drop_reason")
    return feats
