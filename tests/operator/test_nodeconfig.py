"""Per-node configuration: pure building and diffing, and the server-side-apply writer against a real
API server, with concurrent writers (another trace writing just before us), objects deleted under it,
entries edited by hand, the agent's status, and Nodes deleted and re-created under the same name."""

import os
import time

import pytest
from kubernetes import client

from latencytrace.node_agent.contract import (GROUP, NAMESPACED, NODE_PLURAL, VERSION, NodeSpec, NodeTrace, PodRef,
                                              TraceSettings)
from latencytrace.node_agent.kube import api_client
from latencytrace.operator import nodeconfig

pytest_plugins = ["tests.cluster.fixtures"]


def entry(uid="t1", name="web", pods=("a",), **kw):
    return NodeTrace(name=name, namespace="app", uid=uid, generation=1,
                     pods=[PodRef(namespace="app", name=p, uid=f"u-{p}") for p in pods], **kw)


def test_entries_only_for_nodes_with_pods():
    pods = {"n1": [PodRef(namespace="app", name="a", uid="u-a")], "n2": []}
    out = nodeconfig.entries_by_node(NAMESPACED, "app", "web", "t1", 3, TraceSettings(slow_threshold_microseconds=50), pods)
    assert list(out) == ["n1"]
    assert out["n1"].generation == 3 and out["n1"].slow_threshold_microseconds == 50


def test_with_trace_replaces_removes_and_keeps_a_stable_order():
    spec = NodeSpec(node_name="n1", traces=[entry("t2", name="zzz"), entry("t1")])
    changed = nodeconfig.with_trace(spec, "t1", entry("t1", pods=("a", "b")))
    assert [t.name for t in changed.traces] == ["web", "zzz"]
    assert len(changed.traces[0].pods) == 2
    assert [t.uid for t in nodeconfig.with_trace(spec, "t2", None).traces] == ["t1"]
    assert nodeconfig.with_trace(nodeconfig.with_trace(spec, "t1", None), "t1", entry("t1")).traces == \
        nodeconfig.with_trace(spec, "t1", entry("t1")).traces


def test_changes_are_the_difference_only():
    same, moved = entry(), entry(pods=("b",))
    assert nodeconfig.changes({"n1": same}, {"n1": same}) == {}
    assert nodeconfig.changes({"n1": moved, "n3": same}, {"n1": same, "n2": same}) == \
        {"n1": moved, "n3": same, "n2": None}


def test_object_is_owned_by_its_node():
    obj = nodeconfig.build_object(NodeSpec(node_name="n1", traces=[entry()]), "node-uid")
    assert obj["metadata"]["name"] == obj["spec"]["nodeName"] == "n1"
    assert obj["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": "node-uid"}]
    assert "ownerReferences" not in nodeconfig.build_object(NodeSpec(node_name="n1"), None)["metadata"]


class Interposed:
    """The real CustomObjectsApi, counting calls, that can run another writer's action just before one of
    our calls reaches the server (what a concurrent operator or a user would do at that moment)."""

    def __init__(self, real: client.CustomObjectsApi):
        self.real, self.calls, self.before = real, [], {}

    def __getattr__(self, name):
        method = getattr(self.real, name)

        def call(*args, **kw):
            self.calls.append(name)
            for action in self.before.pop(name, []):
                action()
            return method(*args, **kw)
        return call


@pytest.fixture
def api(control_plane, crds):
    c = api_client(str(control_plane.kubeconfig))
    yield c
    c.close()


@pytest.fixture
def nodes(control_plane, crds):
    """Two kwok Nodes of this test's own (LatencyTraceNodes are cluster-scoped): removed with their objects."""
    names = control_plane.create_fake_nodes([f"nc-{os.getpid()}-{time.monotonic_ns() % 10**9}-{i}" for i in range(2)])
    yield names
    control_plane.kubectl("delete", NODE_PLURAL, *names, "--ignore-not-found", "--wait=false", check=False)
    control_plane.kubectl("delete", "node", *names, "--ignore-not-found", "--wait=false", check=False)


@pytest.fixture
def writer(api):
    w = nodeconfig.NodeConfigs(api, 10)
    w.custom = Interposed(w.custom)
    return w


def read(api, node):
    try:
        return client.CustomObjectsApi(api).get_cluster_custom_object(GROUP, VERSION, NODE_PLURAL, node)
    except client.ApiException as e:
        if e.status == 404:
            return None
        raise


def uids(obj) -> list[str]:
    return [t["uid"] for t in obj["spec"]["traces"]]


def test_a_write_is_one_apply_whether_the_object_exists_or_not(api, writer, nodes):
    n1, n2 = nodes
    writer.apply(n2, "t0", entry("t0"))  # n2's object exists before the writer below writes
    fresh = nodeconfig.NodeConfigs(api, 10)
    fresh.custom = Interposed(fresh.custom)
    assert fresh.apply(n1, "t1", entry()) == entry()  # created
    assert fresh.apply(n2, "t1", entry()) == entry()  # merged into what is there, unread
    assert fresh.custom.calls == ["patch_cluster_custom_object"] * 2
    assert uids(read(api, n2)) == ["t0", "t1"]
    owner = read(api, n1)["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("Node", n1, client.CoreV1Api(api).read_node(n1).metadata.uid)
    managers = {m["manager"] for m in read(api, n2)["metadata"]["managedFields"]}
    assert {nodeconfig.field_manager("t0"), nodeconfig.field_manager("t1")} <= managers


def test_apply_creates_updates_is_idempotent_and_deletes_when_empty(api, writer, nodes):
    n1 = nodes[0]
    assert writer.apply(n1, "t1", entry()) == entry()
    assert writer.apply(n1, "t2", entry("t2", name="other")) is not None
    version = read(api, n1)["metadata"]["resourceVersion"]
    writer.apply(n1, "t1", entry())  # unchanged: the server stores nothing, as its resourceVersion shows
    assert read(api, n1)["metadata"]["resourceVersion"] == version
    writer.apply(n1, "t1", entry(pods=("a", "b")))
    assert [len(t["pods"]) for t in read(api, n1)["spec"]["traces"]] == [2, 1]
    writer.apply(n1, "t1", None)
    assert uids(read(api, n1)) == ["t2"]
    writer.apply(n1, "t2", None)
    assert read(api, n1) is None
    assert writer.apply(n1, "t2", None) is None  # already gone: nothing stays behind
    assert read(api, n1) is None


def test_two_traces_writing_one_node_at_the_same_moment_keep_both(api, writer, nodes):
    n1 = nodes[0]
    writer.apply(n1, "t1", entry())
    other = nodeconfig.NodeConfigs(api, 10)
    # Just before our write reaches the server, another trace adds its entry: neither carries a
    # resourceVersion, the server merges the two, and nobody writes twice.
    writer.custom.before["patch_cluster_custom_object"] = [lambda: other.apply(n1, "t9", entry("t9", name="x"))]
    writer.apply(n1, "t1", entry(pods=("a", "b")))
    obj = read(api, n1)
    assert uids(obj) == ["t1", "t9"] and len(obj["spec"]["traces"][0]["pods"]) == 2
    assert writer.custom.calls.count("patch_cluster_custom_object") == 2


def test_a_delete_that_loses_a_race_keeps_the_other_writers_trace(api, writer, nodes):
    n1 = nodes[0]
    writer.apply(n1, "t1", entry())
    other = nodeconfig.NodeConfigs(api, 10)
    writer.custom.before["delete_cluster_custom_object"] = [lambda: other.apply(n1, "t9", entry("t9", name="x"))]
    writer.apply(n1, "t1", None)  # ours is gone; the delete's precondition fails (409): the object stays
    assert uids(read(api, n1)) == ["t9"]


def test_a_status_write_between_the_last_removal_and_the_delete_does_not_leave_the_object(
        api, control_plane, writer, nodes):
    """The agent writes its status (a new resourceVersion) just as the last trace leaves: the delete's
    precondition fails, and the object, which still carries no entry, is deleted all the same."""
    n1 = nodes[0]
    writer.apply(n1, "t1", entry())
    writer.custom.before["delete_cluster_custom_object"] = [lambda: control_plane.kubectl(
        "patch", NODE_PLURAL, n1, "--subresource=status", "--type=merge", "-p", '{"status": {"agentVersion": "9.9"}}')]
    writer.apply(n1, "t1", None)
    assert writer.custom.calls.count("delete_cluster_custom_object") == 2  # refused once (409), then done
    assert read(api, n1) is None


def test_an_object_deleted_under_the_writer_is_created_again(api, writer, nodes):
    n1 = nodes[0]
    writer.apply(n1, "t1", entry())
    custom = client.CustomObjectsApi(api)
    writer.custom.before["patch_cluster_custom_object"] = [
        lambda: custom.delete_cluster_custom_object(GROUP, VERSION, NODE_PLURAL, n1)]
    writer.apply(n1, "t1", entry(pods=("a", "b")))  # the apply finds nothing and creates it
    obj = read(api, n1)
    assert len(obj["spec"]["traces"][0]["pods"]) == 2 and obj["metadata"]["ownerReferences"][0]["name"] == n1


def test_an_entry_edited_by_hand_is_taken_back_and_removed_whole(api, writer, nodes):
    """An entry another field manager has a part of (edited by hand, or written with an update by an
    operator from before field managers): the apply's answer shows it, and the entry is rewritten whole."""
    n1 = nodes[0]
    writer.apply(n1, "t1", entry())
    custom = client.CustomObjectsApi(api)
    obj = read(api, n1)
    obj["spec"]["traces"][0]["export"] = {"otlpEndpoint": "http://elsewhere:4317"}
    custom.replace_cluster_custom_object(GROUP, VERSION, NODE_PLURAL, n1, obj)  # an update, by another manager
    assert writer.apply(n1, "t1", entry(pods=("a", "b"))) == entry(pods=("a", "b"))
    assert nodeconfig.entry_of(read(api, n1), "t1") == entry(pods=("a", "b"))
    writer.custom.calls.clear()
    writer.apply(n1, "t1", None)
    assert read(api, n1) is None


def test_the_agents_status_is_left_alone(api, control_plane, writer, nodes):
    n1 = nodes[0]
    writer.apply(n1, "t1", entry())
    control_plane.kubectl("patch", NODE_PLURAL, n1, "--subresource=status", "--type=merge",
                          "-p", '{"status": {"agentVersion": "9.9", "observedGeneration": 1}}')
    writer.apply(n1, "t1", entry(pods=("a", "b")))
    writer.apply(n1, "t2", entry("t2", name="other"))
    assert read(api, n1)["status"] == {"agentVersion": "9.9", "observedGeneration": 1}


def test_nothing_is_published_for_a_node_that_does_not_exist(api, writer):
    assert writer.apply(f"no-such-node-{os.getpid()}", "t1", entry()) is None
    assert writer.custom.calls == []


def test_a_node_recreated_under_the_same_name_gets_an_object_owned_by_the_new_node(api, control_plane, writer, nodes):
    """The writer remembers Node uids. A Node deleted (its object goes with it, garbage-collected) and
    created again under the same name has a new uid: the object published for it must be owned by the
    new Node, or the garbage collector removes it as an orphan."""
    n1 = nodes[0]
    writer.apply(n1, "t1", entry())
    old_uid = read(api, n1)["metadata"]["ownerReferences"][0]["uid"]
    control_plane.kubectl("delete", "node", n1, "--wait=true", "--timeout=60s", timeout=70)
    deadline = time.monotonic() + 60
    while read(api, n1) is not None:  # the garbage collector removes the dependent object
        assert time.monotonic() < deadline, "the object outlived its Node"
        time.sleep(0.2)
    writer.seen(n1, exists=False)  # what the operator's watch reports
    control_plane.create_fake_nodes([n1])
    new_uid = client.CoreV1Api(api).read_node(n1).metadata.uid
    assert new_uid != old_uid
    writer.apply(n1, "t1", entry())
    obj = read(api, n1)
    assert obj is not None and obj["metadata"]["ownerReferences"][0]["uid"] == new_uid
