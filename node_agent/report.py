"""Human and machine reports of a trace: a live table, the final JSON document and JSON lines (all sinks)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TextIO

from rich.table import Table

from . import segments
from .agent import Interval
from .histogram import SegmentHistogram
from .segments import Direction


@dataclass
class _TargetTotals:
    label: str
    netns_inode: int
    segments: dict[int, SegmentHistogram] = field(default_factory=dict)
    drops: dict[str, int] = field(default_factory=dict)
    packets: list[int] = field(default_factory=lambda: [0, 0])  # receive, transmit: every packet counted
    time_one_in: int = 1  # the segments' counts are of 1 in this many packets (timed at random)


class Report:
    """Accumulates intervals over the whole run, per target (keyed by namespace inode)."""

    def __init__(self) -> None:
        self.targets: dict[int, _TargetTotals] = {}
        self.probes: dict[str, dict[str, int]] = {}
        self.counters: dict[str, int] = {}
        self.events = 0
        self.overflow_targets = 0

    def consume(self, interval: Interval) -> None:
        for slot, target in interval.targets.items():
            tot = self.targets.setdefault(target.ns.inode, _TargetTotals(target.label, target.ns.inode))
            tot.label = target.label
            tot.time_one_in = target.settings.time_one_in
            rx, tx = interval.packets.get(slot, (0, 0))
            tot.packets[0] += rx
            tot.packets[1] += tx
            for seg, h in interval.histograms.get(slot, {}).items():
                tot.segments.setdefault(seg, SegmentHistogram()).merge(h)
        for (slot, direction, reason), n in interval.drops.items():
            target = interval.targets.get(slot)
            if target is None:
                continue
            tot = self.targets.setdefault(target.ns.inode, _TargetTotals(target.label, target.ns.inode))
            name = f"{Direction(direction).otel}/{interval.drop_reasons.get(reason, str(reason))}"
            tot.drops[name] = tot.drops.get(name, 0) + n
        self.probes = {name: {"run_cnt": s.run_cnt, "run_time_ns": s.run_time_ns,
                              "avg_ns": round(s.avg_ns, 1) if s.run_cnt else 0}
                       for name, s in interval.probes.items()}
        self.counters = dict(interval.counters)
        self.events += len(interval.events)
        self.overflow_targets = interval.overflow_targets

    def close(self) -> None:
        pass

    def as_json(self) -> dict:
        targets = []
        for tot in self.targets.values():
            segs = {}
            for seg in segments.SEGMENTS:
                h = tot.segments.get(seg.id)
                if h is not None and h.count:
                    segs[seg.name] = h.summary_us()
            targets.append({"netns_inode": tot.netns_inode, "label": tot.label,
                            "packets": {"receive": tot.packets[0], "transmit": tot.packets[1]},
                            "time_one_in": tot.time_one_in, "segments": segs,
                            "drops": dict(sorted(tot.drops.items()))})
        return {"targets": targets, "probes": self.probes, "counters": self.counters,
                "events": self.events, "overflow_targets": self.overflow_targets}

    def table(self, title: str = "latencytrace") -> Table:
        t = Table(title=title, expand=False)
        for col in ("target", "segment", "count", "p50 µs", "p90 µs", "p99 µs", "max µs"):
            t.add_column(col, justify="right" if col not in ("target", "segment") else "left")
        for tot in self.targets.values():
            first = True
            for seg in segments.SEGMENTS:
                h = tot.segments.get(seg.id)
                if h is None or not h.count:
                    continue
                s = h.summary_us()
                t.add_row(tot.label if first else "", seg.name, str(s["count"]),
                          *(f"{s[k]:.1f}" if s[k] is not None else "-" for k in ("p50_us", "p90_us", "p99_us", "max_us")))
                first = False
            for name, n in sorted(tot.drops.items()):
                t.add_row(tot.label if first else "", f"drop {name}", str(n), "", "", "", "")
                first = False
        return t


def _rfc3339(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class IntervalLines:
    """`--format jsonl`: one JSON document per interval, on one line, flushed, for piping.

    Each line has the shape of the end document of `--format json` for that interval alone (a fresh
    Report per interval), plus `interval_start`/`interval_end` (RFC 3339, UTC) and the same in ns since
    the epoch. `extra` adds the run-wide fields (attach time, probe-stats mode, unavailable probes).
    The agent publishes its last partial interval on close, so the lines add up to the whole run.
    """

    def __init__(self, out: TextIO, extra: Callable[[], dict] = dict,
                 on_broken_pipe: Callable[[], object] = lambda: None) -> None:
        self.out, self.extra, self.on_broken_pipe = out, extra, on_broken_pipe
        self.broken = False

    def consume(self, interval: Interval) -> None:
        if self.broken:
            return
        one = Report()
        one.consume(interval)
        doc = {"interval_start": _rfc3339(interval.start_ns), "interval_end": _rfc3339(interval.end_ns),
               "interval_start_ns": interval.start_ns, "interval_end_ns": interval.end_ns,
               **one.as_json(), **self.extra()}
        try:
            self.out.write(json.dumps(doc, separators=(",", ":")) + "\n")
            self.out.flush()
        except BrokenPipeError:
            self.broken = True
            self.on_broken_pipe()

    def close(self) -> None:
        pass
