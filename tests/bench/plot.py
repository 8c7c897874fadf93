"""plot.png: the overhead and fidelity figures of one run, for a reader who wants the picture first."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on CI machines
import matplotlib.pyplot as plt  # noqa: E402

from . import fidelity  # noqa: E402


def _overhead(ax, sm: dict) -> None:
    metrics = [("tcp_bulk", "gbit_s", "TCP bulk\nthroughput"), ("udp_rate", "delivered_pps", "UDP 64 B\ndelivered"),
               ("udp_rate", "cpu_ns_per_packet", "UDP CPU\nper packet"), ("pp_tcp", "p50_us", "TCP RTT\np50"),
               ("pp_tcp", "p99_us", "TCP RTT\np99"), ("pp_udp", "p50_us", "UDP RTT\np50"),
               ("pp_udp", "p99_us", "UDP RTT\np99")]
    width = 0.38
    for k, (which, colour) in enumerate((("traced", "tab:red"), ("untraced", "tab:blue"))):
        xs, ys, lo, hi = [], [], [], []
        for i, (w, m, _) in enumerate(metrics):
            p = sm.get(f"{w}/{which}", {}).get(m)
            if not p or p["ratio"] is None:
                continue
            y = (p["ratio"] - 1) * 100
            xs.append(i + (k - 0.5) * width)
            ys.append(y)
            lo.append(max(y - (p["ratio_min"] - 1) * 100, 0))
            hi.append(max((p["ratio_max"] - 1) * 100 - y, 0))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, color=colour, alpha=0.8,
               label=f"{which} pod" if which == "traced" else "untraced pod (another traced)")
    ax.axhline(0, color="black", lw=0.8)
    for y in (-5, -2, 5):
        ax.axhline(y, color="grey", lw=0.6, ls="--")
    ax.text(0.99, 0.02, "dashed: targets −2% (TCP), −5% (UDP), +5% (p99)", transform=ax.transAxes, fontsize=7,
            ha="right", va="bottom", color="grey")
    ax.set_xticks(range(len(metrics)), [m[2] for m in metrics], fontsize=8)
    ax.set_ylabel("agent on vs off (%)")
    ax.set_title("Overhead: median change, bars = spread of paired rounds", fontsize=10)
    ax.legend(fontsize=8)


def _probe_cost(ax, cost: dict) -> None:
    # Programs that ran a handful of times (IRQs of physical NICs, drops) stay in the table: their few,
    # cold runs would set the scale for all the others.
    progs = {k: v for k, v in cost["agent"]["per_program"].items() if v["run_cnt"] >= 1000}
    names = list(progs)
    raw = [progs[n]["raw_ns"] for n in names]
    net = [progs[n]["net_ns"] for n in names]
    ys = range(len(names))
    ax.barh([y + 0.2 for y in ys], raw, 0.4, color="tab:grey", label="raw (with BPF stats)")
    ax.barh([y - 0.2 for y in ys], net, 0.4, color="tab:orange", label="above empty-program floor")
    ax.axvline(100, color="red", ls="--", lw=0.8)
    ax.text(100, len(names) - 0.5, " 100 ns target", color="red", fontsize=7)
    ax.set_yticks(list(ys), [n.removeprefix("lt_") for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ns per run")
    ax.set_title("Probe cost per program (traced workloads; programs run ≥ 1000 times)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")


def _per_packet(ax, cost: dict) -> None:
    keys = list(cost["agent"]["per_packet"])
    labels = [k.replace("/", "\n").replace("_", " ") for k in keys]
    a = [cost["agent"]["per_packet"][k]["net_ns"] for k in keys]
    b = [cost["bpftrace"]["per_packet"][k]["net_ns"] for k in keys]
    xs = range(len(keys))
    ax.bar([x - 0.2 for x in xs], a, 0.4, color="tab:orange", label="latencytrace agent")
    ax.bar([x + 0.2 for x in xs], b, 0.4, color="tab:purple", label="bpftrace equivalent")
    from .cost import PER_PACKET_TARGET_NS, UNTRACED_PER_PACKET_TARGET_NS

    for ns, what in ((PER_PACKET_TARGET_NS, "traced"), (UNTRACED_PER_PACKET_TARGET_NS, "untraced")):
        ax.axhline(ns, color="red", ls="--", lw=0.8)
        ax.text(len(keys) - 0.5, ns, f"{ns} ns target ({what})", color="red", fontsize=7, ha="right", va="bottom")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("program ns per packet (above floor)")
    ax.set_title("Probe time per packet: agent vs bpftrace", fontsize=10)
    ax.legend(fontsize=7)


def _fidelity(ax, fid: dict) -> None:
    labels, ratios, orders = [], [], []
    for where, proto, seg, s in fidelity.compared(fid):
        if s["agent_p50_us"] is None or not s["bpftrace_p50_us"]:
            continue
        labels.append(f"{seg}\n{proto.upper()} from {where}")
        ratios.append(s["agent_p50_us"] / s["bpftrace_p50_us"])
        orders.append([r for r in s["ratio_by_order"].values() if r])
    xs = range(len(labels))
    ax.axhspan(0.9, 1.1, color="green", alpha=0.12, label="target ±10%")
    ax.scatter(xs, ratios, color="black", zorder=3, label="both orders averaged")
    for x, rs in zip(xs, orders):
        ax.scatter([x] * len(rs), rs, color="grey", marker="_", s=120, zorder=2)
    ax.axhline(1, color="black", lw=0.6)
    ax.set_xticks(list(xs), labels, fontsize=6, rotation=45, ha="right")
    ax.set_ylabel("agent p50 / bpftrace p50")
    ax.set_title("Fidelity: same packets, agent vs independent bpftrace", fontsize=10)
    ax.legend(fontsize=7)


def write(path: Path, doc: dict) -> None:
    sections = doc.get("sections", {})
    panels = []
    if "summary" in sections.get("overhead", {}):
        panels.append(lambda ax: _overhead(ax, sections["overhead"]["summary"]))
    if "agent" in sections.get("probe_cost", {}):
        panels.append(lambda ax: _probe_cost(ax, sections["probe_cost"]))
        panels.append(lambda ax: _per_packet(ax, sections["probe_cost"]))
    if "medians" in sections.get("fidelity", {}):
        panels.append(lambda ax: _fidelity(ax, sections["fidelity"]))
    n = max(len(panels), 1)
    cols = 2 if n > 1 else 1
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4.8 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for draw, ax in zip(panels, flat):
        draw(ax)
    for ax in flat[len(panels):]:
        ax.axis("off")
    if not panels:
        flat[0].text(0.5, 0.5, "no overhead or fidelity figures in this run", ha="center", va="center")
    m = doc["machine"]
    fig.suptitle(f"latencytrace benchmarks — {m['date']}, Linux {m['kernel']}, {m['cores']} cores", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
