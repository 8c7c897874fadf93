"""Control plane at scale: a real kube-apiserver with kwok fake nodes, the operator, and real agents.

For each scale (nodes × pods per node) a fresh operator process publishes a LatencyTrace that selects
every pod on those nodes. Measured from the moment `kubectl apply` starts:

- published: each selected node's LatencyTraceNode carries the trace with all of that node's pods
  (seen by a watch of LatencyTraceNode objects in this process);
- picked up: for a sample of nodes, real `latencytrace-agent run` processes (LATENCYTRACE_NODE_NAME)
  trace every pod of their node; those pods' IPs are the addresses of real network namespaces made with
  NetLab, which the agents find the way they find any pod without processes: by pod IP;
- deletion: from `kubectl delete pod` to the pod leaving its node's configuration, and to its agent
  dropping it.

Also the operator's resident memory (idle, and with the trace published) and the API server's request
rate (apiserver_request_total), in total and for latencytrace.io objects, during publishing and after.
Nodes and pods accumulate from one scale to the next (pods carry a label per scale they belong to).
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import json
import logging
import math
import os
import re
import shutil
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

from latencytrace.node_agent import contract
from latencytrace.node_agent.kube import ListWatch, api_client
from tests.cluster.controlplane import ControlPlane
from tests.cluster.install import apply_crds
from tests.cluster.procs import Proc, free_port, wait_until
from tests.netlab import NetLab

from . import stats
from .results import Row, fmt
from .system import process_usage

BIN = Path(sys.executable).parent
NAMESPACE = "lt-bench"
P50_TARGET_S, P99_TARGET_S = 4.0, 6.0  # issue 13, on a 2-core machine
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def node_name(i: int) -> str:
    return f"bench-node-{i}"


def pod_name(i: int, j: int) -> str:
    return f"p-{i}-{j}"


class NodeConfigWatch(ListWatch):
    """Every change of every LatencyTraceNode, with the time this process saw it.

    history[node] = [(t, spec, status)]: spec = {trace name: pod names published for the node},
    status = {trace name: {pod name: state}} as the node's agent reported them. The list and watch are
    node_agent.kube.ListWatch's (a watch ERROR such as 410 Gone lists again); this class only records."""

    def __init__(self, api) -> None:
        from kubernetes import client

        custom = client.CustomObjectsApi(api)
        super().__init__(custom.list_cluster_custom_object, contract.GROUP, contract.VERSION, contract.NODE_PLURAL,
                         on_change=lambda: None, log=logging.getLogger("bench.ltn-watch"), timeout_seconds=60)
        self.history: dict[str, list[tuple[float, dict, dict]]] = defaultdict(list)
        self.lock = threading.Lock()

    def start(self) -> NodeConfigWatch:
        super().start()
        if not self.synced.wait(60):
            raise RuntimeError("could not list LatencyTraceNode objects within 60 s")
        return self

    def _record(self, obj: dict, deleted: bool = False) -> None:
        t = time.time()
        spec, status = {}, {}
        if not deleted:
            spec = {tr["name"]: frozenset(p["name"] for p in tr.get("pods", []))
                    for tr in (obj.get("spec") or {}).get("traces", [])}
            status = {tr["name"]: {p["name"]: p.get("state") for p in tr.get("pods", [])}
                      for tr in (obj.get("status") or {}).get("traces", [])}
        with self.lock:
            self.history[obj["metadata"]["name"]].append((t, spec, status))

    def _replace(self, items) -> None:  # a (re-)list: record every object, and those gone since
        items = list(items)
        before = {o["metadata"]["name"]: o for o in self.snapshot()}
        super()._replace(items)
        for obj in items:
            before.pop(obj["metadata"]["name"], None)
            self._record(obj)
        for obj in before.values():
            self._record(obj, deleted=True)

    def _apply(self, event: dict) -> str | None:
        rv = super()._apply(event)
        if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
            self._record(event["object"], deleted=event["type"] == "DELETED")
        return rv

    def first(self, node: str, since: float, ok) -> float | None:
        """First time at or after `since` when ok(spec, status) held for the node; None if not yet."""
        with self.lock:
            hist = list(self.history.get(node, []))
        # The state at `since` is the last one before it; it counts if it already holds.
        before = [h for h in hist if h[0] < since]
        if before and ok(*before[-1][1:]):
            return since
        for t, spec, status in hist:
            if t >= since and ok(spec, status):
                return t
        return None

    def nodes_with(self, trace: str) -> list[str]:
        with self.lock:
            return [n for n, h in self.history.items() if h and trace in h[-1][1]]


class AgentLog:
    """The lines a `latencytrace-agent run` logs when it starts and stops tracing a pod, with their times."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc

    def offset(self) -> int:
        return self.proc.log.stat().st_size

    def first(self, since_offset: int, text: str) -> float | None:
        """Epoch time of the first line after `since_offset` containing `text`."""
        for line in self.proc.log.read_text(errors="replace")[since_offset:].splitlines():
            tm = _LOG_TIME.match(line)
            if tm and text in line:
                return dt.datetime.strptime(tm.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        return None

    def events(self, since_offset: int, verb: str) -> dict[str, float]:
        """pod "namespace/name" -> epoch time of its first `tracing` or `stopped tracing` line."""
        text = self.proc.log.read_text(errors="replace")[since_offset:]
        pat = re.compile(rf"(?<!stopped ){re.escape(verb)} ({re.escape(NAMESPACE)}/[\w.-]+) " if verb == "tracing"
                         else rf"{re.escape(verb)} ({re.escape(NAMESPACE)}/[\w.-]+) ")
        out: dict[str, float] = {}
        for line in text.splitlines():
            m = pat.search(line)
            tm = _LOG_TIME.match(line)
            if m and tm and m.group(1) not in out:
                out[m.group(1)] = dt.datetime.strptime(tm.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        return out


def apiserver_requests(cp: ControlPlane) -> dict[str, float]:
    """apiserver_request_total summed: in all ("all"), per API group (core group as "core"), and per
    "VERB group/resource[/subresource]" (e.g. "APPLY latencytrace.io/latencytracenodes")."""
    text = cp.kubectl("get", "--raw", "/metrics", timeout=60).stdout
    out: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels, value = line.rsplit(" ", 1)
        lab = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        group = lab.get("group") or "core"
        out[group] += float(value)
        out["all"] += float(value)
        what = f"{group}/{lab.get('resource', '')}" + (f"/{lab['subresource']}" if lab.get("subresource") else "")
        out[f"{lab.get('verb', '?')} {what}"] += float(value)
    return dict(out)


def request_counts(a: dict[str, float], z: dict[str, float], keep=("latencytrace.io/", "core/nodes", "core/pods")) \
        -> dict[str, int]:
    """Requests per "VERB group/resource" between two apiserver_requests() readings, for the resources the
    operator touches (LatencyTraceNodes, traces, Nodes, pods), most first."""
    out = {k: int(z[k] - a.get(k, 0)) for k in z if " " in k and any(w in k for w in keep)}
    return dict(sorted(((k, v) for k, v in out.items() if v), key=lambda kv: -kv[1]))


class CpuClock:
    """CPU seconds of named processes and of the whole machine between two readings (/proc via psutil):
    what the operator costs per published node, and whether the control plane leaves the 2 cores idle."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def read(self) -> dict[str, float]:
        import psutil

        out = {}
        for name, pid in self.pids.items():
            try:
                t = psutil.Process(pid).cpu_times()
                out[name] = t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                out[name] = float("nan")
        m = psutil.cpu_times()
        out["machine"] = m.user + m.nice + m.system + m.irq + m.softirq + getattr(m, "steal", 0.0)
        out["wall"] = time.monotonic()
        return out

    @staticmethod
    def spent(a: dict[str, float], z: dict[str, float]) -> dict[str, float]:
        return {k: round(z[k] - a[k], 3) for k in z if k in a}


class Bench:
    def __init__(self, cp: ControlPlane, lab: NetLab, log_dir: Path, pods_per_node: int, progress) -> None:
        from kubernetes import client

        self.cp, self.lab, self.log_dir, self.ppn, self.progress = cp, lab, log_dir, pods_per_node, progress
        self.api = api_client(str(cp.kubeconfig), pool_size=32)
        self.core = client.CoreV1Api(self.api)
        self.nodes = 0
        self.pods: dict[int, set[str]] = {}  # node index -> pod names that exist
        self.watch = NodeConfigWatch(self.api).start()
        self.agents: dict[int, tuple[Proc, AgentLog]] = {}
        self.operator: Proc | None = None

    # -- cluster objects ------------------------------------------------------------------------
    def grow(self, nodes: int, tiers: list[int]) -> None:
        """Nodes 0..nodes-1 and their pods; pods are labelled tier-<s>=in for every scale s they belong to."""
        new = list(range(self.nodes, nodes))
        if not new:
            return
        t0 = time.monotonic()
        # Not waiting for Ready: kwok initialises the nodes while their pods are created, and the pods
        # turning Running (below) is what the benchmark needs.
        for k in range(0, len(new), 100):  # in batches: one kubectl of 1000 Nodes can outlast its timeout
            self.cp.create_fake_nodes([node_name(i) for i in new[k:k + 100]], wait_ready=False)
        self.progress(f"control plane: {len(new)} fake nodes created in {time.monotonic() - t0:.0f} s")
        bodies = []
        for i in new:
            labels = {f"tier-{s}": "in" for s in tiers if i < s}
            for j in range(self.ppn):
                bodies.append({"apiVersion": "v1", "kind": "Pod",
                               "metadata": {"name": pod_name(i, j), "labels": {"app": "bench", **labels}},
                               "spec": {"nodeName": node_name(i), "automountServiceAccountToken": False,
                                        "terminationGracePeriodSeconds": 0,
                                        "containers": [{"name": "c", "image": "example.invalid/app:1"}]}})
            self.pods[i] = {pod_name(i, j) for j in range(self.ppn)}
        t0 = time.monotonic()

        def create(body: dict) -> None:
            for attempt in range(5):
                try:
                    self.core.create_namespaced_pod(NAMESPACE, body, _preload_content=False)
                    return
                except Exception as e:
                    if getattr(e, "status", None) == 409:
                        return
                    if attempt == 4:
                        raise
                    time.sleep(1 + attempt)

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            for n, _ in enumerate(pool.map(create, bodies), 1):
                if n % 5000 == 0:
                    self.progress(f"control plane: {n:,}/{len(bodies):,} pods created")
        self.progress(f"control plane: {len(bodies):,} pods created in {time.monotonic() - t0:.0f} s; "
                      "waiting for kwok to run them")
        self._wait_running(timeout=900)
        self.nodes = nodes
        self.progress(f"control plane: all pods Running {time.monotonic() - t0:.0f} s after the first was created")

    def _wait_running(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            resp = self.core.list_namespaced_pod(NAMESPACE, field_selector="status.phase=Pending", limit=1,
                                                 _preload_content=False)
            if not json.loads(resp.data)["items"]:
                return
            time.sleep(1)
        raise TimeoutError(f"pods still Pending after {timeout:.0f} s")

    def make_real(self, node: int) -> None:
        """Give every pod of `node` a real network namespace on this machine and its IP as pod IP."""
        for name in sorted(self.pods[node]):
            lab_pod = self.lab.add_pod(name)
            # A JSON patch: a strategic merge would add to kwok's podIPs instead of replacing them.
            self.core.patch_namespaced_pod_status(name, NAMESPACE, [
                {"op": "replace", "path": "/status/podIP", "value": lab_pod.ip},
                {"op": "replace", "path": "/status/podIPs", "value": [{"ip": lab_pod.ip}]}])

    # -- processes ------------------------------------------------------------------------------
    def start_operator(self, tag: str) -> Proc:
        self.operator = Proc(f"operator-{tag}", [str(BIN / "latencytrace-operator")],
                             self.log_dir / f"operator-{tag}.log",
                             env=self.cp.process_env(LATENCYTRACE_OPERATOR_NAMESPACE=NAMESPACE,
                                                     LATENCYTRACE_OPERATOR_LEASE_NAME="bench-operator",
                                                     LATENCYTRACE_OPERATOR_IDENTITY=f"bench-{tag}",
                                                     LATENCYTRACE_OPERATOR_HEALTH_HOST="127.0.0.1",
                                                     LATENCYTRACE_OPERATOR_HEALTH_PORT=str(free_port())),
                             cwd=self.log_dir)
        wait_until("the operator leading", lambda: "leading (Lease" in self.operator.log.read_text(errors="replace"),
                   120, [self.operator], interval=0.1)
        # A running operator holds every active pod of the cluster (operator/podcache.py) before a trace comes:
        # wait for its first list, so that what is measured is a trace applied to a running operator.
        wait_until("the operator's pod cache", lambda: "pod cache: " in self.operator.log.read_text(errors="replace"),
                   300, [self.operator], interval=0.1)
        return self.operator

    def stop_operator(self) -> None:
        if self.operator is not None:
            self.operator.stop()
            self.operator = None

    def start_agent(self, node: int) -> None:
        # Probes stay loaded while idle (unload 0: never), so that every scale after the warm-up
        # measures configuration, not BPF compilation; the warm-up measures the cold start.
        proc = Proc(f"agent-{node}", [str(BIN / "latencytrace-agent"), "--log-level", "INFO", "run"],
                    self.log_dir / f"agent-{node_name(node)}.log",
                    env=self.cp.process_env(LATENCYTRACE_NODE_NAME=node_name(node),
                                            LATENCYTRACE_AGENT_IDLE_UNLOAD_SECONDS="0",
                                            LATENCYTRACE_AGENT_HEALTH_PORT="0"),  # agents side by side
                    cwd=self.log_dir)
        self.agents[node] = (proc, AgentLog(proc))

    def control_plane_pids(self) -> dict[str, int]:
        """The control plane's processes (etcd, kube-apiserver, controllers, kwok) by name."""
        return {p.name: p.pid for p in self.cp._procs}

    def procs(self) -> list[Proc]:
        return [p for p in (self.operator, *(a for a, _ in self.agents.values())) if p is not None]

    def check_alive(self) -> None:
        for p in self.procs():
            p.check_alive()

    # -- traces ---------------------------------------------------------------------------------
    def apply_trace(self, name: str, tier: int) -> float:
        body = {"apiVersion": contract.API_VERSION, "kind": contract.TRACE_KIND,
                "metadata": {"name": name, "namespace": NAMESPACE},
                "spec": {"podSelector": {"matchLabels": {f"tier-{tier}": "in"}}}}
        t0 = time.time()
        self.cp.kubectl("apply", "-f", "-", input=json.dumps(body))
        return t0

    def delete_trace(self, name: str, timeout: float) -> None:
        self.cp.kubectl("delete", "-n", NAMESPACE, "lt", name, "--wait=false")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            left = self.watch.nodes_with(name)
            if not left:
                return
            time.sleep(0.5)
        raise TimeoutError(f"trace {name} still on {len(left)} nodes {timeout:.0f} s after its deletion")

    def wait_published(self, name: str, nodes: list[int], t0: float, timeout: float) -> dict[int, float]:
        """Per node: seconds from t0 to its configuration carrying the trace with all its pods."""
        done: dict[int, float] = {}
        deadline = time.monotonic() + timeout
        while len(done) < len(nodes) and time.monotonic() < deadline:
            self.check_alive()
            for i in nodes:
                if i in done:
                    continue
                want = frozenset(self.pods[i])
                t = self.watch.first(node_name(i), t0, lambda spec, _, want=want: spec.get(name) == want)
                if t is not None:
                    done[i] = t - t0
            time.sleep(0.2)
        return done

    def wait_reported(self, name: str, pods: dict[int, set[str]], t0: float, timeout: float,
                      tracing: bool) -> dict[int, float | None]:
        """Per sampled node: seconds from t0 until its agent's status reports every pod in pods[node] as
        Tracing for trace `name` (tracing=True), or none of them any more (tracing=False)."""
        def ok(spec, status, want) -> bool:
            states = status.get(name, {})
            if tracing:
                return all(states.get(p) == "Tracing" for p in want)
            return not any(p in states for p in want)

        deadline = time.monotonic() + timeout
        out: dict[int, float | None] = {}
        wanted = {i: pods[i] for i in self.agents if pods.get(i)}
        while len(out) < len(wanted) and time.monotonic() < deadline:
            self.check_alive()
            for i, want in wanted.items():
                if i not in out:
                    t = self.watch.first(node_name(i), t0, lambda spec, status, want=want: ok(spec, status, want))
                    if t is not None:
                        out[i] = t - t0
            time.sleep(0.2)
        return {i: out.get(i) for i in wanted}

    def wait_agents(self, offsets: dict[int, int], verb: str, pods: dict[int, set[str]], t0: float,
                    timeout: float) -> dict[int, float | None]:
        """Per sampled node: seconds from t0 until its agent logged `verb` for every pod in pods[node]
        (an agent logs only changes: a pod it already traces for another trace logs nothing)."""
        deadline = time.monotonic() + timeout
        out: dict[int, float | None] = {}
        while time.monotonic() < deadline:
            self.check_alive()
            for i, (proc, log) in self.agents.items():
                want = {f"{NAMESPACE}/{p}" for p in pods.get(i, set())}
                seen = log.events(offsets[i], verb)
                if want and want <= set(seen):
                    out[i] = max(seen[p] for p in want) - t0
            if len(out) == len([i for i in self.agents if pods.get(i)]):
                break
            time.sleep(0.2)
        return {i: out.get(i) for i in self.agents if pods.get(i)}

    def close(self) -> None:
        self.watch.stop()
        for p in self.procs():
            p.stop()
        self.operator = None
        self.agents = {}


def _summary(seconds: list[float]) -> dict:
    xs = sorted(seconds)
    if not xs:
        return {"n": 0, "p50_s": None, "p99_s": None, "max_s": None}
    p99 = xs[min(len(xs) - 1, math.ceil(0.99 * len(xs)) - 1)]
    return {"n": len(xs), "p50_s": stats.median(xs), "p99_s": p99, "max_s": xs[-1]}


def measure_scale(b: Bench, scale: int, steady_s: float, deletions: int) -> dict:
    name = f"scale-{scale}"
    nodes = list(range(scale))
    b.progress(f"control plane {scale} nodes: starting a fresh operator")
    op = b.start_operator(str(scale))
    time.sleep(3)
    idle = process_usage(op.pid)
    clock = CpuClock({"operator": op.pid, **b.control_plane_pids(), "bench": os.getpid(),
                      **{f"agent-{node_name(i)}": a.pid for i, (a, _) in b.agents.items()}})
    m0 = apiserver_requests(b.cp)
    offsets = {i: log.offset() for i, (_, log) in b.agents.items()}
    b.progress(f"control plane {scale} nodes: kubectl apply LatencyTrace {name} "
               f"({sum(len(b.pods[i]) for i in nodes):,} pods)")
    c0 = clock.read()
    t0 = b.apply_trace(name, scale)
    published = b.wait_published(name, nodes, t0, timeout=max(120, scale * 0.6))
    t_pub = time.time()
    c1 = clock.read()
    m1 = apiserver_requests(b.cp)
    cpu_pub = CpuClock.spent(c0, c1)
    reqs_pub = request_counts(m0, m1)
    b.progress(f"control plane {scale} nodes: CPU seconds while publishing ({cpu_pub['wall']:.1f} s): "
               + ", ".join(f"{k} {v:.1f}" for k, v in cpu_pub.items() if k != "wall")
               + "; requests: " + ", ".join(f"{k} {v}" for k, v in list(reqs_pub.items())[:8]))
    picked = b.wait_reported(name, {i: b.pods[i] for i in b.agents}, t0, timeout=180, tracing=True)
    after_pub = process_usage(op.pid)
    b.progress(f"control plane {scale} nodes: published to {len(published)}/{len(nodes)} nodes, "
               f"p50 {stats.median(list(published.values())) or 0:.2f} s, max {max(published.values(), default=0):.2f} s; "
               f"agents report all pods Tracing after {', '.join(f'{v:.2f} s' if v is not None else 'never' for v in picked.values())}")
    m_steady, t_steady = apiserver_requests(b.cp), time.time()
    c_steady = clock.read()
    time.sleep(steady_s)
    m2 = apiserver_requests(b.cp)
    cpu_steady = CpuClock.spent(c_steady, clock.read())
    reqs_steady = request_counts(m_steady, m2)
    steady = process_usage(op.pid)
    t_steady_end = time.time()

    # Deletion: one pod on each sampled node, and more on other nodes.
    victims: list[tuple[int, str]] = [(i, sorted(b.pods[i])[0]) for i in b.agents if i < scale]
    others = [i for i in nodes if i not in b.agents]
    step = max(1, len(others) // max(1, deletions - len(victims)))
    victims += [(i, sorted(b.pods[i])[0]) for i in others[::step][:max(0, deletions - len(victims))]]
    offsets = {i: log.offset() for i, (_, log) in b.agents.items()}
    t_del = time.time()
    b.cp.kubectl("delete", "pod", "-n", NAMESPACE, "--wait=false", *[p for _, p in victims])
    for i, p in victims:
        b.pods[i].discard(p)
    gone = {}
    deadline = time.monotonic() + 60
    while len(gone) < len(victims) and time.monotonic() < deadline:
        for i, p in victims:
            if p not in gone:
                t = b.watch.first(node_name(i), t_del, lambda spec, _, p=p: p not in spec.get(name, frozenset()))
                if t is not None:
                    gone[p] = t - t_del
        time.sleep(0.2)
    dropped = b.wait_reported(name, {i: {p} for i, p in victims if i in b.agents}, t_del, timeout=120,
                              tracing=False)
    dropped_log = b.wait_agents(offsets, "stopped tracing", {i: {p} for i, p in victims if i in b.agents}, t_del,
                                timeout=10)
    b.progress(f"control plane {scale} nodes: {len(victims)} pods deleted; unpublished p50 "
               f"{stats.median(list(gone.values())) or 0:.2f} s; agents' status dropped them after "
               f"{', '.join(f'{v:.2f} s' if v is not None else 'never' for v in dropped.values())}")
    peak = process_usage(op.pid).peak_rss_bytes
    b.delete_trace(name, timeout=max(120, scale * 0.6))
    b.stop_operator()
    pods_total = sum(len(b.pods[i]) for i in nodes) + len(victims)

    def rate(a: dict, z: dict, t: float, key: str) -> float:
        return (z.get(key, 0) - a.get(key, 0)) / t if t > 0 else 0.0

    pub_window = max(t_pub - t0, 1e-3)
    steady_window = max(t_steady_end - t_steady, 1e-3)
    return {
        "nodes": scale, "pods": pods_total, "published": _summary(list(published.values())),
        "published_nodes": len(published), "publish_per_node_s": {node_name(i): v for i, v in published.items()},
        "agent_pickup_s": {node_name(i): v for i, v in picked.items()},
        "unpublish_after_delete": _summary(list(gone.values())), "deleted": len(victims),
        "agent_drop_s": {node_name(i): v for i, v in dropped.items()},
        "agent_drop_logged_s": {node_name(i): v for i, v in dropped_log.items()},
        "operator_rss_mib": {"idle": idle.rss_bytes / 2**20, "published": after_pub.rss_bytes / 2**20,
                             "steady": steady.rss_bytes / 2**20, "peak": peak / 2**20},
        "operator_cpu_s": {"to_published": after_pub.cpu_s - idle.cpu_s, "steady": steady.cpu_s - after_pub.cpu_s,
                           "publish_window": cpu_pub["operator"],
                           "per_published_node": cpu_pub["operator"] / max(1, len(published))},
        "cpu_s_publish_window": cpu_pub, "cpu_s_steady_window": cpu_steady,
        "requests_publish_window": reqs_pub, "requests_steady_window": reqs_steady,
        "api_rps": {"publish_window_s": pub_window, "steady_window_s": steady_window,
                    "publish_all": rate(m0, m1, pub_window, "all"),
                    "publish_latencytrace": rate(m0, m1, pub_window, contract.GROUP),
                    "steady_all": rate(m_steady, m2, steady_window, "all"),
                    "steady_latencytrace": rate(m_steady, m2, steady_window, contract.GROUP)},
    }


def measure_floor(b: Bench, scale: int) -> dict:
    """The API server alone: the applies the operator makes for a trace over every pod of `scale` nodes,
    built and encoded beforehand and sent by as many threads as the operator writes with (its
    publish_concurrency), over the client's connection pool with nothing else done per request; timed to
    published as the operator is. What publishing costs on this machine whatever the operator does."""
    import uuid

    from latencytrace.operator import nodeconfig, selection, spec as specs
    from latencytrace.operator.config import OperatorConfig

    name, uid = f"floor-{scale}", str(uuid.uuid4())
    nodes = list(range(scale))
    # The operator's own selection and entries for the trace measure_scale applies (apply_trace).
    spec = specs.parse({"podSelector": {"matchLabels": {f"tier-{scale}": "in"}}})
    query = selection.pod_query(spec, NAMESPACE)
    resp = b.core.list_namespaced_pod(NAMESPACE, label_selector=query.label_selector,
                                      field_selector=query.field_selector, _preload_content=False)
    placed = filter(None, map(selection.placed_pod, json.loads(resp.data)["items"]))
    by_node = selection.pods_by_node(placed, spec, NAMESPACE, None)
    resp = b.core.list_node(_preload_content=False, _headers={"Accept": nodeconfig.METADATA_LIST})
    node_uids = {o["metadata"]["name"]: o["metadata"]["uid"] for o in json.loads(resp.data)["items"]}
    entries = nodeconfig.entries_by_node(contract.TRACE_KINDS[0], NAMESPACE, name, uid, 1, spec.settings(), by_node)
    cfg = b.api.configuration
    base = f"{cfg.host}/apis/{contract.GROUP}/{contract.VERSION}/{contract.NODE_PLURAL}"
    params = f"fieldManager={nodeconfig.field_manager(uid)}&force=true"
    bodies = [(f"{base}/{n}?{params}", json.dumps(nodeconfig.apply_config(n, node_uids.get(n), e)).encode())
              for n, e in entries.items()]
    headers = {"Content-Type": nodeconfig.APPLY, "Accept": "application/json", **b.api.default_headers}
    pool = b.api.rest_client.pool_manager

    def send(req: tuple[str, bytes]) -> None:
        r = pool.request("PATCH", req[0], body=req[1], headers=headers)
        if r.status not in (200, 201):
            raise RuntimeError(f"apply {r.status}: {r.data[:200]!r}")

    threads = OperatorConfig.model_fields["publish_concurrency"].default
    clock = CpuClock({**b.control_plane_pids(), "bench": os.getpid()})
    b.progress(f"control plane {scale} nodes: the API server alone, {len(bodies)} applies from {threads} threads")
    c0 = clock.read()
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(threads) as ex:
        list(ex.map(send, bodies))
    sent = time.time() - t0
    published = b.wait_published(name, nodes, t0, timeout=max(120, scale * 0.6))
    cpu = CpuClock.spent(c0, clock.read())
    b.progress(f"control plane {scale} nodes: the API server alone took the applies in {sent:.1f} s; published "
               f"p50 {stats.median(list(published.values())) or 0:.2f} s, max {max(published.values(), default=0):.2f} s")

    def delete(node: str) -> None:
        r = pool.request("DELETE", f"{base}/{node}", headers=headers)
        if r.status not in (200, 202, 404):
            raise RuntimeError(f"delete {r.status}: {r.data[:200]!r}")

    with concurrent.futures.ThreadPoolExecutor(threads) as ex:
        list(ex.map(delete, entries))
    return {"nodes": scale, "threads": threads, "sent_s": sent, "published": _summary(list(published.values())),
            "published_nodes": len(published), "cpu_s": cpu}


def run(scales: tuple[int, ...], pods_per_node: int, n_agents: int, workdir: Path, log_dir: Path, progress) -> dict:
    # A fresh cluster every run: the work dir holds etcd's data, which a new etcd would otherwise reuse.
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    cp_log = log_dir / "controlplane"
    cp_log.mkdir(parents=True, exist_ok=True)
    progress("control plane: starting etcd, kube-apiserver, controller manager, scheduler, kwok "
             "(binaries are built once by .ci/setup)")
    out: dict = {"scales": {}, "pods_per_node": pods_per_node, "sampled_agents": n_agents}
    with ControlPlane(workdir / "cluster", with_controllers=True, with_kwok=True) as cp, NetLab() as lab:
        apply_crds(cp)
        cp.kubectl("create", "namespace", NAMESPACE)
        deadline = time.monotonic() + 60
        while cp.kubectl("get", "serviceaccount", "default", "-n", NAMESPACE, check=False).returncode:
            if time.monotonic() > deadline:
                raise TimeoutError("no default ServiceAccount in the benchmark namespace")
            time.sleep(0.5)
        b = Bench(cp, lab, cp_log, pods_per_node, progress)
        try:
            sampled = list(range(min(n_agents, scales[0])))
            # The memory every pod costs the operator (its pod cache, and a trace's share) counts from an idle
            # operator of a cluster without pods.
            op = b.start_operator("empty")
            time.sleep(3)
            out["operator_rss_base_mib"] = process_usage(op.pid).rss_bytes / 2**20
            b.stop_operator()
            b.grow(scales[0], list(scales))
            progress(f"control plane: {len(sampled) * pods_per_node} real network namespaces for the pods of "
                     f"{len(sampled)} sampled node(s), agents started for them")
            for i in sampled:
                b.make_real(i)
                b.start_agent(i)
            # Warm-up: the first trace on a node loads the probes (BPF compile and attach).
            progress("control plane: warm-up trace on the sampled nodes (agents load their probes)")
            b.start_operator("warmup")
            offsets = {i: log.offset() for i, (_, log) in b.agents.items()}
            t0 = b.apply_trace("warmup", scales[0])
            cold = b.wait_reported("warmup", {i: b.pods[i] for i in b.agents}, t0, timeout=240, tracing=True)
            cold_log = b.wait_agents(offsets, "tracing", {i: b.pods[i] for i in b.agents}, t0, timeout=10)
            out["cold_pickup_s"] = {node_name(i): v for i, v in cold.items()}
            out["cold_pickup_logged_s"] = {node_name(i): v for i, v in cold_log.items()}
            loaded = {node_name(i): log.first(offsets[i], "probes loaded") for i, (_, log) in b.agents.items()}
            out["cold_probes_loaded_s"] = {k: (v - t0 if v is not None else None) for k, v in loaded.items()}
            progress(f"control plane: cold start, apply to agents reporting every pod Tracing: "
                     f"{', '.join(f'{v:.2f} s' if v is not None else 'never' for v in cold.values())}")
            b.delete_trace("warmup", timeout=120)
            b.stop_operator()
            for scale in scales:
                if scale > b.nodes:
                    b.grow(scale, list(scales))
                out["scales"][str(scale)] = measure_scale(b, scale, steady_s=10 if scale >= 10 else 3,
                                                          deletions=10 if scale >= 10 else len(sampled))
            out["floor"] = measure_floor(b, max(scales))
        finally:
            b.close()
    return out


def rows(data: dict) -> list[Row]:
    out: list[Row] = []
    ppn = data["pods_per_node"]
    cold = [v for v in data.get("cold_pickup_s", {}).values() if v is not None]
    loaded = [v for v in data.get("cold_probes_loaded_s", {}).values() if v is not None]
    if data.get("cold_pickup_s"):
        out.append(Row("controlplane", "first trace on a node: apply to its agent reporting every pod Tracing (cold: "
                       "probes compiled and attached on demand)", "—",
                       f"max {max(cold):.2f} s" if cold else "never",
                       f"probes loaded after {max(loaded):.2f} s" if loaded else "", "—", None,
                       note=f"{len(data['cold_pickup_s'])} sampled agent(s)"))
    prev = None
    largest = max(int(k) for k in data["scales"]) if data["scales"] else 0
    for key, s in data["scales"].items():
        n = s["nodes"]
        pub = s["published"]
        at = f"{n:,} nodes × {ppn} pods"
        judged = n == largest
        all_pub = s["published_nodes"] == n
        out.append(Row("controlplane", f"apply to every node's LatencyTraceNode published, p50, {at}", "—",
                       fmt(pub["p50_s"], 2, "s"), f"{s['published_nodes']}/{n} nodes", f"≤ {P50_TARGET_S:g} s",
                       (all_pub and pub["p50_s"] is not None and pub["p50_s"] <= P50_TARGET_S) if judged else None,
                       note="target at the largest scale" if judged else ""))
        out.append(Row("controlplane", f"apply to published, p99 (max), {at}", "—",
                       f"{fmt(pub['p99_s'], 2, 's')} ({fmt(pub['max_s'], 2, 's')})", "", f"≤ {P99_TARGET_S:g} s",
                       (all_pub and pub["p99_s"] is not None and pub["p99_s"] <= P99_TARGET_S) if judged else None))
        picked = [v for v in s["agent_pickup_s"].values() if v is not None]
        out.append(Row("controlplane", f"apply to sampled agents reporting all their pods Tracing, {at}", "—",
                       f"max {max(picked):.2f} s" if picked else "never",
                       f"{len(picked)}/{len(s['agent_pickup_s'])} agents", "—", None))
        un = s["unpublish_after_delete"]
        dropped = [v for v in s["agent_drop_s"].values() if v is not None]
        out.append(Row("controlplane", f"pod deleted to unpublished (p50 / max), {at}", "—",
                       f"{fmt(un['p50_s'], 2, 's')} / {fmt(un['max_s'], 2, 's')}", f"{un['n']}/{s['deleted']} pods",
                       "—", None))
        out.append(Row("controlplane", f"pod deleted to its agent's status dropping it (max), {at}", "—",
                       f"{max(dropped):.2f} s" if dropped else "never", f"{len(dropped)} agents", "—", None))
        mem = s["operator_rss_mib"]
        # From an idle operator of a cluster without pods: what the pods cost, in the pod cache and the trace.
        base = data.get("operator_rss_base_mib", mem["idle"])
        grown = mem["steady"] - base
        per_pod = grown * 1024 / s["pods"] if s["pods"] else 0
        met = None
        expo = None
        if prev is not None:
            pg = prev["operator_rss_mib"]["steady"] - base
            if pg > 0 and grown > 0:
                expo = math.log(grown / pg) / math.log(s["pods"] / prev["pods"])
                met = expo <= 1.1
        out.append(Row("controlplane", f"operator resident memory, {at} ({s['pods']:,} pods)",
                       f"{base:.0f} MiB idle, no pods",
                       f"{mem['steady']:.0f} MiB (peak {mem['peak']:.0f}; idle with its pod cache {mem['idle']:.0f})",
                       f"+{grown:.0f} MiB, {per_pod:.1f} KiB/pod" + (f", growth ∝ pods^{expo:.2f}" if expo else ""),
                       "≤ linear in pods", met))
        r = s["api_rps"]
        out.append(Row("controlplane", f"API requests/s while publishing ({r['publish_window_s']:.1f} s), {at}", "—",
                       f"{r['publish_all']:.0f} total, {r['publish_latencytrace']:.0f} latencytrace.io", "", "—", None))
        out.append(Row("controlplane", f"API requests/s steady ({r['steady_window_s']:.0f} s after publishing), {at}",
                       "—", f"{r['steady_all']:.0f} total, {r['steady_latencytrace']:.1f} latencytrace.io", "", "—",
                       None))
        if "cpu_s_publish_window" in s:
            c, published_n = s["cpu_s_publish_window"], max(1, s["published_nodes"])
            cp_names = [k for k in c if k not in ("operator", "bench", "machine", "wall") and not k.startswith("agent-")]
            out.append(Row("controlplane", f"operator CPU while publishing, {at}", "—",
                           f"{c['operator']:.1f} s", f"{c['operator'] / published_n * 1000:.1f} ms per published node",
                           "—", None))
            lt = {k: v for k, v in s["requests_publish_window"].items() if "latencytrace.io/" in k}
            out.append(Row("controlplane", f"latencytrace.io requests while publishing, per published node, {at}",
                           "—", ", ".join(f"{k.replace('latencytrace.io/', '')} {v / published_n:.2f}"
                                          for k, v in lt.items()) or "none", "", "—", None,
                           note="all clients: the operator writes spec, agents write status"))
            out.append(Row("controlplane", f"CPU while publishing ({c['wall']:.1f} s on {os.cpu_count()} cores), {at}",
                           "—", f"machine {c['machine']:.1f} s", ", ".join(
                               f"{k} {c[k]:.1f}" for k in (*cp_names, "operator", "bench") if k in c), "—", None))
        prev = s
    if data.get("floor"):
        f = data["floor"]
        fp, c = f["published"], f["cpu_s"]
        out.append(Row("controlplane", f"the API server alone: the same applies, built beforehand and sent by "
                       f"{f['threads']} threads (no operator), apply to published p50 / p99 (max), "
                       f"{f['nodes']:,} nodes × {ppn} pods", "—",
                       f"{fmt(fp['p50_s'], 2, 's')} / {fmt(fp['p99_s'], 2, 's')} ({fmt(fp['max_s'], 2, 's')})",
                       f"{f['published_nodes']}/{f['nodes']} nodes; all sent in {f['sent_s']:.1f} s; CPU: kube-apiserver "
                       f"{c.get('kube-apiserver', 0):.1f} s, etcd {c.get('etcd', 0):.1f} s, machine {c['machine']:.1f} s",
                       "—", None, note="what publishing costs on this machine whatever the operator does"))
    return out
