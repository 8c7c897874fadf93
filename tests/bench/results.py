"""Result rows and the documents made of them: results.json and results.md.

Every row compares a figure with the agent (or the measurement under test) against a baseline measured
in the same run; `met` is None where the issue sets no target.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

SECTIONS = {
    "overhead": "Overhead of tracing (alternating rounds, agent off vs on)",
    "probe_cost": "Probe cost (kernel BPF statistics)",
    "paired": "Paired: two agents on the same packets (typed vs raw tracepoints, or two builds)",
    "agent": "Agent process",
    "comparison": "Comparison: the same measurement with bpftrace",
    "fidelity": "Fidelity: agent medians vs an independent bpftrace measurement",
    "accounting": "Packet accounting at the steady rate",
    "soak": "Soak: the agent at the steady rate for a long run",
    "controlplane": "Control plane (real kube-apiserver, kwok nodes)",
}


@dataclass
class Row:
    section: str
    measurement: str
    baseline: str
    with_agent: str
    change: str  # ratio or delta
    target: str
    met: bool | None
    note: str = ""


def fmt(x: float | None, digits: int = 2, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if abs(x) >= 1e5:
        text = f"{x:,.0f}"
    else:
        text = f"{x:.{digits}f}"
    return f"{text} {unit}".rstrip()


def pct(ratio: float | None, digits: int = 1) -> str:
    return "n/a" if ratio is None else f"{(ratio - 1) * 100:+.{digits}f}%"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [
        "# latencytrace benchmark results",
        "",
        f"- Machine: Linux {m['kernel']}, {m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB memory"
        f" ({m['hostname']}), git {m.get('git_commit') or '?'}",
        f"- Date: {m['date']}; took {doc['duration_s'] / 60:.1f} min",
        f"- Command: `{doc['command']}`",
        "- Tools: " + ", ".join(f"{k} {v}" for k, v in m["tools"].items()),
        "- Plot of the overhead, probe cost and fidelity figures: [plot.png](plot.png); every raw figure is in "
        "results.json, next to results.md in the run's output directory",
    ]
    for note in doc.get("notes", []):
        lines.append(f"- {note}")
    lines.append("")
    rows = [Row(**r) for r in doc["rows"]]
    for key, title in SECTIONS.items():
        mine = [r for r in rows if r.section == key]
        section = doc.get("sections", {}).get(key, {})
        if not mine and not section.get("skipped"):
            continue
        lines += [f"## {title}", ""]
        if section.get("skipped"):
            lines += [f"Not run: {section['skipped']}", ""]
        if section.get("error"):
            lines += [f"**Failed:** {section['error']}", ""]
        if mine:
            lines += ["| measurement | baseline | with agent | ratio/delta | target | met? |",
                      "| --- | --- | --- | --- | --- | --- |"]
            for r in mine:
                met = "—" if r.met is None else ("yes" if r.met else "**no**")
                name = r.measurement + (f" ({r.note})" if r.note else "")
                lines.append("| " + " | ".join(_cell(c) for c in (name, r.baseline, r.with_agent, r.change,
                                                                   r.target, met)) + " |")
            lines.append("")
        for note in section.get("notes", []):
            lines.append(f"- {note}")
        if section.get("notes"):
            lines.append("")
    return "\n".join(lines)


def write(out_dir: Path, doc: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    (out_dir / "results.md").write_text(markdown(doc) + "\n")


def _json_default(o):
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")
