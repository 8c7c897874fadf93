"""Prometheus 3 receiving OTLP metrics directly, as a metrics backend for tests.

Prometheus is started on a free 127.0.0.1 port with:
- its OTLP receiver on (`--web.enable-otlp-receiver`: POST <url>/api/v1/otlp/v1/metrics); exponential
  histograms arrive as native histograms, at their own resolution;
- exemplar storage on (`--enable-feature=exemplar-storage`), queried with /api/v1/query_exemplars;
- the resource attributes that identify a pod promoted to labels (`otlp.promote_resource_attributes`,
  PROMOTED below): without that they would only be on the `target_info` series, and a per-pod query
  would need a join. `service.name` and `service.instance.id` become `job` and `instance` as always;
- nothing scraped (no scrape config; the binary is built without service discovery).

    with Prometheus(tmp_path) as p:
        exporter endpoint: p.otlp_http_endpoint  (OTLP/HTTP base URL; /v1/metrics is added)
        p.query('histogram_quantile(0.99, rate(latencytrace_network_stack_duration_seconds[1m]))')
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .backend import Backend
from .procs import free_port

# Resource attributes of latencytrace's resources (a traced pod, and the agent's node) that become
# labels of every series of that resource. The chart's values and node_agent/export/README.md say the same.
PROMOTED = ("k8s.pod.name", "k8s.pod.uid", "k8s.namespace.name", "k8s.node.name",
            "latencytrace.target", "latencytrace.netns.inode")


class Prometheus(Backend):
    name = "prometheus"
    what = "prometheus ready"

    def __init__(self, workdir: str | os.PathLike[str], *, startup_timeout: float = 90.0,
                 detach: bool = False) -> None:
        super().__init__(workdir, startup_timeout=startup_timeout, detach=detach)
        self.port = 0

    @property
    def url(self) -> str:
        """Base URL of the HTTP API (/api/v1/query, ...)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def otlp_http_endpoint(self) -> str:
        """Base URL of the OTLP/HTTP receiver: an OTLP exporter adds /v1/metrics."""
        return f"{self.url}/api/v1/otlp"

    def config(self) -> dict[str, Any]:
        return {
            "global": {"evaluation_interval": "1m"},
            "otlp": {"promote_resource_attributes": list(PROMOTED)},
            "storage": {"exemplars": {"max_exemplars": 100_000}},
        }

    def argv(self, binary: str) -> list[str]:
        self.port = free_port()
        config = self.write_config("prometheus.yml", self.config())
        return [binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-otlp-receiver",
                "--enable-feature=exemplar-storage", "--log.level=warn"]

    # ---- HTTP API ---------------------------------------------------------------

    def _ready(self) -> bool:
        with _open(f"{self.url}/-/ready") as resp:
            return resp.status == 200

    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path>: its `data`; an error status raises with Prometheus' message."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with _open(url) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as err:
            body = json.loads(err.read() or b"{}")
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}") from None
        return body["data"]

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result (vector: [{metric: labels, value: [t, "v"]}, ...])."""
        params: dict[str, Any] = {"query": promql}
        if at is not None:
            params["time"] = at
        return self.api("query", **params)["result"]

    def values(self, promql: str, by: str, at: float | None = None) -> dict[str, float]:
        """{value of label `by`: sample} of an instant vector query."""
        return {r["metric"].get(by, ""): float(r["value"][1]) for r in self.query(promql, at)}

    def exemplars(self, selector: str, start: float, end: float) -> list[dict[str, Any]]:
        """/api/v1/query_exemplars: [{seriesLabels, exemplars: [{labels: {trace_id, span_id}, value,
        timestamp}]}]."""
        return self.api("query_exemplars", query=selector, start=start, end=end) or []

    def wait_for(self, promql: str, timeout: float = 30.0, at: float | None = None) -> list[dict[str, Any]]:
        """Polls the query until it returns a series."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql, at)
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"no series for {promql!r} after {timeout:.0f}s")
            time.sleep(0.5)


class PrometheusError(RuntimeError):
    pass


def _open(url: str, timeout: float = 10.0):
    # Every server here is on loopback: no proxy from the environment.
    return urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=timeout)
