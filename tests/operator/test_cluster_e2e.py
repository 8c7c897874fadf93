"""End to end on a real control plane: the operator and one real agent per (kwok) node run as host
processes; the "pods" are real network namespaces on this machine (tests/netlab.py), their IPs written
into the pods' status so that the agents find them the way they find any pod: by pod IP.

The tests run in order and share one world: a trace over pods on two of three nodes, then an operator
restart, a pod deletion, a trace that expires, and the trace's deletion.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from latencytrace.node_agent import contract
from tests.cluster.procs import Proc, free_port, wait_until
from tests.netlab import NetLab

from .conftest import BIN, kget

pytest_plugins = ["tests.cluster.fixtures"]


class World:
    def __init__(self, cp, tmp: Path, namespace: str, nodes: list[str], lab: NetLab):
        self.cp, self.tmp, self.ns, self.nodes, self.lab = cp, tmp, namespace, nodes, lab
        self.operator: Proc | None = None
        self.agents: dict[str, Proc] = {}
        self.pods: dict[str, str] = {}  # pod name -> node

    def start_operator(self, n: int) -> Proc:
        self.operator = Proc(f"operator-{n}", [str(BIN / "latencytrace-operator")], self.tmp / f"operator-{n}.log",
                             env=self.cp.process_env(LATENCYTRACE_OPERATOR_NAMESPACE=self.ns,
                                                     LATENCYTRACE_OPERATOR_LEASE_NAME="e2e-operator",
                                                     LATENCYTRACE_OPERATOR_IDENTITY=f"operator-{n}",
                                                     LATENCYTRACE_OPERATOR_HEALTH_PORT=str(free_port()),
                                                     LATENCYTRACE_OPERATOR_STATUS_INTERVAL_SECONDS="1",
                                                     LATENCYTRACE_OPERATOR_DEBOUNCE_SECONDS="0.2",
                                                     LATENCYTRACE_OPERATOR_AGENT_STALE_SECONDS="60"),
                             cwd=self.tmp)
        wait_until("operator leading", lambda: "leading (Lease" in self.operator.log.read_text(), 60, [self.operator])
        return self.operator

    def start_agent(self, node: str) -> Proc:
        proc = Proc(f"agent-{node}", [str(BIN / "latencytrace-agent"), "--log-level", "INFO", "run"],
                    self.tmp / f"agent-{node}.log",
                    env=self.cp.process_env(LATENCYTRACE_NODE_NAME=node, LATENCYTRACE_AGENT_INTERVAL_SECONDS="2",
                                            LATENCYTRACE_AGENT_STATUS_SECONDS="5", LATENCYTRACE_AGENT_STATUS_MIN_GAP_SECONDS="0.5",
                                            LATENCYTRACE_AGENT_RETRY_SECONDS="1",
                                            LATENCYTRACE_AGENT_HEALTH_PORT="0"),  # agents side by side
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
        return [p for p in (self.operator, *self.agents.values()) if p is not None]


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
    w = World(cp, tmp_path_factory.mktemp("e2e"), ns, nodes, lab)
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
        for p in w.procs():
            p.stop()
        cp.kubectl("delete", "lt", "--all", "-n", ns, "--wait=false", check=False)
        cp.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        cp.kubectl("delete", "node", *nodes, "--wait=false", check=False)
        lab.close()


def test_trace_configures_exactly_the_nodes_with_selected_pods(world):
    apply_trace(world, "web", {"podSelector": {"matchLabels": {"app": "web"}}})
    n0, n1, n2 = world.nodes
    wait_until("node configuration published",
               lambda: world.pods_on(n0, "web") == ["web-a"] and world.pods_on(n1, "web") == ["web-b", "web-c"],
               30, world.procs())
    assert set(world.ltns()) == {n0, n1}  # nothing for the node without a selected pod
    entry = world.ltns()[n1]["spec"]["traces"][0]
    assert {p["name"]: p["ips"] for p in entry["pods"]} == {"web-b": [world.lab.pods["web-b"].ip],
                                                           "web-c": [world.lab.pods["web-c"].ip]}


def test_pods_in_real_namespaces_are_traced_end_to_end(world):
    def traced() -> bool:
        st = world.trace("web").get("status", {})
        return st.get("tracedPods") == 3 and st.get("nodes", {}).get("tracing") == 2 and st.get("phase") == "Tracing"

    wait_until("trace status shows 3 pods on 2 nodes traced", traced, 90, world.procs())
    status = world.trace("web")["status"]
    assert status["matchedPods"] == 3 and status["matchedNodes"] == 2 and status["nodes"]["failing"] == 0
    # Each agent traces the very namespace that holds the pod's IP on this machine.
    for node, obj in world.ltns().items():
        [report] = obj["status"]["traces"]
        for pod in report["pods"]:
            assert pod["state"] == "Tracing"
            assert pod["netnsInode"] == world.lab.pods[pod["name"]].inode
        ready = {c["type"]: c for c in obj["status"]["conditions"]}["Ready"]
        assert ready["status"] == "True" and obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    assert "tracing" not in world.agents[world.nodes[2]].log.read_text()  # the third agent traces nothing


def test_operator_restart_changes_nothing(world):
    before = {n: (o["metadata"]["generation"], o["spec"]) for n, o in world.ltns().items()}
    status = world.trace("web")["status"]
    world.operator.stop()
    world.start_operator(2)
    time.sleep(5)  # several status refreshes and a full resync of the trace's pods
    after = {n: (o["metadata"]["generation"], o["spec"]) for n, o in world.ltns().items()}
    assert after == before
    new = world.trace("web")["status"]
    assert new["conditions"] == status["conditions"] and new["startTime"] == status["startTime"]
    assert new["tracedPods"] == 3


def test_deleting_a_selected_pod_removes_it_from_its_agent(world):
    n1 = world.nodes[1]
    world.cp.kubectl("delete", "-n", world.ns, "pod", "web-c", "--wait=true", "--timeout=60s", timeout=70)
    wait_until("web-c unpublished", lambda: world.pods_on(n1, "web") == ["web-b"], 30, world.procs())
    wait_until("agent stopped tracing web-c",
               lambda: f"stopped tracing {world.ns}/web-c" in world.agents[n1].log.read_text(), 30, world.procs())
    wait_until("status shows 2 pods", lambda: world.trace("web")["status"].get("tracedPods") == 2, 30, world.procs())
    assert "web-a" in world.pods_on(world.nodes[0], "web")  # the other node is untouched


def test_duration_expiry_completes_the_trace(world):
    n0 = world.nodes[0]
    apply_trace(world, "short", {"podNames": ["web-a"], "duration": "10s", "directions": ["receive"]})
    wait_until("short trace published", lambda: world.pods_on(n0, "short") == ["web-a"], 30, world.procs())
    wait_until("short trace completed", lambda: world.trace("short").get("status", {}).get("phase") == "Completed",
               40, world.procs())
    status = world.trace("short")["status"]
    completed = {c["type"]: c for c in status["conditions"]}["Completed"]
    assert completed["status"] == "True" and completed["reason"] == "DurationExpired"
    assert status["completionTime"] >= status["startTime"] and status["tracedPods"] == 0
    wait_until("short trace removed from the node", lambda: world.pods_on(n0, "short") == [], 30, world.procs())
    assert world.pods_on(n0, "web") == ["web-a"]  # the other trace on that node goes on


def test_deleting_the_trace_detaches_everything(world):
    world.cp.kubectl("delete", "-n", world.ns, "lt", "web", "short", "--timeout=60s", timeout=70)
    wait_until("every node configuration gone", lambda: world.ltns() == {}, 30, world.procs())
    for node, pod in ((world.nodes[0], "web-a"), (world.nodes[1], "web-b")):
        wait_until(f"agent of {node} detached", lambda node=node, pod=pod: f"stopped tracing {world.ns}/{pod}"
                   in world.agents[node].log.read_text(), 30, world.procs())
