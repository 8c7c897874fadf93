"""The chart's opt-in Grafana dashboard: a ConfigMap with the grafana_dashboard label holding the JSON
document (charts/latencytrace/dashboards/latencytrace.json) unchanged. That every panel's PromQL returns
series from a real Prometheus is tests/export/test_backends.py::test_every_dashboard_panel_returns_series."""

from __future__ import annotations

import json

from tests.operator.chart import CHART, render


def test_the_dashboard_configmap_is_opt_in_and_carries_the_json_unchanged():
    assert not [d for d in render() if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    docs = render("--set", "grafanaDashboard.enabled=true", "--set", "grafanaDashboard.annotations.grafana_folder=Network")
    [cm] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "latencytrace-system"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Network"}
    [(key, text)] = cm["data"].items()
    assert key.endswith(".json")
    assert json.loads(text) == json.loads((CHART / "dashboards" / "latencytrace.json").read_text())


def test_the_dashboard_queries_native_histograms_and_links_exemplars():
    dashboard = json.loads((CHART / "dashboards" / "latencytrace.json").read_text())
    targets = [(p, t) for p in dashboard["panels"] for t in p.get("targets", [])]
    latency = [(p, t) for p, t in targets if "latencytrace_network_stack_duration_seconds" in t["expr"]]
    assert latency and not [t for _, t in targets if "_bucket" in t["expr"] or " le" in t["expr"]]
    assert all(t["exemplar"] for p, t in latency if p["type"] == "heatmap")
    assert {p["type"] for p, _ in latency} >= {"heatmap", "timeseries"}
