"""How many requests the operator makes to publish: one write per node per change of a trace, no read
before it, nothing when nothing changed. Counted by the API server itself (apiserver_request_total for
latencytracenodes, by verb) while a real operator process publishes a trace over pods on three kwok
nodes. Nothing else writes LatencyTraceNodes meanwhile: no agent runs, and the session's other tests
have stopped their operators (the metrics are the whole server's)."""

from __future__ import annotations

import json
import re
import time
from collections import Counter

import pytest

from latencytrace.node_agent import contract
from tests.cluster.procs import Proc, free_port, wait_until

from .conftest import BIN, kget

pytest_plugins = ["tests.cluster.fixtures"]

LISTS = ("LIST", "WATCH")  # the operator's watches: not per node


def ltn_requests(cp) -> Counter:
    """apiserver_request_total for latencytracenodes (not their status), by verb, every response code."""
    out: Counter = Counter()
    for line in cp.kubectl("get", "--raw", "/metrics").stdout.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels, value = line.rsplit(" ", 1)
        lab = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if lab.get("resource") == contract.NODE_PLURAL and not lab.get("subresource") and lab["verb"] not in LISTS:
            out[lab["verb"]] += int(float(value))
    return out


def settled(cp, seconds: float = 2.0, timeout: float = 60) -> Counter:
    """The counts once they stopped moving for `seconds` (the operator finished what it was doing)."""
    last, since = ltn_requests(cp), time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() - since < seconds:
        assert time.monotonic() < deadline, "the operator kept writing LatencyTraceNodes"
        time.sleep(0.5)
        now = ltn_requests(cp)
        if now != last:
            last, since = now, time.monotonic()
    return last


class Cluster:
    def __init__(self, cp, ns: str, nodes: list[str]):
        self.cp, self.ns, self.nodes = cp, ns, nodes

    def pod(self, name: str, node: str, app: str) -> None:
        body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": app}},
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "example.invalid/app:1"}]}}
        self.cp.kubectl("create", "-n", self.ns, "-f", "-", input=json.dumps(body))

    def published(self) -> dict[str, dict[str, object]]:
        """{node: {"pods": sorted pod names, "slow": threshold}} of the trace "w" on this test's nodes."""
        out = {}
        for o in kget(self.cp, contract.NODE_PLURAL)["items"]:
            if o["metadata"]["name"] in self.nodes:
                for t in o["spec"].get("traces", []):
                    if t["name"] == "w" and t["namespace"] == self.ns:
                        out[o["metadata"]["name"]] = {"pods": sorted(p["name"] for p in t["pods"]),
                                                      "slow": t["slowThresholdMicroseconds"]}
        return out


@pytest.fixture
def cluster(control_plane, crds, namespace, tmp_path):
    cp = control_plane
    nodes = cp.create_fake_nodes([f"{namespace}-{i}" for i in range(3)])
    c = Cluster(cp, namespace, nodes)
    for name, node, app in (("a0", 0, "w"), ("a1", 0, "w"), ("b0", 1, "w"), ("c0", 2, "w"), ("x0", 0, "x")):
        c.pod(name, nodes[node], app)
    # Running, with their IPs: the entries do not change any more on their own.
    cp.kubectl("wait", "-n", namespace, "--for=jsonpath={.status.podIP}", "pod", "--all", "--timeout=60s", timeout=70)
    op = Proc("operator", [str(BIN / "latencytrace-operator")], tmp_path / "operator.log",
              env=cp.process_env(LATENCYTRACE_OPERATOR_NAMESPACE=namespace,
                                 LATENCYTRACE_OPERATOR_LEASE_NAME="writes-operator",
                                 LATENCYTRACE_OPERATOR_HEALTH_HOST="127.0.0.1",
                                 LATENCYTRACE_OPERATOR_HEALTH_PORT=str(free_port()),
                                 LATENCYTRACE_OPERATOR_DEBOUNCE_SECONDS="0.2"), cwd=tmp_path)
    try:
        wait_until("operator leading", lambda: "leading (Lease" in op.log.read_text(), 60, [op])
        c.operator = op
        yield c
    finally:
        op.stop()
        cp.kubectl("delete", "lt", "--all", "-n", namespace, "--wait=false", check=False)
        cp.kubectl("delete", contract.NODE_PLURAL, *nodes, "--ignore-not-found", "--wait=false", check=False)
        cp.kubectl("delete", "node", *nodes, "--wait=false", check=False)


def test_one_write_per_node_per_change_and_none_without_a_change(cluster):
    cp, ns, (n0, n1, n2) = cluster.cp, cluster.ns, cluster.nodes
    before = settled(cp)

    def writes_until(what: str, done) -> Counter:
        nonlocal before
        wait_until(what, done, 60, [cluster.operator])
        after = settled(cp)
        diff, before = after - before, after
        return diff

    trace = {"apiVersion": contract.API_VERSION, "kind": contract.TRACE_KIND, "metadata": {"name": "w"},
             "spec": {"podSelector": {"matchLabels": {"app": "w"}}, "slowThresholdMicroseconds": 1000}}
    cp.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(trace))
    want = {n0: {"pods": ["a0", "a1"], "slow": 1000}, n1: {"pods": ["b0"], "slow": 1000},
            n2: {"pods": ["c0"], "slow": 1000}}
    assert writes_until("published to 3 nodes", lambda: cluster.published() == want) == Counter(APPLY=3)

    # A change of the trace: every node's entry changes, one write each.
    cp.kubectl("patch", "-n", ns, "lt", "w", "--type=merge", "-p", '{"spec": {"slowThresholdMicroseconds": 500}}')
    want = {n: {**v, "slow": 500} for n, v in want.items()}
    assert writes_until("the new threshold published", lambda: cluster.published() == want) == Counter(APPLY=3)

    # Pod churn that changes no entry (a label the selector does not look at, a pod it does not select),
    # then a pod deleted: only its node is written, and its object, left empty, is deleted.
    cp.kubectl("label", "-n", ns, "pod", "a0", "x0", "unrelated=yes")
    cp.kubectl("delete", "-n", ns, "pod", "c0", "--wait=false")
    want.pop(n2)
    assert writes_until("the deleted pod unpublished", lambda: cluster.published() == want) == \
        Counter(APPLY=1, DELETE=1)
    # One operator, one trace: all of it was ours. A second look after a while finds nothing more.
    time.sleep(2)
    assert settled(cp) - before == Counter()

    cp.kubectl("delete", "-n", ns, "lt", "w", "--wait=true", "--timeout=60s", timeout=70)
    assert writes_until("the trace removed from its nodes", lambda: cluster.published() == {}) == \
        Counter(APPLY=2, DELETE=2)
    assert not [o for o in kget(cp, contract.NODE_PLURAL)["items"] if o["metadata"]["name"] in cluster.nodes]
    assert "Traceback" not in cluster.operator.log.read_text(), cluster.operator.log.read_text()[-3000:]
