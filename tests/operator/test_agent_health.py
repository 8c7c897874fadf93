"""The agent's health endpoint (node_agent/health.py) as the kubelet's probes see it: the real in-cluster
loop against the real API server, real BPF programs for a real network namespace.

Each wait is for a condition with a bound. Two seams hold the loop at a chosen point, both real code
paths: the agent's start (the BCC compile) waits for a gate, and a sink (every interval's publish goes
through the sinks) can block the loop the way a hung exporter would.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import threading
import time
import uuid

import pytest

from latencytrace.node_agent import cluster, contract, health
from latencytrace.node_agent.config import AgentConfig
from latencytrace.node_agent.contract import NodeSpec, NodeTrace, PodRef
from latencytrace.node_agent.kube import api_client
from tests.netlab import NetLab

from .conftest import BIN

pytest_plugins = ["tests.cluster.fixtures"]

BOUND = 120  # seconds: a BCC compile on a busy 2-core machine fits well within it


def get(port: int, path: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def wait_for(what: str, port: int, path: str, code: int, contains: str = "", timeout: float = BOUND) -> dict:
    """Poll `path` until it answers `code` with `contains` in its reason; that answer."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = get(port, path)
        if last[0] == code and contains in last[1]["reason"]:
            return last[1]
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}: {path} last answered {last}")


# -- the endpoint itself ----------------------------------------------------------------------------
def test_endpoints_answer_with_a_reason_and_survive_bad_requests():
    h = health.Health(stall_seconds=60, load_seconds=600)
    server = health.HealthServer(h, "127.0.0.1", 0).start()
    try:
        code, doc = get(server.port, "/startupz")
        assert (code, doc["ok"]) == (503, False) and "LatencyTraceNode has not been read yet" in doc["reason"]
        assert get(server.port, "/readyz")[0] == 503
        assert get(server.port, "/livez")[0] == 200
        assert get(server.port, "/metrics")[0] == 404
        with socket.create_connection(("127.0.0.1", server.port)) as s:  # not HTTP at all
            s.sendall(b"\x00\xff garbage\r\n\r\n")
            s.recv(1024)
        with socket.create_connection(("127.0.0.1", server.port)):
            pass  # connects and says nothing
        h.started()
        h.set_ready(True, "nothing to trace")
        assert get(server.port, "/startupz")[0] == 200
        assert get(server.port, "/readyz") == (200, {"ok": True, "reason": "nothing to trace"})
    finally:
        server.close()


def test_a_taken_port_is_a_clear_error_at_start():
    h = health.Health(stall_seconds=60, load_seconds=600)
    first = health.HealthServer(h, "127.0.0.1", 0).start()
    try:
        with pytest.raises(health.HealthError, match=f"127.0.0.1:{first.port}.*LATENCYTRACE_AGENT_HEALTH_PORT"):
            health.HealthServer(h, "127.0.0.1", first.port)
        assert get(first.port, "/livez")[0] == 200  # the first one is untouched
    finally:
        first.close()


def test_liveness_bounds_the_heartbeat_and_allows_a_long_load():
    now = [1000.0]
    h = health.Health(stall_seconds=90, load_seconds=600, clock=lambda: now[0])
    now[0] += 89
    assert h.liveness().ok
    now[0] += 2
    verdict = h.liveness()
    assert not verdict.ok and "last turned 91 s ago (allowed 90 s)" in verdict.reason
    with h.busy("loading the probes"):
        now[0] += 500
        assert h.liveness().ok and h.readiness() == health.Verdict(False, "loading the probes")
        now[0] += 101
        assert not h.liveness().ok
    assert h.liveness().ok  # the load ended: that was a turn


def test_the_liveness_bound_follows_the_loop_settings():
    cfg = AgentConfig(LATENCYTRACE_NODE_NAME="n1", status_seconds=60, interval_seconds=10, health_turn_seconds=30)
    assert cfg.liveness_seconds == 90
    assert AgentConfig(LATENCYTRACE_NODE_NAME="n1", status_seconds=5, interval_seconds=120).liveness_seconds == 150
    assert (cfg.health_address, cfg.health_port) == ("127.0.0.1", 9847)


def test_readiness_rule():
    r = dict(failure=None, wanted=False, loaded=False, pending=[], report_error=None, targets_n=0, attached_n=0)
    assert cluster.readiness(**r) == (True, "nothing to trace on this node; probes not loaded")
    assert cluster.readiness(**{**r, "wanted": True})[0] is False
    assert cluster.readiness(**{**r, "wanted": True, "loaded": True, "pending": ["net:net_dev_queue"]}) == \
        (False, "probes not attached yet: net:net_dev_queue")
    assert cluster.readiness(**{**r, "failure": ("TracerFailed", "no BTF")}) == (False, "TracerFailed: no BTF")
    assert cluster.readiness(**{**r, "report_error": "403 Forbidden"}) == \
        (False, "the last status report to the API server failed: 403 Forbidden")


# -- the real loop ------------------------------------------------------------------------------------
def node_object(node: str, spec: NodeSpec) -> str:
    return json.dumps({"apiVersion": contract.API_VERSION, "kind": contract.NODE_KIND, "metadata": {"name": node},
                       "spec": spec.wire()})


def agent_config(cp, node: str, **settings) -> AgentConfig:
    return AgentConfig(LATENCYTRACE_NODE_NAME=node, KUBECONFIG=str(cp.kubeconfig), health_port=0,
                       interval_seconds=1, status_seconds=2, status_min_gap_seconds=0.2, retry_seconds=0.5,
                       **settings)


@contextlib.contextmanager
def running(node_agent: cluster.NodeAgent):
    """The agent's main loop in a thread, as `latencytrace-agent run` runs it; stopped as SIGTERM does."""
    stop, failed = threading.Event(), []

    def run() -> None:
        try:
            node_agent.run(stop)
        except BaseException as e:  # handed to the test
            failed.append(e)

    thread = threading.Thread(target=run, name="node-agent", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while node_agent.health_server is None and not failed and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not failed, failed
        yield node_agent.health_server.port
    finally:
        stop.set()
        node_agent.wake.set()
        thread.join(60)
        assert not thread.is_alive(), "the agent did not stop"
    assert not failed, failed


class BlockingSink:
    """Blocks the loop's publish while `wedged` is set, as a hung exporter would."""

    def __init__(self) -> None:
        self.wedged, self.released = threading.Event(), threading.Event()

    def consume(self, interval) -> None:
        if self.wedged.is_set():
            self.released.wait(BOUND)

    def close(self) -> None:
        pass


def test_ready_only_once_the_probes_for_a_traced_pod_are_attached(control_plane, crds):
    node = f"health-{uuid.uuid4().hex[:6]}"
    control_plane.kubectl("create", "-f", "-", input=node_object(node, NodeSpec(node_name=node)))
    gate, sink = threading.Event(), BlockingSink()
    na = cluster.NodeAgent(agent_config(control_plane, node, health_turn_seconds=3),
                           api_client(str(control_plane.kubeconfig)))
    make = na._make_agent

    def gated_agent():
        """The real agent, whose start (the BCC compile) waits for the gate."""
        agent = make()
        agent.sinks.append(sink)
        start = agent.start

        def gated_start():
            assert gate.wait(BOUND), "the test never opened the gate"
            return start()

        agent.start = gated_start
        return agent

    na.make_agent = gated_agent
    try:
        with NetLab() as lab, running(na) as port:
            pod = lab.add_pod("web")
            # Startup, then ready with nothing to trace and nothing loaded.
            wait_for("startup", port, "/startupz", 200)
            wait_for("ready, idle", port, "/readyz", 200, "nothing to trace")
            assert get(port, "/livez")[0] == 200 and na.agent is None

            spec = NodeSpec(node_name=node, traces=[NodeTrace(name="t", namespace="app", uid="u-t", pods=[
                PodRef(namespace="app", name="web", uid=str(uuid.uuid4()), ips=[pod.ip])])])
            control_plane.kubectl("apply", "-f", "-", input=node_object(node, spec))
            # The loop is loading the probes (held at the gate): not ready, but alive and started.
            doc = wait_for("not ready while loading", port, "/readyz", 503, "loading the probes")
            assert not doc["ok"]
            assert get(port, "/livez")[0] == 200 and get(port, "/startupz")[0] == 200
            gate.set()
            doc = wait_for("ready once attached", port, "/readyz", 200, "1 pods traced")
            # Ready means the programs are attached, for a pod found in its real namespace.
            attached = {p.tracepoint for p in na.agent.tracer.status.attached}
            assert "net:netif_receive_skb" in attached and na.agent.tracer.pending() == []
            [st] = na.states.values()
            assert st.state == "Tracing" and st.target.ns.inode == pod.inode
            assert f"{len(attached)} tracepoints attached" in doc["reason"]

            # A wedged loop (its publish never returns) fails liveness once the bound has passed.
            bound = na.cfg.liveness_seconds
            sink.wedged.set()
            started = time.monotonic()
            doc = wait_for("liveness failing", port, "/livez", 503, "main loop stuck", timeout=bound + 30)
            assert time.monotonic() - started >= bound - na.cfg.interval_seconds - 0.5, doc
            sink.wedged.clear()
            sink.released.set()
            wait_for("liveness back", port, "/livez", 200, timeout=30)
    finally:
        gate.set()
        sink.released.set()
        control_plane.kubectl("delete", "ltn", node, "--wait=false", check=False)


def test_not_ready_with_a_reason_while_the_status_report_fails(control_plane, crds, namespace):
    """The agent's identity may read its LatencyTraceNode but not patch its status (a broken RBAC): the
    readiness probe says so; once the permission is granted, it is ready again."""
    node = f"health-{uuid.uuid4().hex[:6]}"
    sa, role = "agent", f"lt-health-read-{node}"
    control_plane.kubectl("create", "-f", "-", input=node_object(node, NodeSpec(node_name=node)))
    control_plane.kubectl("create", "serviceaccount", "-n", namespace, sa)
    control_plane.kubectl("create", "clusterrole", role, "--verb=get,list,watch", "--resource=latencytracenodes")
    control_plane.kubectl("create", "clusterrolebinding", role, f"--clusterrole={role}",
                          f"--serviceaccount={namespace}:{sa}")
    api = api_client(str(control_plane.kubeconfig))
    api.set_default_header("Impersonate-User", f"system:serviceaccount:{namespace}:{sa}")
    na = cluster.NodeAgent(agent_config(control_plane, node), api)
    try:
        with running(na) as port:
            wait_for("startup", port, "/startupz", 200)
            doc = wait_for("not ready: report refused", port, "/readyz", 503,
                           "the last status report to the API server failed: 403")
            assert "latencytracenodes/status" in doc["reason"]
            assert get(port, "/livez")[0] == 200  # the loop itself is fine: no restart
            control_plane.kubectl("create", "clusterrole", f"{role}-status", "--verb=patch",
                                  "--resource=latencytracenodes/status")
            control_plane.kubectl("create", "clusterrolebinding", f"{role}-status", f"--clusterrole={role}-status",
                                  f"--serviceaccount={namespace}:{sa}")
            wait_for("ready once the report succeeds", port, "/readyz", 200, "nothing to trace", timeout=60)
    finally:
        control_plane.kubectl("delete", "ltn", node, "--wait=false", check=False)
        for name in (role, f"{role}-status"):
            control_plane.kubectl("delete", "clusterrolebinding,clusterrole", name, "--ignore-not-found", check=False)


def test_the_agent_stops_at_start_with_a_clear_message_when_its_port_is_taken(tmp_path):
    kubeconfig = tmp_path / "kubeconfig"  # never contacted: the port is checked before the first request
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:9"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}], "users": [{"name": "u", "user": {}}]}))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {"PATH": os.environ["PATH"], "LATENCYTRACE_NODE_NAME": "n1", "KUBECONFIG": str(kubeconfig),
               "LATENCYTRACE_AGENT_HEALTH_PORT": str(port)}
        out = subprocess.run([str(BIN / "latencytrace-agent"), "run"], env=env, capture_output=True, text=True,
                             timeout=60)
    assert out.returncode == 2, out
    assert f"cannot serve the health endpoint on 127.0.0.1:{port}" in out.stderr
    assert "LATENCYTRACE_AGENT_HEALTH_PORT" in out.stderr and "Traceback" not in out.stderr
