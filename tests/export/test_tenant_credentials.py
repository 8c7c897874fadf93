"""Where the agent's credentials go, with real OTLP receivers that record each request's metadata: the
administrator's headers (OTEL_EXPORTER_OTLP_HEADERS, from the chart's Secret) reach the default endpoint and
the allow-listed endpoints marked `credentials: true`, never an endpoint a tenant's trace names otherwise;
an endpoint outside the allow-list gets nothing at all, and the agent refuses the trace that names it."""

from __future__ import annotations

import json

import pytest

from latencytrace.node_agent import cluster
from latencytrace.node_agent.contract import ExportOverrides, NodeTrace, PodRef
from latencytrace.node_agent.export import sink_from_settings
from latencytrace.node_agent.export.metrics import LATENCY
from tests.export import fakes
from tests.export.receiver import Receiver
from tests.export.test_sink import clean_env, traffic  # noqa: F401 (clean_env is an autouse fixture)

SECRET = "Bearer admin-secret"


def endpoint(r: Receiver, protocol: str) -> str:
    return r.grpc_endpoint if protocol == "grpc" else r.http_endpoint


def trace(name: str, url: str) -> NodeTrace:
    return NodeTrace(name=name, namespace="tenant", uid=f"u-{name}", export=ExportOverrides(otlp_endpoint=url),
                     pods=[PodRef(namespace="tenant", name=name, uid=f"p-{name}", ips=["10.0.0.1"])])


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_the_admins_headers_go_only_where_the_admin_configured_them(monkeypatch, protocol):
    with Receiver() as admin, Receiver() as tenant, Receiver() as shared, Receiver() as elsewhere:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", f"authorization={SECRET}")
        monkeypatch.setenv("LATENCYTRACE_EXPORT_ALLOWED_ENDPOINTS", json.dumps([
            {"endpoint": endpoint(tenant, protocol)},  # credentials: false (the default)
            {"endpoint": endpoint(shared, protocol), "credentials": True}]))
        traces = [trace("t", endpoint(tenant, protocol)), trace("s", endpoint(shared, protocol)),
                  trace("x", endpoint(elsewhere, protocol))]
        sink = sink_from_settings(endpoint(admin, protocol), protocol, node_name="n1", traces=traces)
        targets = [fakes.pod_target(i, name=name, traces=(f"tenant/{name}",)) for i, name in enumerate("tsx")]
        try:
            sink.consume(traffic(targets))
        finally:
            sink.close()
        assert admin.headers, "the agent's own metrics go to the default endpoint"
        for r in (tenant, shared):
            assert r.data_points(LATENCY.name) and r.headers, "each allowed trace endpoint received its pods"
        assert all(h.get("authorization") == SECRET for h in admin.headers + shared.headers)
        assert not any("authorization" in h for h in tenant.headers), tenant.headers
        # Not allow-listed: nothing sent there, and the node's export report says why.
        assert elsewhere.headers == [] and elsewhere.metrics == [] and elsewhere.traces == []
        report = sink.report()
        assert not report.healthy and "not in this cluster's allowed export endpoints" in report.last_error


def test_the_agent_refuses_a_trace_naming_an_endpoint_outside_the_allow_list(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://admin.observability:4317")
    monkeypatch.setenv("LATENCYTRACE_EXPORT_ALLOWED_ENDPOINTS", json.dumps([{"endpoint": "http://team-a:4317"}]))
    raw = {"traces": [trace(n, url).wire() for n, url in (("ok", "http://team-a:4317"),
                                                         ("default", "http://admin.observability:4317/"),
                                                         ("meta", "http://169.254.169.254:80"))]}
    spec, rejected = cluster.parse_node_spec(raw, "n1", cluster.export_policy())
    assert [t.name for t in spec.traces] == ["ok", "default"]
    [report] = rejected
    assert report.name == "meta" and report.pods[0].state == "Failed"
    assert "is not among the endpoints this agent is allowed to export to" in report.pods[0].message
