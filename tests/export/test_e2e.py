"""End to end: the real `latencytrace-agent trace` command traces pods in real network namespaces and
exports to real OTLP receivers (ours for metrics, Jaeger v2 for traces), over gRPC and HTTP/protobuf.

What a user would check: the histogram of the pod counts exactly the datagrams its application read,
its exemplars open traces in Jaeger, and those traces show the packet's segments at the kernel's times.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from latencytrace.node_agent import segments
from latencytrace.node_agent.export.metrics import DROPS, LATENCY, TARGETS
from tests.cluster.jaeger import Jaeger
from tests.export.receiver import Receiver, attrs
from tests.netlab import NetLab

AGENT = Path(sys.executable).parent / "latencytrace-agent"
N = 200


@pytest.fixture(scope="module")
def jaeger(tmp_path_factory) -> Iterator[Jaeger]:
    with Jaeger(tmp_path_factory.mktemp("jaeger")) as j:
        yield j


@pytest.fixture
def lab() -> Iterator[NetLab]:
    with NetLab() as lab:
        yield lab


@contextmanager
def agent(args: list[str], env: dict[str, str], tmp_path: Path) -> Iterator[subprocess.Popen]:
    """The agent command in its own process group, stopped (and reaped) whatever happens."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LATENCYTRACE_", "PYTHONPATH"))}
    proc = subprocess.Popen([str(AGENT), *args], env={**clean, **env}, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=open(tmp_path / "agent.log", "wb"), start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        proc.stdout.close()


def finish(proc: subprocess.Popen, tmp_path: Path) -> dict:
    """Stop the agent as a user would (SIGTERM) once the traffic is done, and return its JSON report: it
    exports its last interval and flushes the exporters on the way out."""
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    log = (tmp_path / "agent.log").read_text(errors="replace")
    assert proc.returncode == 0, f"agent exited with {proc.returncode}:\n{log[-3000:]}"
    return json.loads(out)


def tracing(receiver: Receiver, proc: subprocess.Popen, tmp_path: Path) -> None:
    """The agent's first export (target count 1) says its probes are attached and the pod is traced."""
    def ready():
        if proc.poll() is not None:
            raise RuntimeError("agent ended early:\n" + (tmp_path / "agent.log").read_text(errors="replace")[-3000:])
        return any(p.as_int == 1 for _, _, p in receiver.data_points(TARGETS.name))
    receiver.wait_for(ready, timeout=90, message="the agent never exported that it traces the pod")


def last_points(receiver: Receiver, metric: str, **match) -> dict[str, object]:
    """The newest point of `metric` per segment (or per error.type), among points whose attributes or
    resource attributes (a target is its points' resource) match."""
    out: dict[str, object] = {}
    for r, a, p in receiver.data_points(metric):
        if all({**r, **a}.get(k) == v for k, v in match.items()):
            key = a.get("latencytrace.segment") or a.get("error.type")
            if key not in out or p.time_unix_nano >= out[key].time_unix_nano:
                out[key] = p
    return out


def check_trace_times(spans_by_id: dict, root) -> None:
    """Children lie inside the root and start and end exactly at the root's boundary events."""
    boundary = {e.name: e.time_unix_nano for e in root.events}
    children = [s for s in spans_by_id.values() if s.parent_span_id == root.span_id]
    assert children, "a packet trace without segment spans"
    for c in children:
        seg = segments.BY_NAME[c.name]
        assert root.start_time_unix_nano <= c.start_time_unix_nano <= c.end_time_unix_nano <= root.end_time_unix_nano
        end = boundary.get(seg.end) or (boundary.get("pod_rx") if seg.name == "rx_driver" else None)
        assert (c.start_time_unix_nano, c.end_time_unix_nano) == (boundary[seg.start], end), c.name
    assert root.start_time_unix_nano == min(boundary.values())
    assert root.end_time_unix_nano == max(boundary.values())


def test_udp_pod_histograms_and_exemplar_traces_over_grpc(jaeger, lab, tmp_path):
    a, client = lab.add_pod("a"), lab.add_pod("client")
    with Receiver(forward_traces_to=jaeger.otlp_grpc_endpoint) as receiver, \
            agent(["trace", "--netns", a.path, "--interval", "0.5", "--format", "json",
                   "--otlp-endpoint", receiver.grpc_endpoint, "--slow-threshold-us", "1",
                   "--spans-per-second", "20"], {}, tmp_path) as proc:
        tracing(receiver, proc, tmp_path)
        with a.serve("udp-recv", "--port", "9000", "--count", str(N), "--timeout", "20") as rx:
            client.traffic("udp-send", "--to", a.ip, "--port", "9000", "--count", str(N), "--rate", "1000")
        assert rx.result == {"received": N}
        client.traffic("udp-send", "--to", a.ip, "--port", "9999", "--count", "10")  # nobody listens: drops
        report = finish(proc, tmp_path)

    # Histograms: the pod's stack saw exactly the datagrams its application read.
    latest = last_points(receiver, LATENCY.name, **{"latencytrace.netns.inode": a.inode})
    for seg in ("rx_pod_stack", "rx_socket_queue", "rx_total"):
        assert latest[seg].count == N, (seg, latest[seg].count)
    [target_report] = report["targets"]
    for seg, point in latest.items():  # the exported totals are the agent's own, interval for interval
        assert point.count == target_report["segments"][seg]["count"], seg
        assert point.scale == 3 and sum(point.positive.bucket_counts) + point.zero_count == point.count
    drops = last_points(receiver, DROPS.name, **{"network.io.direction": "receive"})
    assert drops["NO_SOCKET"].as_int == 10, {k: p.as_int for k, p in drops.items()}

    # Exemplars: each names a trace of this pod, found in Jaeger's query API with one span per segment.
    exemplars = {(e.trace_id, e.span_id) for seg in ("rx_pod_stack", "rx_total")
                 for res, at, p in receiver.data_points(LATENCY.name)
                 if at.get("latencytrace.segment") == seg and res.get("latencytrace.netns.inode") == a.inode
                 for e in p.exemplars}
    assert exemplars, "no exemplars on the pod's histograms"
    spans = {(s.trace_id, s.span_id): s for _, s in receiver.spans()}
    for trace_id, span_id in list(exemplars)[:5]:
        assert (trace_id, span_id) in spans
        stored = jaeger.wait_for_trace(trace_id.hex(), min_spans=2)
        names = {s["operationName"] for s in stored["spans"]}
        assert "receive packet" in names and "rx_pod_stack" in names, names
        assert span_id.hex() in {s["spanID"] for s in stored["spans"]}
        by_id = {s.span_id: s for (t, _), s in spans.items() if t == trace_id}
        [root] = [s for s in by_id.values() if not s.parent_span_id]
        root_attrs = attrs(root.attributes)
        assert root_attrs["latencytrace.netns.inode"] == a.inode
        assert root_attrs["destination.address"] == a.ip and root_attrs["network.transport"] == "udp"
        check_trace_times(by_id, root)


def test_tcp_sender_exports_over_http_with_the_standard_variables(jaeger, lab, tmp_path):
    a, server = lab.add_pod("a"), lab.add_pod("server")
    with Receiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
               "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"{receiver.http_endpoint}/v1/metrics",
               "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{jaeger.otlp_http_endpoint}/v1/traces",
               "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
               "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=e2e"}
        with agent(["trace", "--netns", a.path, "--interval", "0.5", "--format", "json",
                    "--slow-threshold-us", "1"], env, tmp_path) as proc:
            tracing(receiver, proc, tmp_path)
            with server.serve("tcp-sink", "--port", "9100", "--timeout", "10"):
                a.traffic("tcp-send", "--to", server.ip, "--port", "9100", "--count", "100", "--size", "1000")
            report = finish(proc, tmp_path)

        latest = last_points(receiver, LATENCY.name, **{"latencytrace.netns.inode": a.inode})
        [target_report] = report["targets"]
        # TCP sends 100 writes as fewer skbs the slower the receiver (a busy machine: under 100 once); a GSO skb
        # holds 64 KiB at most, so at least 2 carry the 100 kB. Every transmit segment measured each of
        # them, and the exported totals are the agent's own.
        for seg in ("tx_app_to_dev", "tx_pod_to_host", "tx_qdisc", "tx_driver", "tx_total"):
            assert latest.get(seg) is not None and latest[seg].count >= 2, (seg, latest.get(seg))
            assert latest[seg].count == target_report["segments"][seg]["count"], (seg, latest[seg].count)
        resource = receiver.data_points(LATENCY.name)[0][0]
        assert resource["service.name"] == "latencytrace-agent"
        assert resource["deployment.environment.name"] == "e2e"
        exemplars = [e for _, at, p in receiver.data_points(LATENCY.name)
                     if at.get("latencytrace.segment") == "tx_total" for e in p.exemplars]
        assert exemplars
        stored = jaeger.wait_for_trace(exemplars[-1].trace_id.hex(), min_spans=2)
        names = {s["operationName"] for s in stored["spans"]}
        assert "transmit packet" in names and names & {"tx_qdisc", "tx_driver", "tx_pod_to_host"}, names
        root = next(s for s in stored["spans"] if s["operationName"] == "transmit packet")
        tags = {t["key"]: t["value"] for t in root["tags"]}
        assert tags["destination.address"] == server.ip and tags["destination.port"] == 9100
        assert tags["network.transport"] == "tcp"
