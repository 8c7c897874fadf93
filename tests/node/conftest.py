"""Fixtures and helpers of the real-node tests: latencytrace installed by helm on the local cluster's
real node (tests/cluster/local.py), workload pods from the image built here, and views of what runs
on the node as the kernel and the container runtime see it (never the agent's own bookkeeping)."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.agent.kernel import bpftool, held_ids
from tests.cluster import images
from tests.cluster.local import NAMESPACE, LocalCluster

WORKLOAD = images.WORKLOAD_IMAGE
PORT = 7000  # the workload server's TCP and UDP echo


def kget(cluster: LocalCluster, *args: str) -> dict:
    return json.loads(cluster.cp.kubectl("get", *args, "-o", "json").stdout)


def wait_for(what: str, probe: Callable[[], object], timeout: float = 120.0, interval: float = 0.5):
    """Polls until `probe` returns something true and returns it; fails with the last value seen."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except Exception as e:  # noqa: BLE001 - shown if the wait fails
            last = e
        else:
            if last:
                return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


# ---- the node, as the runtime and the kernel see it -----------------------------------------------------

def container_pid(cluster: LocalCluster, pod: str, namespace: str, container: str) -> int:
    """Host PID of a running container's main process, from the container runtime."""
    listed = json.loads(cluster.node.crictl("ps", "--state", "running", "--name", f"^{container}$",
                                            "--label", f"io.kubernetes.pod.name={pod}",
                                            "--label", f"io.kubernetes.pod.namespace={namespace}", "-o", "json").stdout)
    ids = [c["id"] for c in listed["containers"]]
    assert len(ids) == 1, f"{namespace}/{pod}/{container}: running containers {ids}"
    info = json.loads(cluster.node.crictl("inspect", ids[0]).stdout)
    return int(info["info"]["pid"])


def progs_of(pid: int) -> set[int]:
    """IDs of the BPF programs a process holds open (its fdinfo)."""
    return held_ids(pid, "prog")


def maps_of(pid: int) -> set[int]:
    """IDs of the BPF maps a process holds open (its fdinfo)."""
    return held_ids(pid, "map")


def loaded_progs() -> set[int]:
    """IDs of every BPF program loaded in the kernel now (bpftool, from the host)."""
    return {p["id"] for p in bpftool("prog", "show")}


def loaded_maps() -> set[int]:
    """IDs of every BPF map in the kernel now (bpftool, from the host)."""
    return {m["id"] for m in bpftool("map", "show")}


def status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise KeyError(name)


def agent_pod(cluster: LocalCluster) -> dict:
    pods = kget(cluster, "pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=agent")["items"]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    return pods[0]


def pod_ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", []))


# ---- workloads --------------------------------------------------------------------------------------

def server_manifest(name: str, namespace: str, labels: dict[str, str]) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"containers": [{"name": "server", "image": WORKLOAD, "imagePullPolicy": "Never",
                                     "args": ["serve", "-listen", f":{PORT}"]}],
                     "terminationGracePeriodSeconds": 1}}


def start_server(cluster: LocalCluster, name: str, namespace: str, labels: dict[str, str]) -> dict:
    cluster.cp.kubectl("apply", "-f", "-", input=json.dumps(server_manifest(name, namespace, labels)))
    cluster.cp.kubectl("wait", "-n", namespace, "--for=condition=Ready", f"pod/{name}", "--timeout=120s",
                       timeout=130)
    return kget(cluster, "pod", "-n", namespace, name)


def run_client(cluster: LocalCluster, namespace: str, target: str, protocol: str, count: int, rate: int) -> dict:
    """Runs the workload's client in a pod of its own until it exits; returns its one-line JSON summary."""
    name = f"client-{uuid.uuid4().hex[:6]}"
    manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
                "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                         "containers": [{"name": "client", "image": WORKLOAD, "imagePullPolicy": "Never",
                                         "args": ["client", "-to", f"{target}:{PORT}", "-proto", protocol,
                                                  "-n", str(count), "-rate", str(rate)]}]}}
    cluster.cp.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    phase = wait_for(f"client pod {name} to finish", lambda: kget(cluster, "pod", "-n", namespace, name)
                     .get("status", {}).get("phase") in ("Succeeded", "Failed")
                     and kget(cluster, "pod", "-n", namespace, name)["status"]["phase"], timeout=count / rate + 120)
    logs = cluster.cp.kubectl("logs", "-n", namespace, name).stdout
    assert phase == "Succeeded", logs
    return json.loads(logs.strip().splitlines()[-1])


def apply_trace(cluster: LocalCluster, namespace: str, name: str, spec: dict) -> None:
    cluster.cp.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "latencytrace.io/v1alpha1", "kind": "LatencyTrace",
        "metadata": {"name": name, "namespace": namespace}, "spec": spec}))


def node_report(cluster: LocalCluster, namespace: str, trace: str) -> dict:
    """The agent's report on one trace, from the node's LatencyTraceNode status."""
    ltn = kget(cluster, "ltn", cluster.node_name)
    for t in ltn.get("status", {}).get("traces", []):
        if t["namespace"] == namespace and t["name"] == trace:
            return t
    return {}


def tracing_pods(cluster: LocalCluster, namespace: str, trace: str) -> dict[str, dict]:
    return {p["uid"]: p for p in node_report(cluster, namespace, trace).get("pods", []) if p["state"] == "Tracing"}


def netns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


# ---- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def installed(real_cluster: LocalCluster) -> Iterator[LocalCluster]:
    """latencytrace installed by helm, as a user would, with the local cluster's values."""
    real_cluster.helm_install()
    try:
        yield real_cluster
    finally:
        real_cluster.cp.helm("uninstall", "latencytrace", "-n", NAMESPACE, "--wait", "--timeout=3m", check=False)


@pytest.fixture
def namespace(real_cluster: LocalCluster) -> Iterator[str]:
    name = f"lt-{uuid.uuid4().hex[:8]}"
    real_cluster.cp.kubectl("create", "namespace", name)
    yield name
    real_cluster.cp.kubectl("delete", "namespace", name, "--wait=false")
