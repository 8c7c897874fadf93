"""The Jaeger helper receives OTLP over gRPC and HTTP and serves the query API."""

from __future__ import annotations

import json
import os
import time
import urllib.request

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from .jaeger import Jaeger
from .procs import listening_addresses

pytest_plugins = ["tests.cluster.fixtures"]


def test_otlp_grpc_span_is_queryable(jaeger: Jaeger) -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": "lt-grpc-test"}))
    exporter = OTLPSpanExporter(endpoint=jaeger.otlp_grpc_endpoint, insecure=True)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("test").start_as_current_span("parent") as parent:
        with provider.get_tracer("test").start_as_current_span("child"):
            pass
    provider.shutdown()
    trace_id = format(parent.get_span_context().trace_id, "032x")

    trace = jaeger.wait_for_trace(trace_id, min_spans=2)
    assert {s["operationName"] for s in trace["spans"]} == {"parent", "child"}
    assert "lt-grpc-test" in jaeger.services()


def test_otlp_http_json_span_is_queryable(jaeger: Jaeger) -> None:
    trace_id, span_id = os.urandom(16).hex(), os.urandom(8).hex()
    now = time.time_ns()  # the search below only looks back an hour
    body = {"resourceSpans": [{
        "resource": {"attributes": [
            {"key": "service.name", "value": {"stringValue": "lt-http-test"}}]},
        "scopeSpans": [{"spans": [{
            "traceId": trace_id, "spanId": span_id, "name": "http-span", "kind": 1,
            "startTimeUnixNano": str(now - 1_000_000), "endTimeUnixNano": str(now),
        }]}],
    }]}
    request = urllib.request.Request(f"{jaeger.otlp_http_endpoint}/v1/traces",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as resp:
        assert resp.status == 200

    trace = jaeger.wait_for_trace(trace_id)
    assert trace["spans"][0]["operationName"] == "http-span"
    assert [t["traceID"] for t in jaeger.find_traces("lt-http-test")] == [trace_id]


def test_jaeger_listens_only_on_loopback(jaeger: Jaeger) -> None:
    assert jaeger.proc is not None
    listening = listening_addresses(jaeger.proc.pid)
    assert listening, "jaeger should listen somewhere"
    assert all(addr.startswith("127.0.0.1:") for addr in listening), listening
