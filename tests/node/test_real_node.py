"""latencytrace installed by `helm install` on a real node (containerd, runc, kubelet, kube-proxy, CNI
bridge), from the images built from the Dockerfile, tracing real pods placed by the scheduler.

What is checked is what the node shows: process credentials in /proc, BPF programs in the kernel,
containers in the runtime, and the data that reached the OTLP backend (Jaeger, its metrics endpoint).
"""

from __future__ import annotations

import json
import os

from tests.cluster.local import NAMESPACE

from .conftest import (agent_pod, apply_trace, container_pid, kget, loaded_progs, netns_inode, pod_ready,
                       progs_of, run_client, start_server, status_field, tracing_pods, wait_for)

# Capability bits (linux/capability.h) the chart grants the agent by default, and nothing else.
CAP_SYS_PTRACE, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 19, 21, 38, 39
AGENT_CAPS = (1 << CAP_SYS_PTRACE) | (1 << CAP_SYS_ADMIN) | (1 << CAP_PERFMON) | (1 << CAP_BPF)
TRACE_SPEC = {"podSelector": {"matchLabels": {"app": "server"}}, "slowThresholdMicroseconds": 1,
              "spansPerSecond": 50, "duration": "1h"}


def operator_pod(cluster) -> dict:
    pods = kget(cluster, "pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=operator")["items"]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    return pods[0]


def root_is_read_only(pid: int) -> bool:
    for line in open(f"/proc/{pid}/mountinfo"):
        fields = line.split()
        if fields[4] == "/":
            return "ro" in fields[5].split(",")
    raise AssertionError(f"no root mount in /proc/{pid}/mountinfo")


def test_operator_runs_unprivileged(installed):
    pod = operator_pod(installed)
    assert pod_ready(pod)
    pid = container_pid(installed, pod["metadata"]["name"], NAMESPACE, "operator")
    assert status_field(pid, "Uid").split() == ["65532"] * 4
    assert int(status_field(pid, "CapEff"), 16) == 0 and int(status_field(pid, "CapBnd"), 16) == 0
    assert status_field(pid, "NoNewPrivs") == "1"
    assert root_is_read_only(pid)


def test_agent_runs_with_exactly_the_granted_capabilities(installed):
    pod = agent_pod(installed)
    pid = container_pid(installed, pod["metadata"]["name"], NAMESPACE, "agent")
    assert int(status_field(pid, "CapEff"), 16) == AGENT_CAPS  # not privileged: no other capability
    assert int(status_field(pid, "CapBnd"), 16) == AGENT_CAPS
    # The host's PID and network namespaces, which this test runs in (pods are found through /proc; NICs
    # through /sys/class/net).
    for ns in ("net", "pid"):
        assert os.stat(f"/proc/{pid}/ns/{ns}").st_ino == os.stat(f"/proc/self/ns/{ns}").st_ino
    assert root_is_read_only(pid)


def test_real_pod_is_traced_and_its_data_reaches_the_backend(installed, namespace):
    server = start_server(installed, "server", namespace, {"app": "server"})
    uid, ip = server["metadata"]["uid"], server["status"]["podIP"]
    apply_trace(installed, namespace, "web", TRACE_SPEC)
    pods = wait_for("the agent to trace the server pod", lambda: tracing_pods(installed, namespace, "web"))
    assert set(pods) == {uid}
    # Found by its UID in the real container cgroup paths: the namespace of the server's process.
    server_pid = container_pid(installed, "server", namespace, "server")
    assert pods[uid]["netnsInode"] == netns_inode(server_pid)

    agent = agent_pod(installed)
    agent_pid = container_pid(installed, agent["metadata"]["name"], NAMESPACE, "agent")
    assert progs_of(agent_pid), "the agent holds no BPF program while tracing"
    wait_for("the agent pod to be Ready while tracing", lambda: pod_ready(agent_pod(installed)), 60)

    for protocol in ("tcp", "udp"):
        summary = run_client(installed, namespace, ip, protocol, count=400, rate=200)
        assert summary["received"] == summary["sent"] == 400, summary

    # Per-segment histograms of that pod, with its real identity (its resource), in Prometheus behind the
    # collector: native histograms, counted per segment.
    def series() -> dict[str, float]:
        counts = installed.prometheus.values(
            "histogram_count(latencytrace_network_stack_duration_seconds"
            f'{{k8s_pod_uid="{uid}",k8s_pod_name="server",k8s_namespace_name="{namespace}"}})',
            by="latencytrace_segment")
        # Every request crosses the pod's stack, and every echo leaves it.
        return counts if min(counts.get("rx_pod_stack", 0), counts.get("tx_total", 0)) >= 800 else {}

    counts = wait_for("the server's histograms at the backend", series, timeout=60)
    assert counts["rx_host_to_pod"] >= 800 and counts["rx_socket_queue"] > 0, counts

    # A slow packet of that pod as a trace: a root span and one child per segment.
    def slow_trace():
        for trace in installed.jaeger.find_traces("latencytrace-agent", limit=50,
                                                  tags=json.dumps({"k8s.pod.uid": uid})):
            if len(trace["spans"]) >= 3:
                return trace
        return None

    trace = wait_for("a slow packet of the server in Jaeger", slow_trace, timeout=60)
    root = max(trace["spans"], key=lambda s: s["duration"])
    children = [s for s in trace["spans"] if s is not root]
    assert all(any(r["spanID"] == root["spanID"] for r in s["references"]) for s in children)


def test_recreated_pod_is_traced_again_without_an_agent_restart(installed, namespace):
    first = start_server(installed, "server", namespace, {"app": "server"})
    apply_trace(installed, namespace, "web", TRACE_SPEC)
    wait_for("the first pod traced", lambda: first["metadata"]["uid"] in tracing_pods(installed, namespace, "web"))
    restarts = agent_pod(installed)["status"]["containerStatuses"][0]["restartCount"]

    installed.cp.kubectl("delete", "pod", "-n", namespace, "server", "--wait=true", "--timeout=60s")
    second = start_server(installed, "server", namespace, {"app": "server"})
    uid = second["metadata"]["uid"]
    assert uid != first["metadata"]["uid"]
    pods = wait_for("the re-created pod traced", lambda: tracing_pods(installed, namespace, "web")
                    if set(tracing_pods(installed, namespace, "web")) == {uid} else None)
    assert pods[uid]["netnsInode"] == netns_inode(container_pid(installed, "server", namespace, "server"))
    assert agent_pod(installed)["status"]["containerStatuses"][0]["restartCount"] == restarts


def test_agent_killed_by_the_runtime_is_restarted_and_tracing_resumes(installed, namespace):
    server = start_server(installed, "server", namespace, {"app": "server"})
    uid = server["metadata"]["uid"]
    apply_trace(installed, namespace, "web", TRACE_SPEC)
    wait_for("the pod traced", lambda: uid in tracing_pods(installed, namespace, "web"))
    pod = agent_pod(installed)
    name, restarts = pod["metadata"]["name"], pod["status"]["containerStatuses"][0]["restartCount"]
    old_pid = container_pid(installed, name, NAMESPACE, "agent")
    old_progs = progs_of(old_pid)
    assert old_progs

    container = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    installed.node.crictl("stop", "--timeout", "0", container)  # SIGKILL, through the runtime

    wait_for("the kubelet to restart the agent", lambda: agent_pod(installed)["status"]["containerStatuses"][0]
             ["restartCount"] > restarts, 120)
    # The dead process's programs are gone from the kernel (nothing pinned, nothing leaked).
    wait_for("the killed agent's programs to leave the kernel", lambda: not (old_progs & loaded_progs()), 30)
    wait_for("the restarted agent ready", lambda: pod_ready(agent_pod(installed)), 120)
    new_pid = container_pid(installed, name, NAMESPACE, "agent")
    assert new_pid != old_pid
    wait_for("tracing to resume", lambda: uid in tracing_pods(installed, namespace, "web") and progs_of(new_pid))
