"""Per-node configuration: pure building and diffing, and the idempotent, conflict-safe writer."""

import json

import pytest
from kubernetes.client.rest import ApiException

from latencytrace.node_agent.contract import NAMESPACED, NodeSpec, NodeTrace, PodRef, TraceSettings
from latencytrace.operator import nodeconfig


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


class FakeCustom:
    """An API server for one kind, with resourceVersions and optional injected conflicts."""

    def __init__(self):
        self.objects, self.rv, self.writes, self.conflicts = {}, 0, [], 0

    def _bump(self, obj):
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        return json.loads(json.dumps(obj))

    def list_cluster_custom_object(self, g, v, p, **_):
        self.lists = getattr(self, "lists", 0) + 1
        return {"items": [json.loads(json.dumps(o)) for o in self.objects.values()]}

    def get_cluster_custom_object(self, g, v, p, name, **_):
        self.gets = getattr(self, "gets", 0) + 1
        if name not in self.objects:
            raise ApiException(status=404)
        return json.loads(json.dumps(self.objects[name]))

    def create_cluster_custom_object(self, g, v, p, body, **_):
        name = body["metadata"]["name"]
        if name in self.objects:
            raise ApiException(status=409)
        self.writes.append(("create", name))
        self.objects[name] = self._bump(body)
        return self.objects[name]

    def replace_cluster_custom_object(self, g, v, p, name, body, **_):
        if self.conflicts:
            self.conflicts -= 1
            self.objects[name] = self._bump(self.objects[name])  # someone else wrote meanwhile
            raise ApiException(status=409)
        if body["metadata"]["resourceVersion"] != self.objects[name]["metadata"]["resourceVersion"]:
            raise ApiException(status=409)
        self.writes.append(("replace", name))
        self.objects[name] = self._bump(body)
        return self.objects[name]

    def delete_cluster_custom_object(self, g, v, p, name, body=None, **_):
        if body.preconditions.resource_version != self.objects[name]["metadata"]["resourceVersion"]:
            raise ApiException(status=409)
        self.writes.append(("delete", name))
        del self.objects[name]


class FakeCore:
    def __init__(self, nodes):
        self.nodes = nodes

    def read_node(self, name, **_):
        if name not in self.nodes:
            raise ApiException(status=404)
        return type("Node", (), {"metadata": type("Meta", (), {"uid": f"uid-{name}"})})()


@pytest.fixture
def writer():
    return nodeconfig.NodeConfigs(None, 5, custom=FakeCustom(), core=FakeCore({"n1", "n2"}))


def test_a_node_without_an_object_is_created_without_reading_it_first(writer):
    writer.custom.objects["n2"] = writer.custom._bump(nodeconfig.build_object(NodeSpec(node_name="n2"), "uid-n2"))
    assert writer.apply("n1", "t1", entry()) == entry()
    assert writer.custom.lists == 1 and getattr(writer.custom, "gets", 0) == 0  # listed once, n1 never read
    assert writer.apply("n2", "t1", entry()) == entry()  # known to exist: read, then replaced
    assert writer.custom.gets == 1 and writer.custom.writes[-1] == ("replace", "n2")
    writer.seen("n1", exists=False)  # the watch saw it deleted (by someone else)
    del writer.custom.objects["n1"]
    assert writer.apply("n1", "t1", entry()) == entry() and writer.custom.lists == 1


def test_apply_creates_updates_is_idempotent_and_deletes_when_empty(writer):
    assert writer.apply("n1", "t1", entry()) == entry()
    assert writer.apply("n1", "t2", entry("t2", name="other")) is not None
    writes = len(writer.custom.writes)
    writer.apply("n1", "t1", entry())  # unchanged: no write
    assert len(writer.custom.writes) == writes
    writer.apply("n1", "t1", None)
    assert [t["uid"] for t in writer.custom.objects["n1"]["spec"]["traces"]] == ["t2"]
    writer.apply("n1", "t2", None)
    assert "n1" not in writer.custom.objects and writer.custom.writes[-1] == ("delete", "n1")
    assert writer.apply("n1", "t2", None) is None  # already gone: nothing to do


def test_apply_retries_conflicts_with_a_fresh_read(writer):
    writer.apply("n1", "t1", entry())
    writer.custom.conflicts = 2
    writer.apply("n1", "t1", entry(pods=("a", "b")))
    assert len(writer.custom.objects["n1"]["spec"]["traces"][0]["pods"]) == 2


def test_nothing_is_published_for_a_node_that_does_not_exist(writer):
    assert writer.apply("gone", "t1", entry()) is None
    assert writer.custom.objects == {}
