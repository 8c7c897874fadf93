"""Faults injected for real, on the real control plane: the operator and the agent run as host processes
(`latencytrace-operator`, `latencytrace-agent run`) the way tests/operator/test_cluster_e2e.py starts them,
against the real API server; the traced pod is a real network namespace on this machine.

Every wait is for a positive signal (the kernel's view through bpftool and /proc, the LatencyTraceNode's
status) with a generous bound: the machine is shared and loaded.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from latencytrace.node_agent import contract
from tests.agent.kernel import (attached_tracepoints, bpftool, held_ids, ip4_key, lookup_slots, map_dump, maps_of,
                                prog_ids_of, used_target_slots)
from tests.cluster.controlplane import ControlPlane
from tests.cluster.install import apply_crds
from tests.cluster.procs import wait_until
from tests.export.receiver import Receiver
from tests.netlab import NetLab

from .conftest import kget
from .test_cluster_e2e import World, apply_trace

pytest_plugins = ["tests.cluster.fixtures"]

BOUND = 180  # seconds: a BCC compile on a busy 2-core machine fits well within it


@contextlib.contextmanager
def one_node_world(cp, tmp_path, **operator_env: str) -> Iterator[World]:
    """One kwok node with one pod ("web", app=web) in a real network namespace, an OTLP backend, the
    operator running (no agent yet)."""
    ns = f"faults-{os.getpid()}-{time.monotonic_ns() % 100000}"
    cp.kubectl("create", "namespace", ns)
    nodes = cp.create_fake_nodes([f"{ns}-0"])
    lab = NetLab()
    receiver = Receiver().start()
    w = World(cp, tmp_path, ns, nodes, lab, receiver)
    try:
        w.add_pod("web", nodes[0], {"app": "web"})
        w.start_operator(1, **operator_env)
        yield w
    finally:
        w.close()


@pytest.fixture
def world(control_plane, crds, tmp_path):
    with one_node_world(control_plane, tmp_path) as w:
        yield w


def parse_time(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def heartbeat(world: World, node: str) -> float:
    beat = world.ltns().get(node, {}).get("status", {}).get("heartbeatTime")
    return parse_time(beat) if beat else 0.0


def node_tracing(world: World, node: str, pod: str, after: float) -> bool:
    """The node's status, with a heartbeat newer than `after`: Ready, `pod` Tracing in the very namespace
    that holds its IP."""
    status = world.ltns().get(node, {}).get("status", {})
    beat = status.get("heartbeatTime")
    if not beat or parse_time(beat) <= after:
        return False
    ready = {c["type"]: c for c in status.get("conditions", [])}.get("Ready", {})
    pods = {p["name"]: p for r in status.get("traces", []) for p in r["pods"]}
    return (ready.get("status") == "True" and pods.get(pod, {}).get("state") == "Tracing"
            and pods[pod].get("netnsInode") == world.lab.pods[pod].inode)


def test_agent_sigkilled_mid_trace_leaves_nothing_in_the_kernel_and_recovers_on_restart(world):
    """SIGKILL runs no handler: the agent cannot detach anything. The kernel must free every program,
    link and map the dead process held (they live by its file descriptors), and a new agent on the same
    node must trace the same pod again and bring the LatencyTraceNode status back (Ready, Tracing, a
    heartbeat newer than the restart)."""
    [node] = world.nodes
    apply_trace(world, "web", {"podSelector": {"matchLabels": {"app": "web"}}})
    first = world.start_agent(node)
    wait_until("the first agent traces web", lambda: node_tracing(world, node, "web", 0), BOUND, world.procs())
    progs, maps = prog_ids_of(first.pid), held_ids(first.pid, "map")
    assert progs and maps and attached_tracepoints(progs), first.tail()

    os.kill(first.pid, signal.SIGKILL)
    first.popen.wait(30)
    assert first.popen.returncode == -signal.SIGKILL
    wait_until("the kernel freed the dead agent's programs",
               lambda: not progs & {p["id"] for p in bpftool("prog", "show")}, 60)
    wait_until("the kernel freed the dead agent's maps",
               lambda: not maps & {m["id"] for m in bpftool("map", "show")}, 60)
    assert not attached_tracepoints(progs)

    last_beat = heartbeat(world, node)  # the dead agent's last word: whatever is newer comes from the next one

    second = world.start_agent(node)
    wait_until("the restarted agent traces web again", lambda: node_tracing(world, node, "web", last_beat),
               BOUND, world.procs())
    new_progs = prog_ids_of(second.pid)
    assert new_progs and not new_progs & progs and attached_tracepoints(new_progs), second.tail()
    wait_until("the trace's status counts web", lambda: world.trace("web").get("status", {}).get("tracedPods") == 1,
               60, world.procs())


@pytest.fixture
def own_control_plane(tmp_path_factory) -> Iterator[ControlPlane]:
    """A control plane of this test's own: its API server goes away, and the session's other components
    (controllers that give up their leases) must not be disturbed by that."""
    cp = ControlPlane(tmp_path_factory.mktemp("apiserver-outage"), with_controllers=True, with_kwok=True)
    cp.start()
    try:
        apply_crds(cp)
        yield cp
    finally:
        cp.stop()


OUTAGE = 30  # seconds


def trouble_lines(text: str) -> Counter:
    """Warning/error lines of a log, by message with numbers and addresses blanked: a retry logged each
    time shows as a count above 1."""
    out = Counter()
    for line in text.splitlines():
        m = re.match(r"\S+ \S+ (WARNING|ERROR) (.*)", line)
        if m:
            out[re.sub(r"0x[0-9a-f]+|\d+", "N", m.group(2))] += 1
    return out


def test_api_server_away_for_30_s_operator_and_agent_recover_in_place(own_control_plane, tmp_path):
    """The kube-apiserver process is stopped for 30 s and started again on the same port and certificates.
    The operator (whose Lease renew deadline is set above the outage: with the default 10 s it gives up
    leading and exits, as leader-elected components do, to be restarted) and the agent go on in the same
    processes; an edit made right after the API server returns is published to the node and applied by
    the agent; each logs a given trouble once, not once per retry. (Seen here first: kopf's default retry
    budget, 54 s, ended shorter than a busy API server's restart, and the operator exited.)"""
    cp = own_control_plane
    with one_node_world(cp, tmp_path, LATENCYTRACE_OPERATOR_LEASE_DURATION_SECONDS="180",
                        LATENCYTRACE_OPERATOR_RENEW_DEADLINE_SECONDS="120") as world:
        [node] = world.nodes
        apply_trace(world, "web", {"podSelector": {"matchLabels": {"app": "web"}}})
        agent = world.start_agent(node)
        wait_until("the agent traces web", lambda: node_tracing(world, node, "web", 0), BOUND, world.procs())
        operator = world.operator
        pids = (operator.pid, agent.pid)
        logs_before = (len(operator.log.read_text()), len(agent.log.read_text()))

        cp.stop_apiserver()
        down = time.monotonic()
        # The agent has noticed (its watch broke) before the outage is over; then the outage runs its course.
        wait_until("the agent notices the API server is gone",
                   lambda: "(retrying)" in agent.log.read_text()[logs_before[1]:], OUTAGE, world.procs())
        while time.monotonic() - down < OUTAGE:
            for p in world.procs():
                p.check_alive()
            time.sleep(1)  # the fault's length, not a wait for an effect
        cp.start_apiserver()
        back = time.time()

        apply_trace(world, "web", {"podSelector": {"matchLabels": {"app": "web"}}, "slowThresholdMicroseconds": 3000})
        wait_until("the edit is published to the node",
                   lambda: [t.get("slowThresholdMicroseconds") for t in world.ltns()[node]["spec"]["traces"]] == [3000],
                   BOUND, world.procs())

        def applied() -> bool:
            obj = world.ltns()[node]
            return (obj.get("status", {}).get("observedGeneration") == obj["metadata"]["generation"]
                    and node_tracing(world, node, "web", back))

        wait_until("the agent applies the edit and reports it", applied, BOUND, world.procs())
        assert (operator.pid, agent.pid) == pids and operator.alive() and agent.alive()
        for proc, start in zip((operator, agent), logs_before, strict=True):
            repeated = {msg: n for msg, n in trouble_lines(proc.log.read_text()[start:]).items() if n > 1}
            assert not repeated, f"{proc.name} logged the same trouble more than once: {repeated}"


class LeaseWatch:
    """Samples the Lease's holder and renew time in a thread, every quarter second, on the monotonic
    clock: the record of who led when."""

    def __init__(self, cp, namespace: str, name: str):
        from latencytrace.node_agent.kube import api_client
        from kubernetes import client

        self.api = client.CoordinationV1Api(api_client(str(cp.kubeconfig)))
        self.namespace, self.name = namespace, name
        self.samples: list[tuple[float, str | None, str | None]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lease-watch", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.25):
            try:
                spec = self.api.read_namespaced_lease(self.name, self.namespace).spec
            except Exception:  # noqa: BLE001 (a slow answer is a missing sample, not a failure)
                continue
            renew = spec.renew_time.isoformat() if spec.renew_time else None
            self.samples.append((time.monotonic(), spec.holder_identity, renew))

    def __enter__(self) -> LeaseWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)

    def holders(self) -> list[str | None]:
        """The holders in the order they held, each once per uninterrupted run."""
        out: list[str | None] = []
        for _, holder, _ in self.samples:
            if not out or out[-1] != holder:
                out.append(holder)
        return out


LEASE_SECONDS = 15  # the operator's default lease duration


def test_leader_killed_the_standby_takes_over_after_the_lease_expires_never_two_leaders(world):
    """Two operator replicas: operator-1 leads, operator-2 waits. operator-1 is SIGKILLed (it cannot release
    the Lease); operator-2 takes over once the Lease has gone unrenewed for a whole lease duration, and not
    before: never two leaders. The Lease's holder, sampled all along, goes operator-1 -> operator-2 once;
    the new leader publishes an edit made after the takeover."""
    [node] = world.nodes
    leader = world.operator
    with LeaseWatch(world.cp, world.ns, "e2e-operator") as lease:
        standby = world.start_operator(2, lead=False)
        apply_trace(world, "web", {"podSelector": {"matchLabels": {"app": "web"}}})
        wait_until("operator-1 publishes the trace", lambda: world.pods_on(node, "web") == ["web"], 60,
                   [leader, standby])
        # A few renewals by operator-1 while operator-2 waits.
        wait_until("operator-1 renewed the Lease thrice", lambda: len({r for _, h, r in lease.samples
                                                                       if h == "operator-1"}) >= 3, 60,
                   [leader, standby])
        assert "leading (Lease" not in standby.log.read_text()

        os.kill(leader.pid, signal.SIGKILL)
        killed = time.monotonic()
        leader.popen.wait(30)
        wait_until("operator-2 leads", lambda: "leading (Lease" in standby.log.read_text(),
                   LEASE_SECONDS + 60, [standby])
        wait_until("the Lease names operator-2", lambda: lease.samples and lease.samples[-1][1] == "operator-2",
                   30, [standby])
    final_renew = [r for _, h, r in lease.samples if h == "operator-1"][-1]
    renew_seen = min(t for t, h, r in lease.samples if h == "operator-1" and r == final_renew)
    first_seen_2 = min(t for t, h, _ in lease.samples if h == "operator-2")
    # operator-2 may take over only a whole lease duration after operator-1's last renewal (the sample saw
    # that renewal up to a request's latency after it happened: 2 s of slack on a loaded machine).
    assert first_seen_2 - renew_seen >= LEASE_SECONDS - 2, (first_seen_2 - renew_seen, lease.samples)
    assert first_seen_2 - killed <= LEASE_SECONDS + 30, first_seen_2 - killed
    assert lease.holders() == ["operator-1", "operator-2"], lease.holders()

    world.operator = standby
    apply_trace(world, "web", {"podSelector": {"matchLabels": {"app": "web"}}, "slowThresholdMicroseconds": 3000})
    wait_until("operator-2 publishes the edit",
               lambda: [t.get("slowThresholdMicroseconds") for t in world.ltns()[node]["spec"]["traces"]] == [3000],
               60, [standby])


def datagrams_into(world: World, pod: str, port: int, count: int) -> None:
    """`count` UDP datagrams from a client namespace, read by an application in `pod`."""
    target = world.lab.pods[pod]
    client = world.lab.pods.get("client") or world.lab.add_pod("client")
    with target.serve("udp-recv", "--port", str(port), "--count", str(count), "--timeout", "30") as rx:
        client.traffic("udp-send", "--to", target.ip, "--port", str(port), "--count", str(count), "--rate", "2000")
    assert rx.result == {"received": count}


def export_report(world: World, node: str, after: float) -> dict:
    """The node status's export report, if its heartbeat is newer than `after`."""
    status = world.ltns().get(node, {}).get("status", {})
    beat = status.get("heartbeatTime")
    return status.get("export", {}) if beat and parse_time(beat) > after else {}


def trace_destinations(world: World, name: str) -> list[dict]:
    """The LatencyTrace's export health, per destination, as the operator summarises the agents' reports."""
    return world.trace(name).get("status", {}).get("export", {}).get("destinations", [])


def test_otlp_backend_killed_mid_run_probes_go_on_losses_counted_export_resumes(world):
    """The agent's OTLP backend is stopped while packets flow into a traced pod, then started again on the
    same ports. The probes keep counting (the histograms are cumulative: the first export after the
    backend returns carries the packets of the outage), the node status reports the export unhealthy with
    the batches dropped, and so does the LatencyTrace's own status (status.export.destinations, what a
    tenant sees without reading agent logs or node objects); once the backend is back export resumes by
    itself and both statuses say so; the agent is the same process throughout."""
    [node] = world.nodes
    apply_trace(world, "web", {"podSelector": {"matchLabels": {"app": "web"}}, "directions": ["receive"]})
    agent = world.start_agent(node)
    wait_until("the agent traces web", lambda: node_tracing(world, node, "web", 0), BOUND, world.procs())
    datagrams_into(world, "web", 9801, 100)
    wait_until("web's histograms exported", lambda: world.exported_count("web", "rx_socket_queue") == 100,
               60, world.procs())
    assert export_report(world, node, 0).get("healthy") is True
    wait_until("the trace's status shows its destination healthy",
               lambda: [(d["endpoint"], d["default"], d["healthy"]) for d in trace_destinations(world, "web")]
               == [(world.receiver.grpc_endpoint, True, True)], 60, world.procs())

    old = world.receiver
    old.stop()
    stopped = time.time()
    datagrams_into(world, "web", 9802, 200)
    wait_until("the status reports the export unhealthy, batches dropped",
               lambda: (lambda r: r.get("healthy") is False and r.get("droppedBatches", 0) > 0
                        and "127.0.0.1" in (r.get("lastError") or ""))(export_report(world, node, stopped)),
               BOUND, world.procs())
    wait_until("the trace's status shows its destination unhealthy, batches dropped, the node named",
               lambda: [(d["healthy"], d["unhealthyNodes"], d["droppedBatches"] > 0,
                         (d.get("lastError") or "").startswith(f"{node}: "))
                        for d in trace_destinations(world, "web")] == [(False, 1, True, True)],
               60, world.procs())

    world.receiver = Receiver(grpc_port=old.grpc_port, http_port=old.http_port).start()
    back = time.time()
    wait_until("export resumes with the outage's packets counted",
               lambda: world.exported_count("web", "rx_socket_queue") == 300, BOUND, world.procs())
    wait_until("the status reports the export healthy again",
               lambda: export_report(world, node, back).get("healthy") is True, BOUND, world.procs())
    wait_until("the trace's status shows its destination healthy again",
               lambda: [(d["healthy"], d["unhealthyNodes"]) for d in trace_destinations(world, "web")] == [(True, 0)],
               60, world.procs())
    assert agent.alive() and world.agents[node] is agent


def pod_states(world: World, node: str, after: float = 0) -> dict[str, dict]:
    """Pod name -> its report in the node's status (heartbeat newer than `after`, else {})."""
    status = world.ltns().get(node, {}).get("status", {})
    beat = status.get("heartbeatTime")
    if not beat or parse_time(beat) <= after:
        return {}
    return {p["name"]: p for r in status.get("traces", []) for p in r["pods"]}


@dataclass(frozen=True)
class KernelView:
    """What an agent has in the kernel, read with bpftool (not through the agent)."""

    progs: frozenset[int]
    maps: frozenset[int]
    netns: dict[int, int]  # lt_netns: netns inode -> slot
    ip4: dict[int, int]  # lt_ip4: address key -> slot
    slots: frozenset[int]  # lt_targets slots in use
    drop_slots: frozenset[int]  # slots with drop counters in lt_drops
    lru: dict[str, tuple[int, int]]  # LRU map name -> (entries, max_entries)


def kernel_view(pid: int) -> KernelView:
    maps = maps_of(pid)
    return KernelView(
        progs=frozenset(prog_ids_of(pid)), maps=frozenset(m["id"] for m in maps.values()),
        netns=lookup_slots(maps["lt_netns"]["id"]), ip4=lookup_slots(maps["lt_ip4"]["id"]),
        slots=frozenset(used_target_slots(maps["lt_targets"]["id"])),
        drop_slots=frozenset(int.from_bytes(k[:4], "little") for k, _ in map_dump(maps["lt_drops"]["id"])),
        lru={name: (len(map_dump(m["id"])), m["max_entries"]) for name, m in maps.items()
             if m.get("type") == "lru_hash"})


def lines_about(log: str, pod: str) -> list[str]:
    return [line for line in log.splitlines() if pod in line]


def test_a_traced_pods_namespace_deleted_with_packets_in_flight_is_dropped_alone(world):
    """Two traced pods on one node; a client streams datagrams at both, and one pod's network namespace
    is deleted mid-stream (its pod object stays: the agent cannot wait for the API server to notice).
    The agent finds out by itself: one warning line, the pod reported NotFound in its node's status, its
    slot, namespace inode and IP gone from the probes' lookup tables and target slots (read from the
    kernel with bpftool), no map or program more than before; the in-flight tables stay within their
    bounds; the other pod is traced throughout, its packets counted."""
    [node] = world.nodes
    world.add_pod("doomed", node, {"app": "web"})
    apply_trace(world, "web", {"podSelector": {"matchLabels": {"app": "web"}}})
    agent = world.start_agent(node)
    wait_until("the agent traces web and doomed",
               lambda: all(p.get("state") == "Tracing" for p in pod_states(world, node).values())
               and set(pod_states(world, node)) == {"web", "doomed"}, BOUND, world.procs())
    web, doomed = world.lab.pods["web"], world.lab.pods["doomed"]
    doomed_inode, doomed_ip = doomed.inode, doomed.ip
    before = kernel_view(agent.pid)
    assert set(before.netns) == {web.inode, doomed_inode} and len(before.slots) == 2, before
    doomed_slot = before.netns[doomed_inode]

    client = world.lab.add_pod("client")
    stream = subprocess.Popen(client.python("traffic.py", "udp-send", "--to", doomed_ip, "--port", "9811",
                                            "--count", "40000", "--rate", "4000"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)  # packets flowing into doomed: the fault strikes mid-stream
        log_at = len(agent.log.read_text())
        gone = time.time()
        world.lab.remove_pod("doomed")  # `ip netns del` and the host veth: the namespace goes with its devices
        datagrams_into(world, "web", 9812, 200)  # the other pod, while the stream into the dead address goes on
        wait_until("the node status reports doomed NotFound",
                   lambda: pod_states(world, node, gone).get("doomed", {}).get("state") == "NotFound",
                   60, world.procs())
    finally:
        stream.kill()
        stream.wait()
    report = pod_states(world, node)
    assert "no network namespace on this node" in report["doomed"].get("message", ""), report
    assert report["web"]["state"] == "Tracing"
    time.sleep(5)  # five more rounds of the agent's retries (1 s): none may log about doomed again
    said = lines_about(agent.log.read_text()[log_at:], "/doomed")
    assert len(said) == 1 and " WARNING " in said[0] and "stopped tracing" in said[0], said

    after = kernel_view(agent.pid)
    web_slot = before.netns[web.inode]
    assert after.netns == {web.inode: web_slot} and after.ip4 == {ip4_key(web.ip): web_slot}, after
    assert after.slots == {web_slot} and doomed_slot not in after.drop_slots, after
    assert after.progs == before.progs and after.maps == before.maps, (before, after)
    for name, (entries, bound) in after.lru.items():
        assert entries <= bound, (name, entries, bound)
    # web is still traced: its packets, before and after the fault, all counted.
    wait_until("web's datagrams exported", lambda: world.exported_count("web", "rx_socket_queue") == 200,
               60, world.procs())
    datagrams_into(world, "web", 9813, 100)
    wait_until("web's later datagrams exported", lambda: world.exported_count("web", "rx_socket_queue") == 300,
               60, world.procs())
    assert agent.alive()


def rss_kib(pid: int) -> int:
    m = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(m.group(1))


CHURN_WARMUP = 6  # pods made and deleted before the first measurement (imports, caches, first exports)
CHURN_CYCLES = 40
CHURN_LIVE = 2  # churned pods alive at a time


def test_pods_churned_while_traced_converge_tables_bounded_memory_flat_a_line_per_event(world):
    """Pods selected by a trace are created and deleted in a loop (each a real network namespace and a pod
    object, deleted the way a kubelet does: namespace first, then the object) while one pod stays traced.
    Afterwards the state has converged (the node's spec and status name exactly the live pods, each traced
    in its own namespace; the probes' lookup tables hold exactly their inodes and IPs and no other target
    slot is in use; no map or program more than after the warm-up), the agent's memory is flat (RSS within
    10% of what it was after the warm-up) and it said at most one line per pod traced and one per pod
    dropped, none about anything else."""
    [node] = world.nodes
    apply_trace(world, "web", {"podSelector": {"matchLabels": {"app": "web"}}})
    agent = world.start_agent(node)
    wait_until("the agent traces web", lambda: node_tracing(world, node, "web", 0), BOUND, world.procs())
    live: list[str] = []

    def churn(i: int) -> None:
        name = f"churn-{i}"
        world.add_pod(name, node, {"app": "web"})
        live.append(name)
        if len(live) > CHURN_LIVE:
            world.remove_pod(live.pop(0))

    def converged(after: float) -> bool:
        want = {"web", *live}
        if set(world.pods_on(node, "web")) != want:
            return False
        states = pod_states(world, node, after)
        if set(states) != want or any(p["state"] != "Tracing" or p.get("netnsInode") != world.lab.pods[n].inode
                                      for n, p in states.items()):
            return False
        view = kernel_view(agent.pid)
        return (set(view.netns) == {world.lab.pods[n].inode for n in want}
                and set(view.ip4) == {ip4_key(world.lab.pods[n].ip) for n in want} and len(view.slots) == len(want))

    for i in range(CHURN_WARMUP):
        churn(i)
    mark = time.time()
    wait_until("converged after the warm-up", lambda: converged(mark), BOUND, world.procs())
    rss_before, view_before = rss_kib(agent.pid), kernel_view(agent.pid)
    log_at = len(agent.log.read_text())

    for i in range(CHURN_WARMUP, CHURN_WARMUP + CHURN_CYCLES):
        churn(i)
    mark = time.time()
    wait_until("converged after the churn", lambda: converged(mark), BOUND, world.procs())
    rss_after, view_after = rss_kib(agent.pid), kernel_view(agent.pid)

    assert view_after.progs == view_before.progs and view_after.maps == view_before.maps, (view_before, view_after)
    for name, (entries, bound) in view_after.lru.items():
        assert entries <= bound, (name, entries, bound)
    print(f"agent RSS after the warm-up {rss_before} KiB, after {CHURN_CYCLES} more pods {rss_after} KiB")
    assert abs(rss_after - rss_before) <= 0.10 * rss_before, (rss_before, rss_after)
    lines = agent.log.read_text()[log_at:].splitlines()
    # Per pod, at most one line per event: traced, its addresses changed (a namespace torn down while its
    # addresses were being read), dropped.
    events = Counter((m.group(2), m.group(1)) for line in lines
                     if (m := re.search(r": (tracing|addresses of|stopped tracing) \S+/(churn-\d+) ", line)))
    assert events and max(events.values()) == 1, events.most_common(5)
    assert sum(1 for _, kind in events if kind == "tracing") >= CHURN_CYCLES // 2, events  # the churn was seen
    others = [line for line in lines if not re.search(r": (tracing|addresses of|stopped tracing) \S+/churn-\d+ ", line)]
    assert not others, others[:10]
    assert agent.alive()


def test_a_node_deleted_and_recreated_under_its_name_gets_its_configuration_again(world):
    """The Node object of a node with a traced pod is deleted (its LatencyTraceNode, owned by it, goes with
    it: the garbage collector) and created again under the same name, with a new uid, the pod still bound
    to it (a kubelet re-registering its node, quicker than the pod garbage collector). The operator
    publishes the node's configuration again, owned by the new Node; the agent, the same process, stops
    tracing when its object goes and traces the pod again when it is back, saying each once; in the end
    there is one LatencyTraceNode for the node, owned by the new Node only, with the trace's one entry,
    and the trace counts the pod once."""
    [node] = world.nodes
    apply_trace(world, "web", {"podSelector": {"matchLabels": {"app": "web"}}})
    agent = world.start_agent(node)
    wait_until("the agent traces web", lambda: node_tracing(world, node, "web", 0), BOUND, world.procs())
    old_node_uid = kget(world.cp, "node", node)["metadata"]["uid"]
    old_ltn_uid = world.ltns()[node]["metadata"]["uid"]
    log_at = len(agent.log.read_text())

    world.cp.kubectl("delete", "node", node, "--wait=true", "--timeout=60s", timeout=70)
    wait_until("the garbage collector removed the node's LatencyTraceNode", lambda: node not in world.ltns(), 60,
               world.procs())
    wait_until("the agent stopped tracing web",
               lambda: "stopped tracing" in agent.log.read_text()[log_at:], 60, world.procs())
    world.cp.create_fake_nodes([node])
    back = time.time()
    new_node_uid = kget(world.cp, "node", node)["metadata"]["uid"]
    assert new_node_uid != old_node_uid

    wait_until("the operator published the node's configuration again",
               lambda: world.pods_on(node, "web") == ["web"], 90, world.procs())
    wait_until("the agent traces web again", lambda: node_tracing(world, node, "web", back), BOUND, world.procs())
    objs = [o for o in kget(world.cp, contract.NODE_PLURAL)["items"] if o["metadata"]["name"] == node]
    assert len(objs) == 1 and objs[0]["metadata"]["uid"] != old_ltn_uid
    assert [(r["kind"], r["uid"]) for r in objs[0]["metadata"]["ownerReferences"]] == [("Node", new_node_uid)]
    assert [t["name"] for t in objs[0]["spec"]["traces"]] == ["web"]
    wait_until("the trace counts web once, on one node",
               lambda: (lambda st: (st.get("tracedPods"), st.get("matchedPods"), st.get("matchedNodes")))(
                   world.trace("web").get("status", {})) == (1, 1, 1), 60, world.procs())
    said = lines_about(agent.log.read_text()[log_at:], "/web")
    assert [line.split(": ", 1)[1].split(" (")[0] for line in said] == \
        [f"stopped tracing {world.ns}/web", f"tracing {world.ns}/web"], said
    assert agent.alive() and world.agents[node] is agent
