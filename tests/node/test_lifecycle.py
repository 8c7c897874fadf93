"""The release's life on a real node, as one scenario with named steps (each step needs the one before):
`helm upgrade` that changes the agent rolls the DaemonSet and leaves no BPF program of the old agent in
the kernel; `helm uninstall` leaves no program, no LatencyTraceNode and no finalizer behind."""

from __future__ import annotations

import pytest

from tests.cluster.local import NAMESPACE, RELEASE

from .conftest import (agent_pod, apply_trace, container_pid, kget, loaded_maps, loaded_progs, maps_of, pod_ready,
                       progs_of, start_server, tracing_pods, wait_for)

TRACE_SPEC = {"podSelector": {"matchLabels": {"app": "server"}}, "duration": "1h"}


@pytest.fixture
def cluster(real_cluster):
    yield real_cluster
    # Whatever step failed, the next module starts from no release.
    real_cluster.cp.helm("uninstall", RELEASE, "-n", NAMESPACE, "--wait", "--timeout=3m", check=False)


def test_upgrade_then_uninstall(cluster, namespace):
    # step 1: install, trace a pod
    cluster.helm_install()
    server = start_server(cluster, "server", namespace, {"app": "server"})
    uid = server["metadata"]["uid"]
    apply_trace(cluster, namespace, "web", TRACE_SPEC)
    wait_for("the pod traced", lambda: uid in tracing_pods(cluster, namespace, "web"))
    old = agent_pod(cluster)
    old_pid = container_pid(cluster, old["metadata"]["name"], NAMESPACE, "agent")
    old_progs = progs_of(old_pid)
    assert old_progs

    # step 2: an upgrade that changes the agent's pod template rolls the DaemonSet
    cluster.helm_install(cluster.values(agent={"intervalSeconds": 3}))
    new = wait_for("a new agent pod, Ready", lambda: (p := agent_pod(cluster))["metadata"]["uid"]
                   != old["metadata"]["uid"] and pod_ready(p) and p)
    wait_for("the old agent's programs to leave the kernel", lambda: not (old_progs & loaded_progs()), 60)
    new_pid = container_pid(cluster, new["metadata"]["name"], NAMESPACE, "agent")
    wait_for("the new agent tracing the pod", lambda: uid in tracing_pods(cluster, namespace, "web")
             and progs_of(new_pid))
    new_progs, new_maps = progs_of(new_pid), maps_of(new_pid)
    assert new_maps

    # step 3: uninstall leaves nothing the release or its operator made
    cluster.cp.helm("uninstall", RELEASE, "-n", NAMESPACE, "--wait", "--timeout=3m")
    wait_for("the agent's programs and maps to leave the kernel",
             lambda: not (new_progs & loaded_progs()) and not (new_maps & loaded_maps()), 60)
    assert kget(cluster, "ltn")["items"] == []
    trace = kget(cluster, "lt", "-n", namespace, "web")
    assert "latencytrace.io/finalizer" not in (trace["metadata"].get("finalizers") or [])
    # With no operator left, the trace can still be deleted: nothing holds it.
    cluster.cp.kubectl("delete", "lt", "-n", namespace, "web", "--timeout=30s")
    wait_for("no container of the release on the node", lambda: not cluster.node.crictl(
        "ps", "--label", f"io.kubernetes.pod.namespace={NAMESPACE}", "-q").stdout.strip(), 60)
