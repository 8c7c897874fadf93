"""Where users look: a traced pod's packets in Prometheus 3 (native histograms, exemplars) and Jaeger,
exported directly (agent -> Prometheus' OTLP receiver, agent -> Jaeger) and through an OpenTelemetry
Collector (agent -> collector -> both), all real binaries built from their Go modules (tests/cluster).

The agent runs in this process on the real kernel with a target that is a pod (PodRef), as the cluster
agent has it, in a netlab namespace under steady UDP traffic; its Report (the same totals as the JSON
report of `latencytrace-agent trace`) is what Prometheus' answers are compared with:
- histogram_quantile(0.5 | 0.99) over the pod's native histogram per segment is within one kernel bucket
  (a factor 2**(1/8)) of the agent's own quantiles, and histogram_count equals the packets it counted;
- query_exemplars returns exemplars of slow packets on the stack-duration histogram, and each one's trace
  id opens in Jaeger a trace whose root span is that packet and whose children are its segments;
- the pod is the resource: k8s.* resource attributes are labels (promoted), job/instance the agent's.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from latencytrace.node_agent import segments, targets
from latencytrace.node_agent.agent import Agent, Desired
from latencytrace.node_agent.contract import PodRef
from latencytrace.node_agent.export import sink_from_settings
from latencytrace.node_agent.program import Sizes
from latencytrace.node_agent.report import Report
from latencytrace.node_agent.tracer import TargetSettings
from tests.cluster.jaeger import Jaeger
from tests.cluster.otelcol import Collector
from tests.cluster.prometheus import Prometheus
from tests.netlab import NetLab, Pod

HIST = "latencytrace_network_stack_duration_seconds"
BUCKET = 2 ** (1 / 8)  # width of one kernel bucket (OpenTelemetry exponential scale 3)
N = 3000
SLOW_US = 200
DROPPED = 10
NODE = "lab-node"
SEGMENTS = ("rx_host_to_pod", "rx_pod_stack", "rx_socket_queue", "rx_total")


@contextmanager
def running_agent(sink, desired: Desired, interval_s: float = 0.5) -> Iterator[Report]:
    """A real agent tracing `desired`, publishing every interval_s to `sink` and a Report; closed (last
    interval published, sink flushed) on the way out."""
    report = Report()
    agent = Agent(sizes=Sizes(max_targets=4), sinks=[report, sink])
    stop = threading.Event()
    agent.start()
    try:
        states = agent.reconcile([desired])
        assert [s.state for s in states.values()] == ["Tracing"], states

        def loop():
            while not stop.wait(interval_s):
                agent.refresh_addresses()
                agent.publish(agent.collect())

        thread = threading.Thread(target=loop, name="test-agent-loop", daemon=True)
        thread.start()
        try:
            yield report
        finally:
            stop.set()
            thread.join()
    finally:
        agent.close()


def pod_desired(pod: Pod, name: str) -> tuple[Desired, PodRef]:
    ref = PodRef(namespace="shop", name=name, uid=str(uuid.uuid4()), ips=[pod.ip])
    ns = targets.from_path(pod.path)
    settings = TargetSettings(slow_ns=SLOW_US * 1000, events_per_sec=50)
    return Desired(f"pod:{ref.uid}", f"shop/{name}", lambda: ns, settings, pod=ref, traces=("shop/web",)), ref


def steady_traffic(pod: Pod, client: Pod) -> None:
    """N datagrams at 2000/s to a reader that pauses 5 ms every 200: most cross fast, some wait (the tail)."""
    with pod.serve("udp-recv", "--port", "9000", "--count", str(N), "--timeout", "30",
                   "--pause-every", "200", "--pause-ms", "5") as rx:
        client.traffic("udp-send", "--to", pod.ip, "--port", "9000", "--count", str(N), "--rate", "2000")
    assert rx.result == {"received": N}


def check_backends(prom: Prometheus, jaeger: Jaeger, run: Run) -> None:
    ref, started = run.ref, run.started
    [target] = run.report["targets"]
    ours = target["segments"]
    sel = f'k8s_pod_name="{ref.name}",k8s_namespace_name="{ref.namespace}"'

    # Counts: the pod's native histogram counted exactly the packets the agent counted, per segment.
    def counts():
        return prom.values(f"histogram_count({HIST}{{{sel}}})", by="latencytrace_segment")
    deadline = time.monotonic() + 30
    while {s: ours[s]["count"] for s in ours} != {s: int(v) for s, v in counts().items()}:
        assert time.monotonic() < deadline, ({s: ours[s]["count"] for s in ours}, counts())
        time.sleep(0.5)
    for seg in ("rx_pod_stack", "rx_socket_queue", "rx_total"):  # the datagrams the application read
        assert ours[seg]["count"] == N, (seg, ours[seg]["count"])
    assert ours["rx_host_to_pod"]["count"] >= N + DROPPED  # and those to a closed port

    drops = prom.values(f"latencytrace_network_packet_dropped_total{{{sel}}}", by="error_type")
    assert drops["NO_SOCKET"] == target["drops"]["receive/NO_SOCKET"] == DROPPED, (drops, target["drops"])

    # Quantiles: Prometheus interpolates inside the same 9%-wide buckets the agent does.
    for q, key in ((0.5, "p50_us"), (0.99, "p99_us")):
        theirs = prom.values(f"histogram_quantile({q}, {HIST}{{{sel}}})", by="latencytrace_segment")
        for seg in SEGMENTS:
            mine = ours[seg][key]
            assert mine / BUCKET <= theirs[seg] * 1e6 <= mine * BUCKET, (seg, q, mine, theirs[seg] * 1e6)

    # The pod is the resource: its attributes are labels, the agent is job/instance; points carry only
    # segment, direction and trace.
    [series] = prom.query(f'{HIST}{{{sel},latencytrace_segment="rx_total"}}')
    labels = series["metric"]
    assert labels["k8s_pod_uid"] == ref.uid and labels["k8s_node_name"] == NODE
    assert labels["job"] == "latencytrace-agent" and labels["instance"]
    assert labels["latencytrace_trace"] == "shop/web" and labels["network_io_direction"] == "receive"
    assert "histogram" in series, "not a native histogram"

    # Exemplars: slow packets on the total's histogram; each trace id opens that packet's trace in Jaeger.
    found = prom.exemplars(f'{HIST}{{{sel},latencytrace_segment="rx_total"}}', started - 60, time.time() + 60)
    exemplars = [e for s in found for e in s["exemplars"]]
    assert exemplars, found
    assert all(float(e["value"]) >= SLOW_US * 1e-6 for e in exemplars), exemplars
    for e in exemplars[:3]:
        trace_id, span_id = e["labels"]["trace_id"], e["labels"]["span_id"]
        trace = jaeger.wait_for_trace(trace_id, min_spans=2)
        by_id = {s["spanID"]: s for s in trace["spans"]}
        root = by_id[span_id]  # the total's exemplar names the packet's root span
        assert root["operationName"] == "receive packet" and not root.get("references")
        assert root["duration"] == pytest.approx(float(e["value"]) * 1e6, abs=1.5)
        children = [s for s in trace["spans"] if s["spanID"] != span_id]
        assert children and all(s["references"][0]["spanID"] == span_id for s in children)
        assert {s["operationName"] for s in children} <= set(segments.NAMES)
        assert {"rx_pod_stack", "rx_socket_queue"} <= {s["operationName"] for s in children}
        process = trace["processes"][root["processID"]]
        tags = {t["key"]: t["value"] for t in process["tags"]}
        assert tags["k8s.pod.name"] == ref.name and tags["k8s.pod.uid"] == ref.uid
    # A user searching Jaeger by the pod (a resource attribute) finds its packets.
    found = jaeger.find_traces("latencytrace-agent", limit=5, tags=json.dumps({"k8s.pod.uid": ref.uid}))
    assert found and all(t["processes"] for t in found)


@dataclass(frozen=True)
class Run:
    """One traced pod's run: what the agent reported, the pod, and when it started (wall clock)."""

    report: dict
    ref: PodRef
    started: float
    ended: float


def run(lab: NetLab, name: str, sink_for: Callable[[], object]) -> Run:
    pod, client = lab.add_pod(name), lab.add_pod(f"{name}-client")
    desired, ref = pod_desired(pod, name)
    started = time.time()
    sink = sink_for()
    with running_agent(sink, desired) as report:
        # Drops first: the counter then has a sample in every interval of the traffic that follows, and
        # rate() needs two (sent last, a slow machine once exported only one before the agent stopped).
        client.traffic("udp-send", "--to", pod.ip, "--port", "9999", "--count", str(DROPPED))  # nobody listens
        steady_traffic(pod, client)
        with client.serve("udp-recv", "--port", "9001", "--count", "200", "--timeout", "20"):  # and it sends
            pod.traffic("udp-send", "--to", client.ip, "--port", "9001", "--count", "200", "--rate", "1000")
    assert sink.report().healthy, sink.report()
    return Run(report.as_json(), ref, started, time.time())


@contextmanager
def agent_environment(**variables: str) -> Iterator[None]:
    """Only these OTEL_ variables (and no LATENCYTRACE_ ones) while the agent's sink is built."""
    with pytest.MonkeyPatch.context() as mp:
        for k in [k for k in os.environ if k.startswith(("OTEL_", "LATENCYTRACE_"))]:
            mp.delenv(k)
        for k, v in variables.items():
            mp.setenv(k, v)
        yield


@pytest.fixture(scope="module")
def lab() -> Iterator[NetLab]:
    with NetLab() as lab:
        yield lab


@pytest.fixture(scope="module")
def direct(prometheus: Prometheus, jaeger: Jaeger, lab: NetLab) -> Run:
    """agent -> Prometheus' OTLP receiver (metrics, OTLP/HTTP), agent -> Jaeger (traces, OTLP/HTTP)."""
    with agent_environment(OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
                           OTEL_EXPORTER_OTLP_METRICS_ENDPOINT=f"{prometheus.otlp_http_endpoint}/v1/metrics",
                           OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"{jaeger.otlp_http_endpoint}/v1/traces"):
        return run(lab, "web-direct", lambda: sink_from_settings(node_name=NODE))


@pytest.fixture(scope="module")
def via_collector(collector: Collector, lab: NetLab) -> Run:
    """agent -> OpenTelemetry Collector (OTLP/gRPC) -> Prometheus (otlphttp) and Jaeger (otlp)."""
    with agent_environment():
        return run(lab, "web-collector",
                   lambda: sink_from_settings(f"http://{collector.otlp_grpc_endpoint}", "grpc", node_name=NODE))


def test_direct_to_prometheus_and_jaeger(direct: Run, prometheus: Prometheus, jaeger: Jaeger):
    check_backends(prometheus, jaeger, direct)


def test_through_the_collector(via_collector: Run, prometheus: Prometheus, jaeger: Jaeger):
    check_backends(prometheus, jaeger, via_collector)


ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "charts" / "latencytrace" / "dashboards" / "latencytrace.json"


def test_the_promql_of_the_export_readme_returns_series(direct: Run, prometheus: Prometheus):
    """node_agent/export/README.md's PromQL examples, as written, return the traced pod's series."""
    text = (ROOT / "node_agent" / "export" / "README.md").read_text()
    [block] = [b.split("\n", 1)[1] for b in text.split("```")[1:] if b.startswith("promql\n")]
    queries, current = [], ""
    for line in block.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        current = f"{current} {line.strip()}" if line.startswith(" ") else line.strip()
        if current.count("(") == current.count(")"):
            queries.append(current)
            current = ""
    assert len(queries) >= 4 and not current, queries
    for q in queries:
        result = prometheus.query(q, at=direct.ended)
        assert result, q
        assert any(r["metric"].get("k8s_pod_name") == direct.ref.name for r in result), (q, result)


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of every panel."""
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def test_every_dashboard_panel_returns_series(direct: Run, prometheus: Prometheus):
    """The chart's Grafana dashboard: each panel's PromQL, with the dashboard's variables set to this pod
    and node as Grafana would, returns series from the real Prometheus; its variables' label_values list
    them."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = panel_queries(dashboard)
    assert len(queries) >= 12
    values = {"$__rate_interval": "1m", "$namespace": direct.ref.namespace, "$pod": direct.ref.name,
              "$segment": ".*", "$node": NODE}
    empty = []
    for title, expr in queries:
        promql = expr
        for var, value in values.items():
            promql = promql.replace(var, value)
        assert "$" not in promql, (title, promql)
        if not prometheus.query(promql, at=direct.ended):
            empty.append((title, promql))
    assert not empty, empty
    # Native histograms: the latency panels get histograms or numbers, not the classic _bucket series.
    [heat] = [q for t, q in queries if t.startswith("Receive total")]
    series = prometheus.query(heat.replace("$__rate_interval", "1m").replace("$namespace", "shop")
                              .replace("$pod", direct.ref.name), at=direct.ended)
    assert all("histogram" in s for s in series), series
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        metric, label = var["definition"][len("label_values("):-1].rsplit(", ", 1)
        for name, value in values.items():
            metric = metric.replace(name, value)
        found = prometheus.api(f"label/{label}/values", **{"match[]": metric})
        assert found, (var["name"], metric, label)
