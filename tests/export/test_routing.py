"""Resources: the traced pod is the resource of its data, built on the agent's own resource."""

from __future__ import annotations

from latencytrace.node_agent.export.routing import DEFAULT, Route, Router, base_resource


def test_a_pod_resource_is_the_agents_identity_with_the_pods_and_nothing_renames_the_pod(monkeypatch):
    # The downward API often describes the agent's own pod in OTEL_RESOURCE_ATTRIBUTES.
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "k8s.pod.name=agent-x,k8s.container.name=agent,"
                                                   "k8s.cluster.name=prod,deployment.environment.name=prod")
    router = Router(base_resource("1.0", "node-1", {}), has_default=True)
    agent = dict(router.resource(DEFAULT).attributes)
    assert agent["k8s.pod.name"] == "agent-x" and agent["service.name"] == "latencytrace-agent"

    pod = {"k8s.pod.name": "web-0", "k8s.pod.uid": "u0", "k8s.namespace.name": "shop"}
    route = Route("http://team:4317", (("k8s.pod.name", "spoofed"), ("team", "payments")))
    r = dict(router.resource(route, pod).attributes)
    assert (r["k8s.pod.name"], r["k8s.pod.uid"], r["k8s.namespace.name"]) == ("web-0", "u0", "shop")
    assert "k8s.container.name" not in r  # the agent's container, not the pod's
    assert r["k8s.node.name"] == "node-1" and r["k8s.cluster.name"] == "prod"
    assert r["service.name"] == "latencytrace-agent" and r["service.instance.id"] == agent["service.instance.id"]
    assert r["team"] == "payments" and r["deployment.environment.name"] == "prod"
    assert router.resource(route, pod) is router.resource(route, dict(pod))  # made once per pod and route


def test_a_resource_is_hashed_once_and_alike_a_plain_one(monkeypatch):
    """The span encoder hashes a span's resource for every span; the router's resources hash once, to the
    value (and equality) a plain Resource of the same attributes has."""
    from opentelemetry.sdk.resources import Resource

    router = Router(base_resource("1.0", "node-1", {}), has_default=True)
    r = router.resource(Route("http://team:4317", (("team", "payments"),)), {"k8s.pod.name": "web-0"})
    plain = Resource(dict(r.attributes), r.schema_url)
    expected = hash(plain)
    assert hash(r) == expected and r == plain and {r: 1}[plain] == 1
    calls = []
    monkeypatch.setattr(Resource, "__hash__", lambda self: calls.append(self) or 0)
    assert [hash(r) for _ in range(3)] == [expected] * 3 and calls == []  # not computed again
