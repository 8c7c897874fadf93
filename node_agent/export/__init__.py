"""OTLP export of the agent's measurements: latency histograms with exemplar spans, drops and health.

Two ways in:
- `sink_from_cli(args)` for `latencytrace-agent trace` (None when no endpoint is configured);
- `sink_from_settings(...)` for the in-cluster agent, then `sink.set_traces(node_spec.traces)` whenever
  the node's LatencyTraces change, and `sink.report()` for the node status.
Both return an `OtlpSink`, a Sink for `Agent(sinks=[...])`; `Agent.close()` flushes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

from . import config, otlp
from .config import ExportConfigError, ExportSettings
from .sink import OtlpSink

__all__ = ["ExportConfigError", "ExportSettings", "OtlpSink", "sink_from_cli", "sink_from_settings"]


def sink_from_settings(
    endpoint: str | None = None,
    protocol: Literal["grpc", "http/protobuf"] | None = None,
    *,
    node_name: str | None = None,
    traces: Iterable | None = None,
    temporality: Literal["cumulative", "delta"] | None = None,
    histogram: Literal["exponential", "explicit"] | None = None,
    explicit_bounds_s: tuple[float, ...] | None = None,
    headers: Mapping[str, str] | None = None,
    insecure: bool | None = None,
    certificate: str | None = None,
    compression: Literal["gzip", "deflate", "none"] | None = None,
    timeout_s: float | None = None,
    max_series: int | None = None,
    resource_attributes: Mapping[str, str] | None = None,
    service_version: str | None = None,
) -> OtlpSink:
    """The in-cluster agent's sink. Every argument left None comes from the environment (LATENCYTRACE_EXPORT_*
    and the standard OTEL_* variables, see config.py) or its default.

    endpoint: the default OTLP endpoint (URL; for HTTP the base, /v1/metrics and /v1/traces are added).
        Without one (here or in OTEL_EXPORTER_OTLP_ENDPOINT) only pods of traces that set
        spec.export.otlpEndpoint are exported.
    node_name: k8s.node.name on every resource (the agent's and each traced pod's).
    traces: the node's contract.NodeTrace objects (their export overrides); or call set_traces() later.
    Raises ExportConfigError for an invalid value.
    """
    settings = config.load(
        endpoint=endpoint, protocol=protocol, node_name=node_name, temporality=temporality, histogram=histogram,
        explicit_bounds_s=explicit_bounds_s, headers=dict(headers) if headers is not None else None,
        insecure=insecure, certificate=certificate, compression=compression, timeout_s=timeout_s,
        max_series=max_series, resource_attributes=dict(resource_attributes) if resource_attributes else None,
        service_version=service_version)
    sink = OtlpSink(settings)
    if traces is not None:
        sink.set_traces(traces)
    return sink


def sink_from_cli(args) -> OtlpSink | None:
    """The standalone command's sink, from --otlp-endpoint/--otlp-protocol and the environment; None when
    no endpoint is configured. A bad setting raises ExportConfigError (the command reports it in one line)."""
    settings = config.load(endpoint=getattr(args, "otlp_endpoint", None),
                           protocol=getattr(args, "otlp_protocol", None))
    if otlp.default_destination(settings) is None:
        return None
    return OtlpSink(settings)
