"""Pods to nodes: the query pushed to the API server and what is filtered here."""

from latencytrace.node_agent.contract import CLUSTER, NAMESPACED
from latencytrace.operator import selection, spec as specs


def pod(name, node="n1", ns="app", labels=None, ips=("10.0.0.1",), phase="Running", host_network=False, uid=None):
    return {"metadata": {"name": name, "namespace": ns, "uid": uid or f"uid-{ns}-{name}", "labels": labels or {}},
            "spec": {"nodeName": node, "hostNetwork": host_network},
            "status": {"phase": phase, "podIPs": [{"ip": i} for i in ips], "podIP": ips[0] if ips else None}}


def parse(raw):
    kind = CLUSTER if "namespaceSelector" in raw else NAMESPACED
    return specs.parse(raw, specs.Limits(), kind)


def test_selector_string_covers_every_operator():
    sel = parse({"podSelector": {"matchLabels": {"b": "2", "a": "1"}, "matchExpressions": [
        {"key": "t", "operator": "In", "values": ["y", "x"]}, {"key": "u", "operator": "NotIn", "values": ["z"]},
        {"key": "v", "operator": "Exists"}, {"key": "w", "operator": "DoesNotExist"}]}}).pod_selector
    assert selection.selector_string(sel) == "a=1,b=2,t in (x,y),u notin (z),v,!w"
    assert selection.selector_string(None) == ""


def test_queries_are_as_narrow_as_the_spec_allows():
    q = selection.pod_query(parse({"podSelector": {"matchLabels": {"app": "web"}}}), "app")
    assert q == selection.PodQuery("app", "app=web", selection.ACTIVE_PODS)
    q = selection.pod_query(parse({"podNames": ["one"]}), "app")
    assert q.namespace == "app" and q.field_selector.endswith(",metadata.name=one")
    q = selection.pod_query(parse({"podNames": ["one", "two"]}), "app")
    assert "metadata.name" not in q.field_selector
    q = selection.pod_query(parse({"namespaceSelector": {"matchLabels": {"team": "a"}}}), "app")
    assert q.namespace is None and q.label_selector == ""
    assert selection.namespace_query(parse({"namespaceSelector": {}})) == ""
    assert selection.namespace_query(parse({"podNames": ["x"]})) is None


def test_untraceable_pods_are_left_out():
    assert selection.placed_pod(pod("a", node=None)) is None
    assert selection.placed_pod(pod("a", host_network=True)) is None
    assert selection.placed_pod(pod("a", phase="Succeeded")) is None
    p = selection.placed_pod(pod("a", ips=("10.0.0.1", "fd00::1"), labels={"app": "w"}))
    assert p.node == "n1" and p.ref.ips == ["10.0.0.1", "fd00::1"] and p.labels == {"app": "w"}
    assert selection.placed_pod(pod("b", ips=())).ref.ips == []  # found by cgroup on the node, not by IP


def test_pods_grouped_by_node_and_filtered():
    pods = [selection.placed_pod(p) for p in
            (pod("b", node="n2"), pod("a", node="n2"), pod("c", node="n1"), pod("x", ns="other"))]
    by_node = selection.pods_by_node(pods, parse({"podSelector": {}}), "app", None)
    assert {n: [r.name for r in refs] for n, refs in by_node.items()} == {"n2": ["a", "b"], "n1": ["c"]}
    by_node = selection.pods_by_node(pods, parse({"podNames": ["a", "c", "x"]}), "app", None)
    assert sorted(r.name for refs in by_node.values() for r in refs) == ["a", "c"]
    by_node = selection.pods_by_node(pods, parse({"namespaceSelector": {}}), "app", {"other"})
    assert [r.name for refs in by_node.values() for r in refs] == ["x"]


def test_a_selection_reads_only_the_namespaces_its_trace_can_select():
    pods = [selection.placed_pod(pod(n, ns=ns)) for n, ns in (("a", "app"), ("b", "other"), ("c", "third"))]
    for raw, trace_ns, matched in (({"podSelector": {}}, "app", None), ({"podNames": ["a"]}, "app", None),
                                   ({"namespaceSelector": {}}, None, {"other", "third"}),
                                   ({"namespaceSelector": {}}, None, None), ({"podSelector": {}}, None, None)):
        spec = parse(raw)
        within = selection.namespaces_of(spec, trace_ns, matched)
        assert within == ({trace_ns} if "namespaceSelector" not in raw and trace_ns else set(matched or ())), raw
        everywhere = selection.pods_by_node(pods, spec, trace_ns, matched)
        assert selection.pods_by_node([p for p in pods if p.ref.namespace in within], spec, trace_ns,
                                      matched) == everywhere, raw


def test_label_selectors_follow_kubernetes_semantics():
    sel = parse({"podSelector": {"matchLabels": {"app": "w"}, "matchExpressions": [
        {"key": "tier", "operator": "In", "values": ["a", "b"]}, {"key": "env", "operator": "NotIn", "values": ["prod"]},
        {"key": "team", "operator": "Exists"}, {"key": "canary", "operator": "DoesNotExist"}]}}).pod_selector
    base = {"app": "w", "tier": "a", "team": "x"}
    assert selection.labels_match(sel, base)
    assert selection.labels_match(sel, {**base, "env": "dev"})
    for bad in ({**base, "app": "v"}, {k: v for k, v in base.items() if k != "app"}, {**base, "tier": "c"},
                {k: v for k, v in base.items() if k != "tier"}, {**base, "env": "prod"},
                {k: v for k, v in base.items() if k != "team"}, {**base, "canary": ""}):
        assert not selection.labels_match(sel, bad), bad
    assert selection.labels_match(None, {}) and selection.labels_match(parse({"podSelector": {}}).pod_selector, {})


def test_pod_names_select_in_the_trace_namespace_only_and_ignore_labels():
    spec = parse({"podNames": ["a"]})
    assert selection.selects(spec, "app", None, selection.placed_pod(pod("a", labels={"x": "y"})))
    assert not selection.selects(spec, "app", None, selection.placed_pod(pod("a", ns="other")))
    assert not selection.selects(spec, "app", None, selection.placed_pod(pod("b")))
    cluster = parse({"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "w"}}})
    web = selection.placed_pod(pod("w", ns="other", labels={"app": "w"}))
    assert not selection.selects(cluster, None, None, web)  # its namespaces not known yet
    assert selection.selects(cluster, None, {"other"}, web)
    assert not selection.selects(cluster, None, {"app"}, web)
