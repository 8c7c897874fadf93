"""The trace worker's pod watch keeps only what it needs of each pod (ListWatch's transform), on a real
API server with kwok running the pods: what it keeps follows the pods through list, changes (kwok gives
each its IP after it was listed) and deletion, and a transform that stops keeping an object drops it
as a deletion would. And the garbage collector pause around a list's decoding (kube.gc_paused) leaves
the collector as it found it, also when pauses overlap."""

from __future__ import annotations

import gc
import json
import logging
import threading
import time

from kubernetes import client

from latencytrace.node_agent.kube import ListWatch, api_client, gc_paused
from latencytrace.operator import selection

pytest_plugins = ["tests.cluster.fixtures"]


def pod(name: str, node: str, host_network: bool = False) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": "w"}},
            "spec": {"nodeName": node, "hostNetwork": host_network, "automountServiceAccountToken": False,
                     "containers": [{"name": "c", "image": "example.invalid/app:1"}]}}


def until(what: str, check, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_pod_watch_keeps_only_placed_pods_and_follows_them(control_plane, namespace, fake_nodes):
    cp, node = control_plane, fake_nodes[0]
    cp.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "List", "items": [pod("a", node), pod("b", node), pod("h", node, True)]}))
    api = api_client(str(cp.kubeconfig))
    lw = ListWatch(client.CoreV1Api(api).list_namespaced_pod, namespace, on_change=lambda: None,
                   log=logging.getLogger(__name__), label_selector="app=w", field_selector=selection.ACTIVE_PODS,
                   transform=selection.placed_pod).start()
    try:
        until("the first list", lw.synced.is_set)
        kept = lambda: {ref.name: (n, ref.ips) for n, ref in lw.snapshot()}  # noqa: E731
        # The host-network pod is never kept; the others are (node, PodRef), with the IP kwok gives them.
        until(f"both pods with their IPs: {kept()}", lambda: set(kept()) == {"a", "b"} and all(
            ips for _, ips in kept().values()))
        assert all(n == node for n, _ in kept().values())
        assert all(isinstance(o, tuple) for o in lw.snapshot())  # not the pod objects
        cp.kubectl("delete", "pod", "-n", namespace, "a", "--wait=false", "--grace-period=0", "--force")
        until(f"a gone: {kept()}", lambda: set(kept()) == {"b"})
    finally:
        lw.stop()


def test_a_change_the_transform_does_not_keep_drops_the_object(control_plane, namespace, fake_nodes):
    cp = control_plane
    cp.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "List", "items": [pod("x", fake_nodes[0]), pod("y", fake_nodes[0])]}))
    api = api_client(str(cp.kubeconfig))
    skip = lambda o: None if (o["metadata"].get("annotations") or {}).get("skip") else o["metadata"]["name"]  # noqa: E731
    lw = ListWatch(client.CoreV1Api(api).list_namespaced_pod, namespace, on_change=lambda: None,
                   log=logging.getLogger(__name__), label_selector="app=w", transform=skip).start()
    try:
        until("both kept", lambda: sorted(lw.snapshot()) == ["x", "y"])
        cp.kubectl("annotate", "-n", namespace, "pod", "y", "skip=1")
        until(f"y dropped: {lw.snapshot()}", lambda: lw.snapshot() == ["x"])
        cp.kubectl("annotate", "-n", namespace, "pod", "y", "skip-")
        until(f"y back: {lw.snapshot()}", lambda: sorted(lw.snapshot()) == ["x", "y"])
    finally:
        lw.stop()


def test_gc_pause_restores_the_collector_when_the_last_pause_ends():
    assert gc.isenabled()
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        with gc_paused():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=other)
    with gc_paused():
        assert not gc.isenabled()
        t.start()
        assert inside.wait(10)
    assert not gc.isenabled()  # the other thread's pause still runs
    release.set()
    t.join(10)
    assert gc.isenabled()
    gc.disable()
    try:  # a collector that was off stays off
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_list_larger_than_a_page_comes_whole_and_the_watch_goes_on_from_it(control_plane, namespace, fake_nodes):
    cp = control_plane
    names = [f"p{i}" for i in range(5)]
    cp.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "List", "items": [pod(n, fake_nodes[0]) for n in names]}))
    core = client.CoreV1Api(api_client(str(cp.kubeconfig)))
    calls: list[dict] = []

    def list_pods(*args, **kwargs):
        calls.append(kwargs)
        return core.list_namespaced_pod(*args, **kwargs)

    list_pods.__name__ = "list_namespaced_pod"
    lw = ListWatch(list_pods, namespace, on_change=lambda: None, log=logging.getLogger(__name__),
                   label_selector="app=w", page_size=2, transform=lambda o: o["metadata"]["name"]).start()
    try:
        until("the first list", lw.synced.is_set)
        assert sorted(lw.snapshot()) == names
        pages = [c for c in calls if not c.get("watch")]
        assert len(pages) == 3 and all(c["limit"] == 2 for c in pages), pages  # 2 + 2 + 1
        assert [bool(c.get("_continue")) for c in pages] == [False, True, True]
        cp.kubectl("delete", "pod", "-n", namespace, "p3", "--wait=false", "--grace-period=0", "--force")
        until(f"p3 gone by the watch: {lw.snapshot()}", lambda: sorted(lw.snapshot()) == ["p0", "p1", "p2", "p4"])
        assert len([c for c in calls if not c.get("watch")]) == 3  # no list again
    finally:
        lw.stop()
