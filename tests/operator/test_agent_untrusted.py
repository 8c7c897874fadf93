"""The in-cluster agent treats its LatencyTraceNode as untrusted: an entry it cannot use fails that trace
(its pods reported Failed with the reason), the other traces keep being traced, and the loop never ends.

Real everything: the agent's loop (NodeAgent.run) with its BPF programs on this kernel, pods as network
namespaces (tests/netlab.py), the LatencyTraceNode on the real API server, written as anyone with write
access to it could (what passes its schema reaches the agent).
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from latencytrace.node_agent import cluster, config as agent_config, contract
from latencytrace.node_agent.kube import api_client
from tests.netlab import NetLab

from .conftest import kget

pytest_plugins = ["tests.cluster.fixtures"]


def pod(p, uid: str, ip: str | None = None) -> dict:
    return {"namespace": "app", "name": p.name if hasattr(p, "name") else p, "uid": uid, "ips": [ip or p.ip]}


def entry(name: str, pods: list[dict], **extra) -> dict:
    return {"name": name, "namespace": "app", "uid": f"u-{name}", "directions": ["receive"], "pods": pods, **extra}


@pytest.fixture
def lab():
    with NetLab() as lab:
        yield lab


def test_bad_trace_entries_fail_alone_and_the_agent_keeps_running(control_plane, crds, lab, monkeypatch):
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "LATENCYTRACE_EXPORT_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    node = f"untrusted-{uuid.uuid4().hex[:6]}"
    good, bad_port = lab.add_pod("good"), lab.add_pod("badport")
    spec = {"nodeName": node, "traces": [
        entry("good", [pod(good, "u-good")]),
        # passes the LatencyTraceNode schema (digits), but no exporter can use the port
        entry("badport", [pod(bad_port, "u-badport")], export={"otlpEndpoint": "http://127.0.0.1:99999"}),
        entry("badip", [pod("ghost", "u-ghost", ip="10.0.0.300")]),  # a string, as the schema allows
    ]}
    control_plane.kubectl("create", "-f", "-", input=json.dumps({
        "apiVersion": contract.API_VERSION, "kind": contract.NODE_KIND, "metadata": {"name": node}, "spec": spec}))
    cfg = agent_config.AgentConfig.model_validate({
        "LATENCYTRACE_NODE_NAME": node, "KUBECONFIG": str(control_plane.kubeconfig), "interval_seconds": 1,
        "status_min_gap_seconds": 0.2, "retry_seconds": 1, "max_targets": 8,
        "health_port": 0})  # any free port: a real node's agent (or another test) may hold the default
    agent = cluster.NodeAgent(cfg, api_client(cfg.kubeconfig))
    stop, died = threading.Event(), []

    def run():
        try:
            agent.run(stop)
        except BaseException as e:  # the test's verdict: the loop must not end by itself
            died.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        states: dict = {}
        tracing_since = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not died:
            status = kget(control_plane, "ltn", node).get("status", {})
            states = {p["name"]: (p["state"], p.get("message", "")) for t in status.get("traces", []) for p in t["pods"]}
            if states.get("good", ("",))[0] == "Tracing" and tracing_since is None:
                tracing_since = time.monotonic()
            # a few intervals more: the bad trace's exporter would be built and reported on by now
            if tracing_since is not None and time.monotonic() - tracing_since > 5:
                break
            time.sleep(0.5)
        assert not died, f"the agent's loop ended: {died[0]!r}"
        assert states["good"][0] == "Tracing", states
        assert states["badport"][0] == "Failed" and "port 99999" in states["badport"][1], states
        assert states["ghost"][0] == "Failed" and "'10.0.0.300' is not an IP address" in states["ghost"][1], states
        assert thread.is_alive()
        [ready] = [c for c in status["conditions"] if c["type"] == "Ready"]
        assert ready["status"] == "True", ready
    finally:
        stop.set()
        agent.wake.set()
        thread.join(30)
        control_plane.kubectl("delete", "ltn", node, "--wait=false")
