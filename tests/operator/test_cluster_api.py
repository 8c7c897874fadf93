"""The CRDs on a real API server: defaults applied, invalid specs rejected with the schema's message,
and the operator-agent contract surviving a round trip through the LatencyTraceNode schema."""

from __future__ import annotations

import json

import pytest

from latencytrace.node_agent import contract, segments
from latencytrace.node_agent.contract import (NodeSpec, NodeStatus, NodeTrace, PodRef, PodReport, ProbeReport,
                                              TraceReport, UnavailableProbe)
from latencytrace.operator import conditions

from .conftest import kget

pytest_plugins = ["tests.cluster.fixtures"]


def trace(name: str, spec: dict) -> str:
    return json.dumps({"apiVersion": contract.API_VERSION, "kind": contract.TRACE_KIND,
                       "metadata": {"name": name}, "spec": spec})


def test_valid_trace_is_accepted_with_defaults(control_plane, crds, namespace):
    control_plane.kubectl("apply", "-n", namespace, "-f", "-",
                          input=trace("web", {"podSelector": {"matchLabels": {"app": "web"}}, "duration": "15m"}))
    spec = kget(control_plane, "-n", namespace, "lt", "web")["spec"]
    assert spec["directions"] == ["receive", "transmit"]
    assert (spec["slowThresholdMicroseconds"], spec["spansPerSecond"], spec["sampleOneIn"]) == (1000, 10, 0)


@pytest.mark.parametrize("spec, message", [
    ({"podSelector": {}, "podNames": ["a"]},
     "select pods in exactly one way: podSelector or podNames"),
    ({"podNames": ["a"], "directions": ["receive"], "segments": ["tx_qdisc"]},
     "segments must belong to the traced directions"),
    ({"podNames": ["a"], "segments": ["rx_nowhere"]}, 'Unsupported value: "rx_nowhere"'),
    ({"podNames": ["a"], "duration": "5s"}, "duration must be between 10s and 168h"),
    ({"podNames": ["a"], "export": {"resourceAttributes": {"k8s.pod.name": "x"}}}, "must not start with k8s."),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}, "In and NotIn need values"),
])
def test_invalid_trace_is_rejected_with_the_schema_message(control_plane, crds, namespace, spec, message):
    result = control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=trace("bad", spec), check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert control_plane.kubectl("get", "-n", namespace, "lt", "bad", check=False).returncode != 0


def full_spec(node: str) -> NodeSpec:
    """A NodeSpec with every field set to something other than its default."""
    return NodeSpec(node_name=node, traces=[NodeTrace(
        name="web", namespace="app", uid="u-trace", generation=4, directions=["transmit"],
        segments=["tx_qdisc", "tx_total"], slow_threshold_microseconds=250, spans_per_second=3, sample_one_in=50,
        export=contract.ExportOverrides(otlp_endpoint="http://c:4317", resource_attributes={"team": "a"}),
        pods=[PodRef(namespace="app", name="p", uid="u-p", ips=["10.0.0.1", "fd00::1"])])])


def full_status() -> NodeStatus:
    return NodeStatus(
        observed_generation=1, agent_version="9.9.9", heartbeat_time="2026-01-01T00:00:00Z",
        conditions=[conditions.agent_ready(True, "Tracing", "1 pod", 1).model_copy(
            update={"last_transition_time": "2026-01-01T00:00:00Z"})],
        probes=ProbeReport(attached=["net:net_dev_queue"], unavailable=[
            UnavailableProbe(tracepoint="sock:sk_data_ready", reason="missing", segments=["rx_pod_stack"])]),
        traces=[TraceReport(name="web", namespace="app", uid="u-trace", pods_tracing=1, pods=[
            PodReport(namespace="app", name="p", uid="u-p", state="Tracing", netns_inode=4026532000, message="ok")])],
        export=contract.ExportReport(endpoint="http://c:4317", healthy=False, dropped_batches=2, last_error="down"),
        events_lost=7)


def test_contract_round_trips_through_the_schema(control_plane, crds):
    node = "roundtrip-node"
    spec = full_spec(node)
    body = {"apiVersion": contract.API_VERSION, "kind": contract.NODE_KIND, "metadata": {"name": node},
            "spec": spec.wire()}
    control_plane.kubectl("create", "-f", "-", input=json.dumps(body))
    try:
        status = full_status()
        control_plane.kubectl("patch", "ltn", node, "--subresource=status", "--type=merge",
                              "-p", json.dumps({"status": status.wire()}))
        got = kget(control_plane, "ltn", node)
        assert NodeSpec.model_validate(got["spec"]) == spec  # nothing pruned, nothing changed
        assert NodeStatus.model_validate(got["status"]) == status
    finally:
        control_plane.kubectl("delete", "ltn", node)


def test_node_object_must_be_named_after_its_node(control_plane, crds):
    body = {"apiVersion": contract.API_VERSION, "kind": contract.NODE_KIND, "metadata": {"name": "a"},
            "spec": NodeSpec(node_name="b").wire()}
    result = control_plane.kubectl("create", "-f", "-", input=json.dumps(body), check=False)
    assert result.returncode != 0 and "metadata.name must equal spec.nodeName" in result.stderr


def test_segment_enum_on_the_server_is_the_segment_table(control_plane, crds):
    crd = kget(control_plane, "crd", "latencytraces.latencytrace.io")
    props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert tuple(props["segments"]["items"]["enum"]) == segments.NAMES
