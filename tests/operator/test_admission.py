"""Bad input at the door: every field of both CRDs, given a wrong type, an out-of-range number, an
oversized list or map, a very long or non-ASCII string, is refused by the real API server (schema or CEL)
with a message naming the field. Each case is sent with `kubectl create --dry-run=server`, which runs the
whole admission chain and stores nothing.

What the schema cannot express (label-key syntax, the cluster's own maximum duration) is checked by the
operator and reported in the Accepted condition: tests/operator/test_spec.py and test_spec_fuzz.py.
"""

from __future__ import annotations

import json

import pytest

from latencytrace.node_agent import contract, segments

pytest_plugins = ["tests.cluster.fixtures"]

LONG = "a" * 600
UTF = "é"  # non-ASCII


def with_(base: dict, path: str, value) -> dict:
    """A deep copy of `base` with `value` at the dotted `path` (list indexes as numbers)."""
    doc = json.loads(json.dumps(base))
    *parents, last = path.split(".")
    at = doc
    for p in parents:
        at = at[int(p)] if isinstance(at, list) else at.setdefault(p, {})
    if isinstance(at, list):
        at[int(last)] = value
    else:
        at[last] = value
    return doc


TRACE = {"podNames": ["a"]}
SELECTOR = {"podSelector": {"matchLabels": {"app": "web"}}}
TRACE_CASES = [
    # (field, value, fragment of the server's message); the base is TRACE unless the field is a selector's
    ("slowThresholdMicroseconds", "5", "must be of type integer"),
    ("slowThresholdMicroseconds", 1.5, "must be of type integer"),
    ("slowThresholdMicroseconds", 0, "should be greater than or equal to 1"),
    ("slowThresholdMicroseconds", 60_000_001, "should be less than or equal to 60000000"),
    ("spansPerSecond", -1, "should be greater than or equal to 0"),
    ("spansPerSecond", 1001, "should be less than or equal to 1000"),
    ("spansPerSecond", True, "must be of type integer"),
    ("sampleOneIn", 1_000_001, "should be less than or equal to 1000000"),
    ("sampleOneIn", 2**63, "must be of type integer"),
    ("timeOneIn", 0, "should be greater than or equal to 1"),
    ("timeOneIn", 1_000_001, "should be less than or equal to 1000000"),
    ("timeOneIn", "8", "must be of type integer"),
    ("directions", "receive", "must be of type array"),
    ("directions", [], "should have at least 1 items"),
    ("directions", ["receive", "receive"], "Duplicate value"),
    ("directions", ["up"], "Unsupported value"),
    ("segments", list(segments.NAMES) + ["rx_irq"], "must have at most 11 items"),
    ("segments", [UTF], "Unsupported value"),
    ("segments", [1], "must be of type string"),
    ("podNames", [], "should have at least 1 items"),
    ("podNames", [f"p{i}" for i in range(257)], "must have at most 256 items"),
    ("podNames", ["a", "a"], "Duplicate value"),
    ("podNames", ["A_B"], "should match"),
    ("podNames", [f"p{UTF}"], "should match"),
    ("podNames", ["a" * 254], "Too long"),
    ("podNames", "a", "must be of type array"),
    ("duration", 30, "must be of type string"),
    ("duration", "1d", "should match"),
    ("duration", "1h\n", "should match"),
    ("duration", "1" * 33, "Too long"),
    ("duration", "169h", "duration must be between 10s and 168h"),
    ("export", "http://h:4317", "must be of type object"),
    ("export.otlpEndpoint", "http://h:abc", "should match"),
    ("export.otlpEndpoint", "http://h:99999", "the port of otlpEndpoint must be 1-65535"),
    ("export.otlpEndpoint", "http://h:0", "the port of otlpEndpoint must be 1-65535"),
    ("export.otlpEndpoint", "ftp://h:4317", "should match"),
    ("export.otlpEndpoint", "h:4317", "should match"),
    ("export.otlpEndpoint", "http://u:p@h:4317", "should match"),
    ("export.otlpEndpoint", "http://h:4317?token=x", "should match"),
    ("export.otlpEndpoint", " http://h:4317", "should match"),
    ("export.otlpEndpoint", "http://h:4317/a b", "should match"),
    ("export.otlpEndpoint", "http://h:4317\n", "should match"),
    ("export.otlpEndpoint", f"http://h{UTF}:4317", "should match"),
    ("export.otlpEndpoint", "http://h:4317/" + LONG, "Too long"),
    ("export.otlpEndpoint", 4317, "must be of type string"),
    ("export.resourceAttributes", {f"k{i}": "v" for i in range(33)}, "must have at most 32 items"),
    ("export.resourceAttributes", {"k8s.pod.name": "x"}, "must not start with k8s."),
    ("export.resourceAttributes", {"k" * 129: "x"}, "at most 128 characters"),
    ("export.resourceAttributes", {"team": LONG}, "Too long"),
    ("export.resourceAttributes", {"team": 5}, "must be of type string"),
    ("podSelector", "app=web", "must be of type object"),
    ("podSelector.matchLabels", {f"k{i}": "v" for i in range(65)}, "must have at most 64 items"),
    ("podSelector.matchLabels", {"app": "x" * 64}, "Too long"),
    ("podSelector.matchLabels", {"app": 1}, "must be of type string"),
    ("podSelector.matchExpressions", [{"key": "a", "operator": "Exists"}] * 33, "must have at most 32 items"),
    ("podSelector.matchExpressions", [{"key": "a", "operator": "Bogus"}], "Unsupported value"),
    ("podSelector.matchExpressions", [{"key": "a" * 318, "operator": "Exists"}], "Too long"),
    ("podSelector.matchExpressions", [{"operator": "Exists"}], "Required value"),
    ("podSelector.matchExpressions", [{"key": "a", "operator": "In", "values": ["v"] * 65}],
     "must have at most 64 items"),
    ("podSelector.matchExpressions", [{"key": "a", "operator": "In", "values": ["x" * 64]}], "Too long"),
    ("namespaceSelector", [], "must be of type object"),
]


def kubectl_refuses(cp, doc: dict, *where: str) -> str:
    out = cp.kubectl("create", "--dry-run=server", *where, "-f", "-", input=json.dumps(doc), check=False)
    assert out.returncode != 0, f"accepted: {json.dumps(doc)[:300]}"
    return out.stderr


@pytest.mark.parametrize("field, value, message", TRACE_CASES,
                         ids=[f"{f}={json.dumps(v)[:30]}" for f, v, _ in TRACE_CASES])
def test_bad_trace_field_is_refused(control_plane, crds, namespace, field, value, message):
    base = SELECTOR if field.startswith(("podSelector", "namespaceSelector")) else TRACE
    doc = {"apiVersion": contract.API_VERSION, "kind": contract.TRACE_KIND, "metadata": {"name": "bad"},
           "spec": with_(base, field, value)}
    stderr = kubectl_refuses(control_plane, doc, "-n", namespace)
    assert message in stderr and f"spec.{field.split('.')[0]}" in stderr, stderr


def test_a_spec_that_is_not_an_object_is_refused(control_plane, crds, namespace):
    doc = {"apiVersion": contract.API_VERSION, "kind": contract.TRACE_KIND, "metadata": {"name": "bad"},
           "spec": "podNames: [a]"}
    assert "must be of type object" in kubectl_refuses(control_plane, doc, "-n", namespace)


def node_entry(**extra) -> dict:
    return {"name": "t", "namespace": "app", "uid": "u-t",
            "pods": [{"namespace": "app", "name": "p", "uid": "u-p", "ips": ["10.0.0.1"]}], **extra}


NODE = {"nodeName": "admission-node", "traces": [node_entry()]}
NODE_CASES = [
    ("contractVersion", 0, "should be greater than or equal to 1"),
    ("contractVersion", "1", "must be of type integer"),
    ("traces", [node_entry(uid=f"u{i}") for i in range(257)], "must have at most 256 items"),
    ("traces", "t", "must be of type array"),
    ("traces.0.name", "a" * 254, "Too long"),
    ("traces.0.namespace", "a" * 64, "Too long"),
    ("traces.0.uid", LONG, "Too long"),
    ("traces.0.slowThresholdMicroseconds", 0, "should be greater than or equal to 1"),
    ("traces.0.slowThresholdMicroseconds", 60_000_001, "should be less than or equal to 60000000"),
    ("traces.0.spansPerSecond", 1001, "should be less than or equal to 1000"),
    ("traces.0.sampleOneIn", -1, "should be greater than or equal to 0"),
    ("traces.0.timeOneIn", 0, "should be greater than or equal to 1"),
    ("traces.0.directions", ["receive", "transmit", "up"], "must have at most 2 items"),
    ("traces.0.segments", [f"rx_{UTF}"], "Unsupported value"),
    ("traces.0.export.otlpEndpoint", "http://u:p@h:4317", "should match"),
    ("traces.0.export.otlpEndpoint", "http://h:4317/" + LONG, "Too long"),
    ("traces.0.export.resourceAttributes", {f"k{i}": "v" for i in range(33)}, "must have at most 32 items"),
    ("traces.0.export.resourceAttributes", {"team": LONG}, "Too long"),
    ("traces.0.pods", [{"namespace": "a", "name": f"p{i}", "uid": f"u{i}"} for i in range(1025)],
     "must have at most 1024 items"),
    ("traces.0.pods.0.name", "a" * 254, "Too long"),
    ("traces.0.pods.0.namespace", "a" * 64, "Too long"),
    ("traces.0.pods.0.uid", LONG, "Too long"),
    ("traces.0.pods.0.ips", [f"10.0.0.{i}" for i in range(17)], "must have at most 16 items"),
    ("traces.0.pods.0.ips", ["1" * 46], "Too long"),
    ("traces.0.pods.0.ips", "10.0.0.1", "must be of type array"),
]


@pytest.mark.parametrize("field, value, message", NODE_CASES,
                         ids=[f"{f}={json.dumps(v)[:30]}" for f, v, _ in NODE_CASES])
def test_bad_node_field_is_refused(control_plane, crds, field, value, message):
    doc = {"apiVersion": contract.API_VERSION, "kind": contract.NODE_KIND, "metadata": {"name": NODE["nodeName"]},
           "spec": with_(NODE, field, value)}
    stderr = kubectl_refuses(control_plane, doc)
    assert message in stderr and f"spec.{field.split('.')[0]}" in stderr, stderr
