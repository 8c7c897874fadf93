"""End to end on a real control plane: the operator and one real agent per (kwok) node run as host
processes; the "pods" are real network namespaces on this machine (tests/netlab.py), their IPs written
into the pods' status so that the agents find them the way they find any pod: by pod IP.

One scenario on one world, in named steps: a trace over pods on two of three nodes, packets through a
traced pod to an OTLP backend, an operator restart, a pod deletion, a trace that expires, an agent
stopped with SIGTERM, and the trace's deletion; the trace's summary Ready condition along the way, and
a trace exporting to a destination that is down (probes detached, then unloaded, as the kernel shows
it). A failure names its step.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

from latencytrace.node_agent import contract
from latencytrace.node_agent.export.metrics import LATENCY
from tests.agent.kernel import attached_tracepoints, bpftool, prog_ids_of
from tests.cluster.procs import Proc, free_port, wait_until
from tests.export.receiver import Receiver
from tests.netlab import NetLab

from .conftest import BIN, kget

pytest_plugins = ["tests.cluster.fixtures"]


class World:
    def __init__(self, cp, tmp: Path, namespace: str, nodes: list[str], lab: NetLab, receiver: Receiver):
        self.cp, self.tmp, self.ns, self.nodes, self.lab, self.receiver = cp, tmp, namespace, nodes, lab, receiver
        self.operator: Proc | None = None
        self.agents: dict[str, Proc] = {}
        self.pods: dict[str, str] = {}  # pod name -> node

    def start_operator(self, n: int, *, lead: bool = True, **env: str) -> Proc:
        """Operator number `n`; waits until it leads (lead=False: until it waits to lead, as a standby)."""
        proc = Proc(f"operator-{n}", [str(BIN / "latencytrace-operator")], self.tmp / f"operator-{n}.log",
                    env=self.cp.process_env(LATENCYTRACE_OPERATOR_NAMESPACE=self.ns,
                                            LATENCYTRACE_OPERATOR_LEASE_NAME="e2e-operator",
                                            LATENCYTRACE_OPERATOR_IDENTITY=f"operator-{n}",
                                            LATENCYTRACE_OPERATOR_HEALTH_PORT=str(free_port()),
                                            LATENCYTRACE_OPERATOR_STATUS_INTERVAL_SECONDS="1",
                                            LATENCYTRACE_OPERATOR_DEBOUNCE_SECONDS="0.2",
                                            LATENCYTRACE_OPERATOR_AGENT_STALE_SECONDS="60", **env),
                    cwd=self.tmp)
        if not lead:
            wait_until("operator waiting to lead", lambda: "waiting to lead" in proc.log.read_text(), 60, [proc])
            return proc
        self.operator = proc
        wait_until("operator leading", lambda: "leading (Lease" in proc.log.read_text(), 60, [proc])
        return proc

    def start_agent(self, node: str) -> Proc:
        proc = Proc(f"agent-{node}", [str(BIN / "latencytrace-agent"), "--log-level", "INFO", "run"],
                    self.tmp / f"agent-{node}.log",
                    env=self.cp.process_env(LATENCYTRACE_NODE_NAME=node, LATENCYTRACE_AGENT_INTERVAL_SECONDS="1",
                                            LATENCYTRACE_AGENT_STATUS_SECONDS="5", LATENCYTRACE_AGENT_STATUS_MIN_GAP_SECONDS="0.5",
                                            LATENCYTRACE_AGENT_RETRY_SECONDS="1", LATENCYTRACE_AGENT_IDLE_UNLOAD_SECONDS="4",
                                            LATENCYTRACE_AGENT_HEALTH_PORT="0",  # agents side by side
                                            OTEL_EXPORTER_OTLP_ENDPOINT=self.receiver.grpc_endpoint),
                    cwd=self.tmp)
        self.agents[node] = proc
        return proc

    def add_pod(self, name: str, node: str, labels: dict[str, str]) -> None:
        """A pod bound to `node` whose IP is the address of a real namespace on this machine."""
        lab_pod = self.lab.add_pod(name)
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
               "spec": {"nodeName": node, "containers": [{"name": "c", "image": "example.invalid/app:1"}]}}
        self.cp.kubectl("create", "-n", self.ns, "-f", "-", input=json.dumps(pod))
        self.cp.kubectl("wait", "-n", self.ns, "--for=jsonpath={.status.phase}=Running", f"pod/{name}",
                        "--timeout=60s", timeout=70)
        self.cp.kubectl("patch", "-n", self.ns, "pod", name, "--subresource=status", "--type=merge", "-p",
                        json.dumps({"status": {"podIP": lab_pod.ip, "podIPs": [{"ip": lab_pod.ip}]}}))
        self.pods[name] = node

    def remove_pod(self, name: str) -> None:
        """What a kubelet does when a pod goes: its network namespace (and veth) deleted, then the object."""
        self.lab.remove_pod(name)
        self.cp.kubectl("delete", "-n", self.ns, "pod", name, "--wait=false")
        self.pods.pop(name, None)

    def ltns(self) -> dict[str, dict]:
        items = kget(self.cp, contract.NODE_PLURAL)["items"]
        return {o["metadata"]["name"]: o for o in items if o["metadata"]["name"] in self.nodes}

    def trace(self, name: str) -> dict:
        return kget(self.cp, "-n", self.ns, "lt", name)

    def pods_on(self, node: str, trace_name: str) -> list[str]:
        obj = self.ltns().get(node)
        traces = obj["spec"]["traces"] if obj else []
        return sorted(p["name"] for t in traces if t["name"] == trace_name for p in t["pods"])

    def procs(self) -> list[Proc]:
        return [p for p in (self.operator, *self.agents.values()) if p is not None and p.alive()]

    def condition(self, node: str, kind: str) -> dict:
        obj = self.ltns().get(node) or {}
        return {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}.get(kind, {})

    def exported_count(self, pod: str, segment: str) -> int:
        """The newest cumulative count the OTLP backend has for (pod, segment)."""
        points = [p for r, a, p in self.receiver.data_points(LATENCY.name)  # the pod is the resource
                  if r.get("k8s.pod.name") == pod and a.get("latencytrace.segment") == segment]
        return max(points, key=lambda p: p.time_unix_nano).count if points else 0

    def close(self) -> None:
        """Stop every process this world started and remove what it made: its traces, namespace, nodes and
        their LatencyTraceNodes, the OTLP backend running now (a test may have replaced it), the lab."""
        for p in self.procs():
            p.stop()
        self.cp.kubectl("delete", "lt", "--all", "-n", self.ns, "--wait=false", check=False)
        self.cp.kubectl("delete", "namespace", self.ns, "--wait=false", check=False)
        self.cp.kubectl("delete", "ltn", *self.nodes, "--wait=false", check=False)
        self.cp.kubectl("delete", "node", *self.nodes, "--wait=false", check=False)
        self.receiver.stop()
        self.lab.close()


def apply_trace(world: World, name: str, spec: dict) -> None:
    body = {"apiVersion": contract.API_VERSION, "kind": contract.TRACE_KIND, "metadata": {"name": name}, "spec": spec}
    world.cp.kubectl("apply", "-n", world.ns, "-f", "-", input=json.dumps(body))


@pytest.fixture(scope="module")
def world(control_plane, crds, tmp_path_factory):
    cp = control_plane
    ns = f"e2e-{os.getpid()}"
    cp.kubectl("create", "namespace", ns)
    nodes = cp.create_fake_nodes([f"e2e-{os.getpid()}-{i}" for i in range(3)])
    lab = NetLab()
    receiver = Receiver().start()
    w = World(cp, tmp_path_factory.mktemp("e2e"), ns, nodes, lab, receiver)
    try:
        w.add_pod("web-a", nodes[0], {"app": "web"})
        w.add_pod("web-b", nodes[1], {"app": "web"})
        w.add_pod("web-c", nodes[1], {"app": "web"})
        w.add_pod("db", nodes[2], {"app": "db"})  # on the third node, not selected
        w.start_operator(1)
        for node in nodes:
            w.start_agent(node)
        yield w
    finally:
        w.close()


@contextlib.contextmanager
def step(name: str):
    """One named step of the scenario: a failure says which."""
    try:
        yield
    except BaseException as e:
        raise AssertionError(f"step '{name}' failed: {e}") from e


def test_scenario(world):
    with step("a trace configures exactly the nodes with selected pods"):
        configures_exactly_the_nodes_with_selected_pods(world)
    with step("pods in real namespaces are traced, their packets exported"):
        programs = traced_end_to_end(world)
    with step("a trace exporting to a destination that is down shows it in its status"):
        a_destination_that_is_down_shows_in_the_status(world)
    with step("an operator restart changes nothing"):
        operator_restart_changes_nothing(world)
    with step("deleting a selected pod removes it from its agent"):
        deleting_a_selected_pod_removes_it_from_its_agent(world)
    with step("a trace's duration expires"):
        duration_expiry_completes_the_trace(world)
    with step("an agent stopped with SIGTERM reports Ready=False, Stopped; the trace is not Ready"):
        sigterm_reports_stopped(world)
    with step("deleting the trace detaches, then unloads, every probe"):
        deleting_the_trace_detaches_everything(world, programs)


def configures_exactly_the_nodes_with_selected_pods(world):
    apply_trace(world, "web", {"podSelector": {"matchLabels": {"app": "web"}}})
    n0, n1, n2 = world.nodes
    wait_until("node configuration published",
               lambda: world.pods_on(n0, "web") == ["web-a"] and world.pods_on(n1, "web") == ["web-b", "web-c"],
               30, world.procs())
    assert set(world.ltns()) == {n0, n1}  # nothing for the node without a selected pod
    entry = world.ltns()[n1]["spec"]["traces"][0]
    assert {p["name"]: p["ips"] for p in entry["pods"]} == {"web-b": [world.lab.pods["web-b"].ip],
                                                           "web-c": [world.lab.pods["web-c"].ip]}


def traced_end_to_end(world) -> dict[str, set[int]]:
    """The status says the three pods are traced; datagrams read in web-a reach the OTLP backend as its
    histograms; each tracing agent holds programs with links in the kernel. Returns each agent's
    program ids (what the last step checks are gone)."""
    def traced() -> bool:
        st = world.trace("web").get("status", {})
        return st.get("tracedPods") == 3 and st.get("nodes", {}).get("tracing") == 2 and st.get("phase") == "Tracing"

    wait_until("trace status shows 3 pods on 2 nodes traced", traced, 90, world.procs())
    # The summary condition, as GitOps tools and scripts wait for it.
    world.cp.kubectl("wait", "-n", world.ns, "--for=condition=Ready", "lt/web", "--timeout=30s", timeout=40)
    status = world.trace("web")["status"]
    ready = {c["type"]: c for c in status["conditions"]}["Ready"]
    assert (ready["reason"], ready["observedGeneration"]) == ("AllPodsTraced", world.trace("web")["metadata"]["generation"])
    assert status["matchedPods"] == 3 and status["matchedNodes"] == 2 and status["nodes"]["failing"] == 0
    # Each agent traces the very namespace that holds the pod's IP on this machine.
    for node, obj in world.ltns().items():
        [report] = obj["status"]["traces"]
        for pod in report["pods"]:
            assert pod["state"] == "Tracing"
            assert pod["netnsInode"] == world.lab.pods[pod["name"]].inode
        ready = {c["type"]: c for c in obj["status"]["conditions"]}["Ready"]
        assert ready["status"] == "True" and obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    n2 = world.nodes[2]
    assert not prog_ids_of(world.agents[n2].pid)  # the third agent traces nothing: it loaded nothing
    # Packets: through the bridge into web-a, read by its application, counted on its histograms.
    a, client = world.lab.pods["web-a"], world.lab.add_pod("client")
    with a.serve("udp-recv", "--port", "9800", "--count", "300", "--timeout", "20") as rx:
        client.traffic("udp-send", "--to", a.ip, "--port", "9800", "--count", "300", "--rate", "2000")
    assert rx.result == {"received": 300}
    wait_until("web-a's histograms exported", lambda: world.exported_count("web-a", "rx_socket_queue") == 300,
               30, world.procs())
    assert world.exported_count("web-a", "rx_pod_stack") == 300
    programs = {}
    for node in world.nodes[:2]:
        ids = prog_ids_of(world.agents[node].pid)
        assert ids and attached_tracepoints(ids), f"agent of {node} has no program attached"
        programs[node] = ids
    return programs


def a_destination_that_is_down_shows_in_the_status(world):
    """A second trace over web-a names its own endpoint, where nothing listens: web-a's agent reports that
    destination failing and the trace's status shows it (and `kubectl describe`); the first trace's
    destination, the agents' default (the receiver), stays healthy on both its nodes."""
    n0 = world.nodes[0]
    down = f"http://127.0.0.1:{free_port()}"
    apply_trace(world, "down", {"podNames": ["web-a"], "export": {"otlpEndpoint": down}})

    def destinations(name: str) -> list[dict]:
        return world.trace(name).get("status", {}).get("export", {}).get("destinations", [])

    wait_until("the down destination reported failing",
               lambda: [d.get("healthy") for d in destinations("down")] == [False], 90, world.procs())
    (d,) = destinations("down")
    assert (d["endpoint"], d["default"], d["nodes"], d["unhealthyNodes"]) == (down, False, 1, 1), d
    assert d["droppedBatches"] >= 1 and d["lastError"].startswith(f"{n0}: "), d
    (web,) = destinations("web")
    assert (web["endpoint"], web["default"], web["healthy"], web["nodes"]) == \
        (world.receiver.grpc_endpoint, True, True, 2), web
    described = world.cp.kubectl("describe", "-n", world.ns, "lt", "down").stdout
    assert down in described and "Unhealthy Nodes:" in described, described
    world.cp.kubectl("delete", "-n", world.ns, "lt", "down", "--timeout=60s", timeout=70)
    wait_until("the down trace removed from its node", lambda: world.pods_on(n0, "down") == [], 30, world.procs())


def operator_restart_changes_nothing(world):
    """The new operator has reconciled when it publishes a pod that appeared while it started (web-d,
    on the third node); by then what it re-derived for the other nodes is written, and must be what was
    there: same generation, same spec, conditions that did not flip."""
    n0, n1, n2 = world.nodes
    before = {n: (o["metadata"]["generation"], o["spec"]) for n, o in world.ltns().items()}
    assert set(before) == {n0, n1}
    status = world.trace("web")["status"]
    world.operator.stop()
    world.start_operator(2)
    world.add_pod("web-d", n2, {"app": "web"})
    wait_until("the new operator published web-d", lambda: world.pods_on(n2, "web") == ["web-d"], 60, world.procs())
    wait_until("the new operator's status counts web-d",
               lambda: world.trace("web").get("status", {}).get("tracedPods") == 4, 60, world.procs())
    after = {n: (o["metadata"]["generation"], o["spec"]) for n, o in world.ltns().items() if n != n2}
    assert after == before
    new = world.trace("web")["status"]
    # Ready is left out: it rightly went False while web-d (the sentinel) was not yet traced.
    flips = {c["type"]: c["lastTransitionTime"] for c in status["conditions"] if c["type"] != "Ready"}
    assert {c["type"]: c["lastTransitionTime"] for c in new["conditions"] if c["type"] != "Ready"} == flips
    world.cp.kubectl("wait", "-n", world.ns, "--for=condition=Ready", "lt/web", "--timeout=30s", timeout=40)
    assert new["startTime"] == status["startTime"]


def deleting_a_selected_pod_removes_it_from_its_agent(world):
    n1 = world.nodes[1]
    world.cp.kubectl("delete", "-n", world.ns, "pod", "web-c", "--wait=true", "--timeout=60s", timeout=70)
    wait_until("web-c unpublished", lambda: world.pods_on(n1, "web") == ["web-b"], 30, world.procs())
    wait_until("agent stopped tracing web-c",
               lambda: f"stopped tracing {world.ns}/web-c" in world.agents[n1].log.read_text(), 30, world.procs())
    wait_until("status shows 3 pods", lambda: world.trace("web")["status"].get("tracedPods") == 3, 30, world.procs())
    assert "web-a" in world.pods_on(world.nodes[0], "web")  # the other node is untouched


def duration_expiry_completes_the_trace(world):
    n0 = world.nodes[0]
    apply_trace(world, "short", {"podNames": ["web-a"], "duration": "10s", "directions": ["receive"]})
    wait_until("short trace published", lambda: world.pods_on(n0, "short") == ["web-a"], 30, world.procs())
    wait_until("short trace completed", lambda: world.trace("short").get("status", {}).get("phase") == "Completed",
               40, world.procs())
    status = world.trace("short")["status"]
    completed = {c["type"]: c for c in status["conditions"]}["Completed"]
    assert completed["status"] == "True" and completed["reason"] == "DurationExpired"
    ready = {c["type"]: c for c in status["conditions"]}["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "Completed"), ready  # a finished trace traces nothing
    assert status["completionTime"] >= status["startTime"] and status["tracedPods"] == 0
    wait_until("short trace removed from the node", lambda: world.pods_on(n0, "short") == [], 30, world.procs())
    assert world.pods_on(n0, "web") == ["web-a"]  # the other trace on that node goes on


def sigterm_reports_stopped(world):
    """The agent of the third node (tracing web-d) stops on SIGTERM and says so in its node's status."""
    n2 = world.nodes[2]
    wait_until("web-d traced", lambda: world.condition(n2, "Ready").get("status") == "True", 30, world.procs())
    held = prog_ids_of(world.agents[n2].pid)
    assert held
    world.agents[n2].stop()  # SIGTERM to its process group
    assert world.agents[n2].popen.returncode == 0, world.agents[n2].tail()
    ready = world.condition(n2, "Ready")
    assert (ready.get("status"), ready.get("reason")) == ("False", "Stopped"), ready
    # Its programs go with it. The kernel drops a raw tracepoint link's hold on its program only after an
    # RCU grace period, so the ids can outlive the process by a moment: wait, bounded.
    wait_until("the stopped agent's programs gone", lambda: not held & {p["id"] for p in bpftool("prog", "show")},
               10, world.procs())
    # web-d is no longer traced: the trace is not Ready, and says why.
    world.cp.kubectl("wait", "-n", world.ns, "--for=condition=Ready=false", "lt/web", "--timeout=30s", timeout=40)
    trace_ready = {c["type"]: c for c in world.trace("web")["status"]["conditions"]}["Ready"]
    assert trace_ready["reason"] == "PodsPending" and "2 of 3 pods traced" in trace_ready["message"], trace_ready


def deleting_the_trace_detaches_everything(world, programs: dict[str, set[int]]):
    """Once the trace is gone, each agent's programs lose their links (detached: nothing is paid per
    packet), then, idle for LATENCYTRACE_AGENT_IDLE_UNLOAD_SECONDS, are unloaded while the agent runs on."""
    world.cp.kubectl("delete", "-n", world.ns, "lt", "web", "short", "--timeout=60s", timeout=70)
    wait_until("every node configuration gone", lambda: world.ltns() == {}, 30, world.procs())
    for node, ids in programs.items():
        wait_until(f"agent of {node} detached", lambda ids=ids: not attached_tracepoints(ids), 30, world.procs())
    for node, ids in programs.items():
        wait_until(f"agent of {node} unloaded its programs",
                   lambda ids=ids: not ids & {p["id"] for p in bpftool("prog", "show")}, 30, world.procs())
        assert world.agents[node].alive()
