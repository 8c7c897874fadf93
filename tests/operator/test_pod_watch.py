"""The trace worker's pod watch keeps only what it needs of each pod (ListWatch's transform), on a real
API server with kwok running the pods: what it keeps follows the pods through list, changes (kwok gives
each its IP after it was listed) and deletion, and a transform that stops keeping an object drops it
as a deletion would. The operator's pod cache built on it selects as the API server's label selectors
do, keeps the pods by namespace through list and events (what a trace's selection reads), tells a trace
of a pod's change only if the trace selects the pod, and calls its `after_list` once a list is whole
(where the operator settles its heap). And the garbage collector pause around a list's
decoding (kube.gc_paused) leaves the collector as it found it, also when pauses overlap."""

from __future__ import annotations

import gc
import json
import logging
import threading
import time

from kubernetes import client

from latencytrace.node_agent.kube import ListWatch, api_client, gc_paused
from latencytrace.operator import selection, spec as specs
from latencytrace.operator.podcache import PodCache

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
        kept = lambda: {p.ref.name: (p.node, p.ref.ips) for p in lw.snapshot()}  # noqa: E731
        # The host-network pod is never kept; the others are (node, PodRef, labels), with the IP kwok gives them.
        until(f"both pods with their IPs: {kept()}", lambda: set(kept()) == {"a", "b"} and all(
            ips for _, ips in kept().values()))
        assert all(n == node for n, _ in kept().values())
        assert all(isinstance(o, selection.PlacedPod) and o.labels == {"app": "w"} for o in lw.snapshot())
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


class Recorder:
    """A PodCache subscriber that records what it is told (a trace worker looks again instead)."""

    def __init__(self, spec: specs.TraceSpec, namespace: str):
        self.spec, self.namespace, self.lock = spec, namespace, threading.Lock()
        self.changed: list[str] = []
        self.pokes = 0

    def pod_changed(self, old, new) -> None:
        if any(p is not None and selection.selects(self.spec, self.namespace, None, p) for p in (old, new)):
            with self.lock:
                self.changed.append((new or old).ref.name)

    def poke(self) -> None:
        self.pokes += 1


SELECTORS = [
    {"matchLabels": {"app": "w"}},
    {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]},
    {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["a"]}]},
    {"matchExpressions": [{"key": "tier", "operator": "Exists"}]},
    {"matchLabels": {"app": "w"}, "matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]},
    {},
]


def test_pod_cache_selects_as_the_api_server_does_and_wakes_only_the_traces_a_pod_concerns(
        control_plane, namespace, fake_nodes):
    """The operator's pod cache (all namespaces, active pods) against the API server's own label selectors
    on the same pods; and a pod event reaches a subscriber only if its trace selects the pod."""
    cp = control_plane
    labels = [{"app": "w"}, {"app": "w", "tier": "a"}, {"tier": "b"}, {"tier": "c", "app": "v"}, {}]
    pods = [pod(f"l{i}", fake_nodes[i % len(fake_nodes)]) for i in range(len(labels))]
    for p, lab in zip(pods, labels):
        p["metadata"]["labels"] = lab
    cp.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                       "items": pods}))
    api = api_client(str(cp.kubeconfig))
    listed: list[set[str]] = []  # per after_list call: the names the cache held then
    cache = PodCache(api, 60, after_list=lambda: listed.append({p.ref.name for p in cache.snapshot()}))
    cache.start()
    web = Recorder(specs.parse({"podSelector": {"matchLabels": {"app": "w"}}}), namespace)
    other = Recorder(specs.parse({"podSelector": {"matchLabels": {"app": "nothing"}}}), namespace)
    cache.subscribe(web)
    cache.subscribe(other)
    try:
        until("the cache's first list", cache.synced.is_set)
        until("both subscribers poked after the list", lambda: web.pokes >= 1 and other.pokes >= 1)
        assert len(listed) == 1 and {p["metadata"]["name"] for p in pods} <= listed[0], listed
        core = client.CoreV1Api(api)
        for raw in SELECTORS:
            spec = specs.parse({"podSelector": raw})
            server = {p.metadata.name for p in core.list_namespaced_pod(
                namespace, label_selector=selection.selector_string(spec.pod_selector)).items}
            local = {r.name for refs in selection.pods_by_node(cache.pods_in({namespace}), spec, namespace,
                                                                None).values() for r in refs}
            assert local == server, (raw, local, server)
        with web.lock:
            web.changed.clear()
        other.changed.clear()
        cp.kubectl("label", "-n", namespace, "pod", "l3", "app=w", "--overwrite")  # into web's selection
        until(f"web told of l3: {web.changed}", lambda: "l3" in web.changed)
        cp.kubectl("label", "-n", namespace, "pod", "l3", "app=v", "--overwrite")  # and out of it
        until(f"web told of l3 twice: {web.changed}", lambda: web.changed.count("l3") >= 2)
        cp.kubectl("label", "-n", namespace, "pod", "l4", "x=1")  # selected by neither
        cp.kubectl("delete", "pod", "-n", namespace, "l0", "--wait=false", "--grace-period=0", "--force")
        until(f"web told of l0's deletion: {web.changed}", lambda: "l0" in web.changed)
        until("l0 gone from the cache", lambda: "l0" not in {p.ref.name for p in cache.snapshot()})
        assert "l4" not in web.changed and other.changed == [], (web.changed, other.changed)
        assert len(listed) == 1, "a pod event is no list: after_list runs after (re-)lists only"
    finally:
        cache.stop()


def test_pod_cache_keeps_each_namespaces_pods_through_list_and_events(control_plane, namespace, fake_nodes):
    """What a trace's selection reads (PodCache.pods_in): the pods of its namespaces only, the same as the
    whole cache holds for them after the list, a relabel, a new pod and a deletion."""
    cp, node = control_plane, fake_nodes[0]
    other = f"{namespace}-b"
    cp.kubectl("create", "namespace", other)
    try:
        for ns, names in ((namespace, ("a0", "a1")), (other, ("b0",))):
            cp.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(
                {"apiVersion": "v1", "kind": "List", "items": [pod(n, node) for n in names]}))
        cache = PodCache(api_client(str(cp.kubeconfig)), 60).start()
        try:
            until("the cache's first list", cache.synced.is_set)

            def held(namespaces) -> dict[str, dict]:
                return {p.ref.name: dict(p.labels) for p in cache.pods_in(namespaces)}

            def whole(namespaces) -> dict[str, dict]:
                return {p.ref.name: dict(p.labels) for p in cache.snapshot() if p.ref.namespace in namespaces}

            assert set(held({namespace})) == {"a0", "a1"} and set(held({other})) == {"b0"}
            assert held({namespace, other}) == whole({namespace, other}) and held({"lt-absent"}) == {}
            cp.kubectl("label", "-n", namespace, "pod", "a1", "tier=x")
            until(f"a1 relabelled in its namespace's pods: {held({namespace})}",
                  lambda: held({namespace}).get("a1", {}).get("tier") == "x")
            cp.kubectl("apply", "-n", other, "-f", "-", input=json.dumps(pod("b1", node)))
            until(f"b1 in its namespace's pods: {held({other})}", lambda: "b1" in held({other}))
            cp.kubectl("delete", "pod", "-n", namespace, "a0", "--wait=false", "--grace-period=0", "--force")
            until(f"a0 gone from its namespace's pods: {held({namespace})}", lambda: "a0" not in held({namespace}))
            assert held({namespace}) == whole({namespace}) and held({other}) == whole({other})
            assert set(held({namespace})) == {"a1"} and set(held({other})) == {"b0", "b1"}
        finally:
            cache.stop()
    finally:
        cp.kubectl("delete", "namespace", other, "--wait=false")
