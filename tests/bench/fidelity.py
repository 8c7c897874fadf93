"""Fidelity: are the agent's numbers right?

The agent core runs in this process (collecting every second as `latencytrace-agent trace` does, its
report cut at phase boundaries), which lets one agent's figures be split by phase:

- Packet accounting: a UDP stream at the steady rate from a traced client pod into a traced server pod;
  packets sent, packets through the veth and datagrams read, against the samples each segment counted,
  the drops it attributed, and its health counters (events lost, stale in-flight entries).
- Medians: sockperf ping-pong (TCP into one pod, UDP into another) while the bpftrace script
  segments.bt, which shares no code and not its method with bpf/, measures the same segments of the
  same packets; agent p50 / bpftrace p50 per segment, averaged over both attachment orders. Each tool
  alone on the next packets shows how much of its own work each one counts into its segments, and the
  agent alone asking only for the compared segments how much its other segments' hooks, which run
  inside them, add to them. Once
  with the client in a pod of its own, once with the client on the host itself (as a hostNetwork pod
  or the kubelet), whose packets start on the host at their queueing, not at a receive.
- The NIC path (`nic_path`, not in --quick): a traced pod downloads a pinned wheel from the package
  registry the machine already uses, through the host's MASQUERADE on its NIC (as a pod's outbound
  connection on a node), while nicpath.bt measures rx_irq (the NIC's real hardirq until NET_RX runs)
  and rx_driver (NET_RX entry until the host forwards the de-NATed packet toward the pod) of the same
  packets; both attachment orders, as above. Not in --quick: it depends on a service outside the
  machine, which CI's smoke run must not.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from pathlib import Path

from latencytrace.node_agent import segments, targets
from latencytrace.node_agent.kernel import nics
from latencytrace.node_agent.agent import Agent, Desired
from latencytrace.node_agent.program import Sizes
from latencytrace.node_agent.report import Report
from latencytrace.node_agent.tracer import TargetSettings
from tests.netlab import Pod

from . import bpfprogs, nicpath, stats
from .results import Row, fmt
from .system import link_counts
from .tracers import BpftraceProcess
from .workloads import Traffic

# Segments both measure (bpftrace's UDP reads cannot be matched to their skb: no UDP socket queue).
COMPARED = {
    "tcp": ("rx_host_to_pod", "rx_pod_stack", "rx_socket_queue", "tx_app_to_dev", "tx_pod_to_host"),
    "udp": ("rx_host_to_pod", "rx_pod_stack", "tx_app_to_dev", "tx_pod_to_host"),
}
# What the agent asks for in the session that shows its other hooks' time inside these segments: the compared
# segments alone, so that neither the node's segments (rx_irq, rx_driver, tx_qdisc, tx_driver) nor the
# totals attach their hooks (the softirq ones, net_dev_start_xmit, net_dev_xmit, consume_skb).
OWN_SEGMENTS = ("rx_host_to_pod", "rx_pod_stack", "rx_socket_queue", "tx_app_to_dev", "tx_pod_to_host")
CLIENTS = ("pod", "host")  # where the ping-pong client runs: a pod of its own, or the host's namespace
RX_ACCOUNTED = ("rx_irq", "rx_driver", "rx_host_to_pod", "rx_pod_stack", "rx_socket_queue", "rx_total")
TX_ACCOUNTED = ("tx_app_to_dev", "tx_pod_to_host", "tx_total")
RATIO_TOLERANCE = 0.10
ACCOUNTING_TARGET = 0.99


class LiveAgent:
    """The agent core collecting once a second, its report cut into phases."""

    def __init__(self) -> None:
        self.agent = Agent(sizes=Sizes(max_targets=8), event_queue=100_000)
        self.report = Report()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="bench-agent-collect")
        self._counters: dict[str, int] = {}

    def start(self) -> LiveAgent:
        self.agent.start()
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self.agent.registry is not None

    def __enter__(self) -> LiveAgent:
        return self.start()

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                self.report.consume(self.agent.collect())

    def trace(self, pods: list[Pod], settings: TargetSettings | None = None) -> None:
        desired = []
        for pod in pods:
            ns = targets.from_path(pod.path)
            desired.append(Desired(f"netns:{ns.inode}", pod.name, (lambda ns=ns: ns), settings or TargetSettings()))
        with self._lock:
            states = self.agent.reconcile(desired)
        bad = {k: s.message for k, s in states.items() if s.state != "Tracing"}
        if bad:
            raise RuntimeError(f"agent could not trace: {bad}")

    def cut(self) -> tuple[dict, dict[str, int]]:
        """What was measured since the last cut: the report document and the counters' increments."""
        with self._lock:
            self.report.consume(self.agent.collect())
            doc = self.report.as_json()
            counters = {k: v - self._counters.get(k, 0) for k, v in self.report.counters.items()}
            self._counters = dict(self.report.counters)
            self.report = Report()
        return doc, counters

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self.running:
            self.agent.close()

    def __exit__(self, *exc) -> None:
        self.close()


class _HostClient(Pod):
    """The host's own network namespace as a client (a hostNetwork pod, the kubelet): commands run in
    this process's namespace."""

    def exec(self, *cmd: str) -> list[str]:
        return list(cmd)


HOST = _HostClient("host", "", "", "")


def _segments_of(doc: dict, pod: Pod) -> dict:
    for t in doc["targets"]:
        if t["netns_inode"] == pod.inode:
            return t
    return {"segments": {}, "drops": {}}


def ip_u32(ip: str) -> int:
    """An IPv4 address as bpftrace reads the kernel's __be32: its bytes as a little-endian integer."""
    return struct.unpack("<I", socket.inet_aton(ip))[0]


def accounting(live: LiveAgent, traffic: Traffic, client: Pod, server: Pod, pps: int, seconds: float) -> dict:
    live.trace([server, client])
    live.cut()
    c_out0, _ = link_counts(client.host_veth)
    _, s_in0 = link_counts(server.host_veth)
    run = traffic.udp_rate(client, server, pps, seconds)
    time.sleep(0.5)  # let the last packets finish their journey before the cut
    c_out1, _ = link_counts(client.host_veth)
    _, s_in1 = link_counts(server.host_veth)
    doc, counters = live.cut()
    srv, cli = _segments_of(doc, server), _segments_of(doc, client)
    return {
        "rate_pps": pps, "seconds": seconds, "iperf": run,
        "packets_into_server_pod": s_in1 - s_in0, "packets_out_of_client_pod": c_out1 - c_out0,
        "server_segments": srv["segments"], "server_drops": srv["drops"],
        "client_segments": cli["segments"], "client_drops": cli["drops"],
        "counters": counters,
    }


MODES = ("bpftrace_first", "agent_first", "agent_alone", "bpftrace_alone", "agent_alone_own_segments")


def _pingpong_session(traffic: Traffic, client: Pod, tcp_pod: Pod, udp_pod: Pod, seconds: float,
                      log_dir: Path, mode: str, bridge: str) -> dict:
    """One session of ping-pong traffic measured by the agent, bpftrace or both (see MODES).

    With both, programs on one tracepoint run in the order they were attached, and each tool's segment
    then contains the other's whole program at one of the segment's two boundaries: attaching in both
    orders and averaging cancels which one runs first. Alone, each tool's figure contains only its own
    work, which shows how much of it each tool counts into its segments; the agent alone asking only for
    OWN_SEGMENTS shows how much its other segments' hooks, which run inside these, add to them."""
    host_ns = os.stat("/proc/self/ns/net").st_ino
    # Where segments.bt sees the client's packets first on the host: a client pod's host-side veth
    # (received), or for the host's own client the bridge the host queues them on.
    first_dev = client.host_veth if client is not HOST else bridge
    ifindex = int((Path("/sys/class/net") / first_dev / "ifindex").read_text())
    params = [host_ns, tcp_pod.inode, udp_pod.inode, ifindex, ip_u32(tcp_pod.ip), ip_u32(udp_pod.ip)]
    bt = BpftraceProcess(params, log_dir) if not mode.startswith("agent_alone") else None
    live = LiveAgent() if mode != "bpftrace_alone" else None
    maps: dict = {}
    doc: dict = {"targets": []}
    out: dict = {}
    try:
        for tool in ((bt, live) if mode == "bpftrace_first" else (live, bt)):
            if tool is not None:
                tool.start()
        if live:
            live.trace([tcp_pod, udp_pod], TargetSettings(seg_mask=segments.mask(OWN_SEGMENTS))
                       if mode == "agent_alone_own_segments" else None)
            live.cut()
        out = {"tcp": {"pingpong": traffic.pingpong(client, tcp_pod, "tcp", seconds)},
               "udp": {"pingpong": traffic.pingpong(client, udp_pod, "udp", seconds)}}
        time.sleep(0.5)
        if live:
            doc, out["counters"] = live.cut()
    finally:
        try:
            if bt is not None and bt.proc is not None:
                maps = bt.stop()
        finally:
            if live is not None:
                live.close()
    for proto, pod in (("tcp", tcp_pod), ("udp", udp_pod)):
        agent_segs = _segments_of(doc, pod)["segments"]
        segs = {}
        for seg in COMPARED[proto]:
            buckets = stats.bucket_map(maps.get(f"@{seg}", {})).get(pod.inode, {})
            p50_bt = stats.bucket_quantile_ns(buckets, 0.5)
            a = agent_segs.get(seg, {})
            segs[seg] = {"agent_p50_us": _float(a.get("p50_us")), "agent_count": a.get("count", 0),
                         "bpftrace_p50_us": p50_bt / 1000 if p50_bt is not None else None,
                         "bpftrace_count": sum(buckets.values())}
        out[proto]["segments"] = segs
        out[proto]["agent_all_segments"] = agent_segs
    out["bpftrace_attach_s"] = bt.attach_wall_s if bt else None
    return out


def _float(x) -> float | None:
    return None if x is None else float(x)


def medians(traffic: Traffic, client: Pod, tcp_pod: Pod, udp_pod: Pod, seconds: float, log_dir: Path,
            quiet_wait_s: float, progress, bridge: str) -> dict:
    """Per client (CLIENTS), each mode's session and the segments combined over the modes."""
    out: dict = {"sessions": {}, "combined": {}, "strangers": {}}
    for where, who in (("pod", client), ("host", HOST)):
        sessions, strangers = {}, {}
        for mode in MODES:
            strangers[mode] = bpfprogs.wait_quiet(["self"], quiet_wait_s, progress)
            progress(f"fidelity: {mode.replace('_', ' ')}, TCP then UDP ping-pong from the {where}, "
                     f"{seconds:.0f} s each")
            sessions[mode] = _pingpong_session(traffic, who, tcp_pod, udp_pod, seconds, log_dir, mode, bridge)
        out["sessions"][where], out["strangers"][where] = sessions, strangers
        out["combined"][where] = _combine(sessions)
    return out


def _combine(sessions: dict) -> dict:
    """Each compared segment's p50 by both tools, averaged over both attachment orders, and alone."""
    combined = {}
    for proto, segs in COMPARED.items():
        combined[proto] = {}
        for seg in segs:
            both = [sessions[m][proto]["segments"][seg] for m in ("bpftrace_first", "agent_first")]
            a = [p["agent_p50_us"] for p in both]
            b = [p["bpftrace_p50_us"] for p in both]
            ok = all(x is not None for x in a + b)
            a_alone = sessions["agent_alone"][proto]["segments"][seg]["agent_p50_us"]
            b_alone = sessions["bpftrace_alone"][proto]["segments"][seg]["bpftrace_p50_us"]
            own = sessions["agent_alone_own_segments"][proto]["segments"][seg]["agent_p50_us"]
            combined[proto][seg] = {
                "agent_p50_us": sum(a) / len(a) if ok else None,
                "bpftrace_p50_us": sum(b) / len(b) if ok else None,
                "agent_count": sum(p["agent_count"] for p in both),
                "bpftrace_count": sum(p["bpftrace_count"] for p in both),
                "ratio_by_order": {m: (p["agent_p50_us"] / p["bpftrace_p50_us"]
                                       if p["agent_p50_us"] is not None and p["bpftrace_p50_us"] else None)
                                   for m, p in zip(("bpftrace_first", "agent_first"), both)},
                "agent_alone_p50_us": a_alone, "bpftrace_alone_p50_us": b_alone,
                "ratio_alone": a_alone / b_alone if a_alone is not None and b_alone else None,
                "agent_alone_own_segments_p50_us": own,
            }
    return combined


NIC_SCRIPT = Path(__file__).resolve().with_name("nicpath.bt")
NIC_SEGMENTS = ("rx_irq", "rx_driver")


def _irq_mask(irqs: list[int]) -> tuple[int, int]:
    """(lowest IRQ, bit mask of the IRQs from it on) for nicpath.bt."""
    if not irqs:
        raise RuntimeError("no NIC interrupts found (no device with MSI vectors or an IRQ)")
    lo = min(irqs)
    if max(irqs) - lo >= 64:
        raise RuntimeError(f"NIC IRQs {irqs} span more than 64 numbers")
    return lo, sum(1 << (i - lo) for i in irqs)


def nic_path(pod: Pod, bridge: str, log_dir: Path, quiet_wait_s: float, progress) -> dict:
    """rx_irq and rx_driver of a download from the package registry into a traced pod through the
    host's NIC and NAT, by the agent and by nicpath.bt, in both attachment orders."""
    lo, mask = _irq_mask(nics.nic_irqs())
    out: dict = {"irqs": sorted(nics.nic_irqs()), "download": nicpath.DOWNLOAD, "sessions": {}}
    with nicpath.through_uplink(pod, bridge) as uplink:
        sys_net = Path("/sys/class/net")
        params = [lo, mask, int((sys_net / bridge / "ifindex").read_text()),
                  int((sys_net / uplink / "ifindex").read_text()), ip_u32(pod.ip), os.stat("/proc/self/ns/net").st_ino]
        out["uplink"] = uplink
        for mode in ("bpftrace_first", "agent_first"):
            out["strangers_" + mode] = bpfprogs.wait_quiet(["self"], quiet_wait_s, progress)
            progress(f"fidelity: NIC path, {mode.replace('_', ' ')}, pip download {nicpath.DOWNLOAD} in a traced "
                     f"pod through NAT on {uplink}")
            out["sessions"][mode] = _nic_session(pod, params, log_dir, mode)
    out["combined"] = {}
    for seg in NIC_SEGMENTS:
        both = [out["sessions"][m][seg] for m in ("bpftrace_first", "agent_first")]
        a = [p["agent_p50_us"] for p in both]
        b = [p["bpftrace_p50_us"] for p in both]
        ok = all(x is not None for x in a + b)
        out["combined"][seg] = {
            "agent_p50_us": sum(a) / 2 if ok else None, "bpftrace_p50_us": sum(b) / 2 if ok else None,
            "agent_count": sum(p["agent_count"] for p in both), "bpftrace_count": sum(p["bpftrace_count"] for p in both),
            "ratio_by_order": {m: (p["agent_p50_us"] / p["bpftrace_p50_us"]
                                   if p["agent_p50_us"] is not None and p["bpftrace_p50_us"] else None)
                               for m, p in zip(("bpftrace_first", "agent_first"), both)},
        }
    after_nic = [out["sessions"][m]["rx_irq"]["bpftrace_after_nic_irq"] for m in ("bpftrace_first", "agent_first")]
    out["combined"]["rx_irq"]["bpftrace_after_nic_irq"] = {
        "count": sum(x["count"] for x in after_nic),
        "p50_us": (sum(x["p50_us"] for x in after_nic) / 2 if all(x["p50_us"] is not None for x in after_nic)
                   else None)}
    return out


def _nic_session(pod: Pod, params: list[int], log_dir: Path, mode: str) -> dict:
    bt = BpftraceProcess(params, log_dir, NIC_SCRIPT)
    live = LiveAgent()
    maps: dict = {}
    doc: dict = {"targets": []}
    out: dict = {}
    try:
        for tool in ((bt, live) if mode == "bpftrace_first" else (live, bt)):
            tool.start()
        live.trace([pod])
        live.cut()
        out["download_run"] = nicpath.download(pod)
        time.sleep(0.5)
        doc, out["counters"] = live.cut()
    finally:
        try:
            if bt.proc is not None:
                maps = bt.stop()
        finally:
            live.close()
    agent_segs = _segments_of(doc, pod)["segments"]
    nic_only = stats.bucket_map(maps.get("@rx_irq", {})).get(0, {})
    for seg in NIC_SEGMENTS:
        buckets = dict(stats.bucket_map(maps.get(f"@{seg}", {})).get(0, {}))
        if seg == "rx_irq":  # the segment as the table defines it: after a NIC hardirq, else a raise
            for b, n in stats.bucket_map(maps.get("@rx_irq_raise", {})).get(0, {}).items():
                buckets[b] = buckets.get(b, 0) + n
        p50_bt = stats.bucket_quantile_ns(buckets, 0.5)
        a = agent_segs.get(seg, {})
        out[seg] = {"agent_p50_us": _float(a.get("p50_us")), "agent_count": a.get("count", 0),
                    "bpftrace_p50_us": p50_bt / 1000 if p50_bt is not None else None,
                    "bpftrace_count": sum(buckets.values())}
    p50_nic = stats.bucket_quantile_ns(nic_only, 0.5)
    out["rx_irq"]["bpftrace_after_nic_irq"] = {"count": sum(nic_only.values()),
                                               "p50_us": p50_nic / 1000 if p50_nic is not None else None}
    out["agent_all_segments"] = agent_segs
    return out


def nic_rows(data: dict) -> list[Row]:
    if "error" in data:
        return [Row("fidelity", "rx_irq, rx_driver p50, NIC path (download from a package registry into a pod)",
                    "n/a", "n/a", "n/a", "×0.90–1.10", False, note=f"failed: {data['error']}")]
    out: list[Row] = []
    dl = data["sessions"]["agent_first"]["download_run"]
    for seg, s in data["combined"].items():
        note = _by_order(s)
        if "bpftrace_after_nic_irq" in s:
            nic = s["bpftrace_after_nic_irq"]
            note += (f"; bpftrace: {nic['count']:,} after a NIC hardirq (p50 {fmt(nic['p50_us'], 2, 'µs')}), "
                     f"{s['bpftrace_count'] - nic['count']:,} after a softirq raise")
        note += (f"; {data['download']} ({dl['bytes'] / 1e6:.1f} MB in {dl['seconds']:.1f} s) through NAT on "
                 f"{data['uplink']}, IRQs {data['irqs']}")
        out.append(_p50_row(f"{seg} p50, NIC path (download from a package registry into a pod)", s, note))
    return out


def _by_order(s: dict) -> str:
    return ", ".join(f"{o.replace('_', ' ')} ×{r:.3f}" for o, r in s["ratio_by_order"].items() if r)


def _p50_row(what: str, s: dict, note: str) -> Row:
    """One segment's agent p50 against bpftrace's, both attachment orders averaged."""
    a, b = s["agent_p50_us"], s["bpftrace_p50_us"]
    ratio = a / b if a is not None and b else None
    return Row("fidelity", what, f"{fmt(b, 2, 'µs')} (bpftrace, n={s['bpftrace_count']:,})",
               f"{fmt(a, 2, 'µs')} (n={s['agent_count']:,})",
               f"×{ratio:.3f} ({(a - b) * 1000:+.0f} ns)" if ratio else "n/a", "×0.90–1.10",
               bool(ratio is not None and abs(ratio - 1) <= RATIO_TOLERANCE), note=note)


def run(traffic: Traffic, client: Pod, tcp_pod: Pod, udp_pod: Pod, pps: int, accounting_s: float,
        pingpong_s: float, log_dir: Path, quiet_wait_s: float, progress, bridge: str, nic: bool = True) -> dict:
    strangers = bpfprogs.wait_quiet(["self"], quiet_wait_s, progress)
    progress(f"fidelity: packet accounting, UDP {pps:,} packets/s for {accounting_s:.0f} s "
             f"(client and server traced)")
    with LiveAgent() as live:
        acc = accounting(live, traffic, client, tcp_pod, pps, accounting_s)
    acc["strangers"] = strangers
    med = medians(traffic, client, tcp_pod, udp_pod, pingpong_s, log_dir, quiet_wait_s, progress, bridge)
    out = {"accounting": acc, "medians": med}
    if nic:
        try:
            out["nic"] = nic_path(tcp_pod, bridge, log_dir, quiet_wait_s, progress)
        except Exception as e:  # a registry out of reach must not lose the figures above
            progress(f"fidelity: NIC path FAILED: {e}")
            out["nic"] = {"error": f"{type(e).__name__}: {e}"}
    return out


def compared(data: dict):
    """(client, protocol, segment, combined figures) of every segment both tools measured."""
    for where in CLIENTS:
        for proto, segs in data["medians"]["combined"][where].items():
            for seg, s in segs.items():
                yield where, proto, seg, s


def rows(data: dict) -> list[Row]:
    out: list[Row] = []
    for where, proto, seg, s in compared(data):
        by_order = _by_order(s)
        if s["ratio_alone"]:
            by_order += (f"; each alone: {fmt(s['agent_alone_p50_us'], 2)} vs {fmt(s['bpftrace_alone_p50_us'], 2)} µs"
                         f" ×{s['ratio_alone']:.3f}")
        if s.get("agent_alone_own_segments_p50_us") is not None:
            by_order += (f"; the agent alone asking for the compared segments only (none of the node's, no totals): "
                         f"{fmt(s['agent_alone_own_segments_p50_us'], 2)} µs")
        out.append(_p50_row(f"{seg} p50, {proto.upper()} ping-pong from the {where}", s, by_order))
    if "nic" in data:
        out += nic_rows(data["nic"])
    acc = data["accounting"]
    run = acc["iperf"]
    srv, cli = acc["server_segments"], acc["client_segments"]
    rate = f"{acc['rate_pps']:,} pkt/s"
    for seg in RX_ACCOUNTED:
        # Segments ending before the socket see every packet that entered the pod; the others every
        # datagram the application read.
        base, what = ((acc["packets_into_server_pod"], "packets into the pod (veth)")
                      if seg in ("rx_irq", "rx_driver", "rx_host_to_pod") else (run["received"], "datagrams read"))
        n = srv.get(seg, {}).get("count", 0)
        out.append(Row("accounting", f"{seg} samples / {what}, UDP {rate}", f"{base:,}", f"{n:,}",
                       f"{n / base:.2%}" if base else "n/a", "≥ 99%", bool(base) and n / base >= ACCOUNTING_TARGET))
    for seg in TX_ACCOUNTED:
        base = acc["packets_out_of_client_pod"]
        n = cli.get(seg, {}).get("count", 0)
        out.append(Row("accounting", f"{seg} samples / packets out of the client pod (veth), UDP {rate}",
                       f"{base:,}", f"{n:,}", f"{n / base:.2%}" if base else "n/a", "≥ 99%",
                       bool(base) and n / base >= ACCOUNTING_TARGET))
    lost = run["sent"] - run["received"]
    drops = sum(acc["server_drops"].values())
    out.append(Row("accounting", "drops attributed to the server pod / datagrams lost (iperf3)", f"{lost:,}",
                   f"{drops:,}", f"{drops - lost:+,}", "—", None))
    c = acc["counters"]
    unfinished = srv.get("rx_host_to_pod", {}).get("count", 0) - srv.get("rx_total", {}).get("count", 0) - drops
    out.append(Row("accounting", "events lost (ring buffer full) / dropped in user space", "0",
                   f"{c.get('events_lost', 0):,} / {c.get('events_dropped_userspace', 0):,}", "", "—", None))
    out.append(Row("accounting", "in-flight entries found stale (evicted or never completed)", "0",
                   f"{c.get('stale_flights', 0):,}", "", "—", None,
                   note=f"receive flights started but neither read nor dropped: {unfinished:,}"))
    return out
