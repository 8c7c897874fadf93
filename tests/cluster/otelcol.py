"""An OpenTelemetry Collector (built by tests/cluster/build.sh with the collector builder) between agents
and the backends, as the canonical deployment has it: agents -> collector -> Jaeger (traces, OTLP/gRPC)
and Prometheus (metrics, OTLP/HTTP to its OTLP receiver, which stores exponential histograms as native
histograms and keeps their exemplars).

The pipeline is the one node_agent/export/README.md recommends: otlp receiver -> memory_limiter -> batch
-> exporters. Everything listens on free 127.0.0.1 ports; the collector's own telemetry listener is off.

    with Collector(tmp_path, traces_to=jaeger.otlp_grpc_endpoint, metrics_to=prom.otlp_http_endpoint) as c:
        agent --otlp-endpoint http://{c.otlp_grpc_endpoint}
"""

from __future__ import annotations

import os
from typing import Any

from .backend import OtlpBackend


class Collector(OtlpBackend):
    name = "otelcol"
    what = "collector's OTLP receivers"

    def __init__(self, workdir: str | os.PathLike[str], *, traces_to: str | None = None,
                 metrics_to: str | None = None, startup_timeout: float = 60.0, detach: bool = False) -> None:
        """`traces_to`: host:port of an OTLP/gRPC receiver (Jaeger); `metrics_to`: base URL of an OTLP/HTTP
        receiver (Prometheus' <url>/api/v1/otlp; the exporter adds /v1/metrics)."""
        if not traces_to and not metrics_to:
            raise ValueError("a collector needs somewhere to send: traces_to and/or metrics_to")
        super().__init__(workdir, startup_timeout=startup_timeout, detach=detach)
        self.traces_to = traces_to
        self.metrics_to = metrics_to

    def config(self) -> dict[str, Any]:
        processors = ["memory_limiter", "batch"]
        exporters: dict[str, Any] = {}
        pipelines: dict[str, Any] = {}
        if self.traces_to:
            exporters["otlp_grpc/jaeger"] = {"endpoint": self.traces_to, "tls": {"insecure": True}}
            pipelines["traces"] = {"receivers": ["otlp"], "processors": processors, "exporters": ["otlp_grpc/jaeger"]}
        if self.metrics_to:
            exporters["otlp_http/prometheus"] = {"endpoint": self.metrics_to, "tls": {"insecure": True}}
            pipelines["metrics"] = {"receivers": ["otlp"], "processors": processors,
                                    "exporters": ["otlp_http/prometheus"]}
        return {
            "receivers": self.otlp_receiver(),
            "processors": {
                # First in the pipeline: refuses data (the agent retries, then counts a dropped batch)
                # before the collector runs out of memory.
                "memory_limiter": {"check_interval": "1s", "limit_mib": 256, "spike_limit_mib": 64},
                # Short, so that tests see data soon; a deployment keeps the defaults (200 ms here vs 200 ms
                # there: batch's default timeout is already short) and sizes send_batch_size to its load.
                "batch": {"timeout": "200ms"},
            },
            "exporters": exporters,
            "service": {
                "pipelines": pipelines,
                # "none" also drops the default metrics listener on :8888.
                "telemetry": {"metrics": {"level": "none"}, "logs": {"level": "info"}},
            },
        }

    def argv(self, binary: str) -> list[str]:
        self.pick_ports()
        return [binary, f"--config={self.write_config('otelcol.yaml', self.config())}"]

    def _ready(self) -> bool:
        return self.otlp_listening()
