"""Watch expiry, for real: while a ListWatch is between two watches, objects change and etcd compacts its
history past the watcher's resourceVersion; the API server answers the re-watch with 410 Gone, and the
watcher must list again and see what changed meanwhile (the agent's LatencyTraceNode watch and the
operator's pod watch are the same ListWatch; kopf's own watches re-list on 410 by themselves).

This API server runs with --watch-cache=false, so that watches are served by etcd and the compaction
alone expires the version. With the watch cache on (the session's control plane), a compacted version is
still served from the cache's own window until that moves on (minutes) or the API server restarts; the
410 the watcher then gets is the same Status.

Nothing here is mocked: the watcher talks to the real API server; the test only holds its next watch
request back (as a dropped connection would) while the world changes.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from kubernetes import client

from latencytrace.node_agent import contract
from latencytrace.node_agent.kube import ListWatch, api_client
from tests.cluster.controlplane import ControlPlane

from .conftest import ROOT


@pytest.fixture(scope="module")
def uncached(pytestconfig, tmp_path_factory) -> Iterator[ControlPlane]:
    cp = ControlPlane(tmp_path_factory.mktemp("uncached"), with_controllers=False, with_kwok=False,
                      apiserver_args=["--watch-cache=false"])
    cp.start()
    try:
        for path in sorted((ROOT / "crds").glob("*.yaml")):
            cp.kubectl("apply", "--server-side", "-f", str(path))
        cp.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/latencytracenodes.latencytrace.io")
        yield cp
    finally:
        cp.stop()


class HeldWatch:
    """The real list function, whose watch requests wait while `hold` is set (lists go through)."""

    def __init__(self, fn: Callable):
        self.fn, self.__name__ = fn, fn.__name__
        self.hold, self.waiting = threading.Event(), threading.Event()
        self.lists = 0
        self.watched_from: list[str] = []

    def __call__(self, *args, **kwargs):
        if kwargs.get("watch"):
            self.waiting.set()
            while self.hold.is_set():
                time.sleep(0.05)
            self.watched_from.append(kwargs["resource_version"])
        else:
            self.lists += 1
        return self.fn(*args, **kwargs)


def node_manifest(name: str, label: str) -> dict:
    return {"apiVersion": contract.API_VERSION, "kind": contract.NODE_KIND,
            "metadata": {"name": name, "labels": {"watch-test": label}},
            "spec": {"nodeName": name}}


def pod_manifest(name: str, label: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"watch-test": label}},
            "spec": {"automountServiceAccountToken": False, "containers": [{"name": "c", "image": "none"}]}}


def names(lw: ListWatch) -> dict[str, str | None]:
    return {o["metadata"]["name"]: o["metadata"].get("annotations", {}).get("changed") for o in lw.snapshot()}


@pytest.mark.parametrize("kind", ["LatencyTraceNode (agent)", "Pod (operator)"])
def test_watcher_lists_again_after_etcd_compacted_its_version(uncached, kind):
    cp, label = uncached, uuid.uuid4().hex[:8]
    api = api_client(str(cp.kubeconfig))
    if kind.startswith("Pod"):
        ns = f"w-{label}"
        cp.kubectl("create", "namespace", ns)
        cp.kubectl("create", "serviceaccount", "default", "-n", ns)  # no controller-manager makes it here
        where, make = ["-n", ns], pod_manifest
        fn = HeldWatch(client.CoreV1Api(api).list_namespaced_pod)
        args: tuple = (fn, ns)
    else:
        where, make = [], node_manifest
        fn = HeldWatch(client.CustomObjectsApi(api).list_cluster_custom_object)
        args = (fn, contract.GROUP, contract.VERSION, contract.NODE_PLURAL)
    a, b, c = (f"{x}-{label}" for x in "abc")

    def apply(*objs: dict) -> None:
        cp.kubectl("apply", *where, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objs)}))

    apply(make(a, label), make(b, label))
    fn.hold.set()
    lw = ListWatch(*args, on_change=lambda: None, log=logging.getLogger(__name__),
                   label_selector=f"watch-test={label}", timeout_seconds=30).start()
    try:
        assert fn.waiting.wait(30) and lw.synced.is_set()
        assert names(lw) == {a: None, b: None}

        # While the watcher is away: a deleted, b changed, c created; then etcd forgets all that history.
        cp.kubectl("delete", *where, "--wait=false", make(a, label)["kind"].lower(), a)
        cp.kubectl("annotate", *where, make(b, label)["kind"].lower(), b, "changed=yes")
        apply(make(c, label))
        compacted = cp.compact_etcd()
        fn.hold.clear()

        deadline = time.monotonic() + 30
        while names(lw) != {b: "yes", c: None} and time.monotonic() < deadline:
            time.sleep(0.1)
        assert names(lw) == {b: "yes", c: None}, f"the watcher never listed again (watched from {fn.watched_from})"
        assert fn.lists == 2  # the first list, and one after the 410
        assert int(fn.watched_from[0]) < compacted <= int(fn.watched_from[-1])

        # ...and it keeps watching from the fresh version: a later change arrives as an event, no list.
        cp.kubectl("annotate", *where, "--overwrite", make(c, label)["kind"].lower(), c, "changed=later")
        deadline = time.monotonic() + 30
        while names(lw).get(c) != "later" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert names(lw) == {b: "yes", c: "later"} and fn.lists == 2
    finally:
        lw.stop()
        if kind.startswith("Pod"):
            cp.kubectl("delete", "namespace", ns, "--wait=false")
        else:
            cp.kubectl("delete", "ltn", "-l", f"watch-test={label}", "--wait=false")
