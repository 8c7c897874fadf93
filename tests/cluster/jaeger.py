"""Jaeger v2 all-in-one (in-memory storage) as a trace sink for tests.

Jaeger's built-in all-in-one config listens on fixed "localhost" ports (4317, 4318,
16686, 8888, ...) plus receivers we do not need; instead a minimal config is
generated with only OTLP gRPC + OTLP HTTP in and the query API out, each on a free
127.0.0.1 port, and the collector's own metrics endpoint turned off.

    with Jaeger(tmp_path) as j:
        exporter = OTLPSpanExporter(endpoint=j.otlp_grpc_endpoint, insecure=True)
        ...
        trace = j.wait_for_trace(trace_id_hex)
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
from typing import Any

from .backend import OtlpBackend
from .procs import http_get


class Jaeger(OtlpBackend):
    name = "jaeger"
    what = "jaeger query API and OTLP receivers"

    def __init__(self, workdir: str | os.PathLike[str], *, max_traces: int = 100_000,
                 startup_timeout: float = 60.0, detach: bool = False, prometheus: bool = False) -> None:
        """`prometheus`: also take OTLP metrics and serve them in Prometheus format (metrics_url), as
        a collector in front of Prometheus would. Its exporter knows explicit-bucket histograms only."""
        super().__init__(workdir, startup_timeout=startup_timeout, detach=detach)
        self.max_traces = max_traces
        self.prometheus = prometheus

    @property
    def query_url(self) -> str:
        """Base URL of the HTTP query API (/api/services, /api/traces/<id>) and UI."""
        return f"http://127.0.0.1:{self.ports['query_http']}"

    @property
    def metrics_url(self) -> str:
        """Prometheus scrape endpoint of the metrics it received (with prometheus=True)."""
        return f"http://127.0.0.1:{self.ports['prometheus']}/metrics"

    def config(self) -> dict[str, Any]:
        config = self._traces_config()
        if self.prometheus:
            config["service"]["pipelines"]["metrics"] = {"receivers": ["otlp"], "exporters": ["prometheus"]}
            # The traced pod is the resource of its metrics: its k8s.* attributes become labels of each
            # series (as Prometheus' promote_resource_attributes does), not only of target_info.
            config["exporters"]["prometheus"] = {"endpoint": f"127.0.0.1:{self.ports['prometheus']}",
                                                "metric_expiration": "30m",
                                                "resource_to_telemetry_conversion": {"enabled": True}}
        return config

    def _traces_config(self) -> dict[str, Any]:
        return {
            "service": {
                "extensions": ["jaeger_storage", "jaeger_query"],
                "pipelines": {"traces": {
                    # No batch processor: spans are stored as they arrive, so a test
                    # can query them at once.
                    "receivers": ["otlp"],
                    "exporters": ["jaeger_storage_exporter"],
                }},
                "telemetry": {
                    # "none" also drops the default metrics listener on :8888.
                    "metrics": {"level": "none"},
                    "logs": {"level": "info"},
                },
            },
            "extensions": {
                "jaeger_storage": {"backends": {"memory_store": {
                    "memory": {"max_traces": self.max_traces}}}},
                "jaeger_query": {
                    "storage": {"traces": "memory_store"},
                    # On by default: it would send Jaeger's own query spans to the
                    # OTLP default localhost:4317 (not us) and stall shutdown 10 s.
                    "enable_tracing": False,
                    # Both default to all interfaces; pin them to loopback.
                    "http": {"endpoint": f"127.0.0.1:{self.ports['query_http']}"},
                    "grpc": {"endpoint": f"127.0.0.1:{self.ports['query_grpc']}"},
                },
            },
            "receivers": self.otlp_receiver(),
            "exporters": {"jaeger_storage_exporter": {"trace_storage": "memory_store"}},
        }

    def argv(self, binary: str) -> list[str]:
        self.pick_ports("query_http", "query_grpc", *(("prometheus",) if self.prometheus else ()))
        return [binary, f"--config={self.write_config('jaeger.yaml', self.config())}"]

    # ---- query API ------------------------------------------------------------

    def _ready(self) -> bool:
        self.otlp_listening()
        self.services()
        return True

    def _get(self, path: str, **params: Any) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        return json.loads(http_get(f"{self.query_url}{path}{query}"))

    def services(self) -> list[str]:
        return self._get("/api/services").get("data") or []

    def get_trace(self, trace_id: str) -> dict[str, Any] | None:
        """The trace (Jaeger JSON: spans, processes) or None if not stored (yet).
        trace_id: 32 hex digits."""
        try:
            data = self._get(f"/api/traces/{trace_id}").get("data") or []
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise
        return data[0] if data else None

    def find_traces(self, service: str, limit: int = 20, **params: Any) -> list[dict[str, Any]]:
        """Recent traces of `service`; extra params as in Jaeger's /api/traces
        (operation, tags, lookback, start, end, ...)."""
        return self._get("/api/traces", service=service, limit=limit, **params).get("data") or []

    def wait_for_trace(self, trace_id: str, timeout: float = 30.0,
                       min_spans: int = 1) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            trace = self.get_trace(trace_id)
            if trace is not None and len(trace.get("spans", [])) >= min_spans:
                return trace
            if time.monotonic() > deadline:
                raise TimeoutError(f"trace {trace_id} with >= {min_spans} spans not in "
                                   f"Jaeger after {timeout:.0f}s")
            time.sleep(0.2)
