"""The export queue: bounded, never blocking the producer, newest cumulative totals first."""

from __future__ import annotations

import threading
import time

from opentelemetry.sdk.metrics.export import MetricExportResult, MetricsData
from opentelemetry.sdk.trace.export import SpanExportResult

from latencytrace.node_agent.export.otlp import Exporters
from latencytrace.node_agent.export.worker import Batch, ExportWorker


class GatedExporter:
    """Records what it is asked to export; blocks until the gate opens (the test, or shutdown, opens it;
    `gave_up` counts waits that ended without either); fails while `failing`."""

    def __init__(self, log: list, gate: threading.Event):
        self.log, self.gate, self.failing = log, gate, False
        self.gave_up = 0
        self.shut_down = threading.Event()

    def export(self, data, *_, **__):
        if not self.gate.wait(60):
            self.gave_up += 1
        self.log.append(data)
        if isinstance(data, MetricsData):
            return MetricExportResult.FAILURE if self.failing else MetricExportResult.SUCCESS
        return SpanExportResult.FAILURE if self.failing else SpanExportResult.SUCCESS

    def shutdown(self, *_, **__):
        self.shut_down.set()
        self.gate.set()


def packet(*spans: str):
    """A packet's trace as a batch holds it: it makes its spans when they are sent (here, names)."""
    return lambda: list(spans)


def batch(n: int) -> Batch:
    return Batch(traces=[packet(f"S{n}")], metrics=MetricsData(resource_metrics=[f"M{n}"]))


def names(log: list) -> list[str]:
    return [x.resource_metrics[0] if isinstance(x, MetricsData) else x[0] for x in log]


def worker(max_batches: int = 2):
    log, gate = [], threading.Event()
    exporter = GatedExporter(log, gate)
    return ExportWorker(Exporters("test", exporter, exporter), max_batches), exporter, log, gate


def wait(cond, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_backlog_is_bounded_and_the_newest_totals_go_out_next():
    w, _, log, gate = worker(max_batches=2)
    w.submit(batch(1))
    wait(lambda: w.pending() == 1 and not w._queue)  # batch 1 is in flight, held at the gate
    for n in (2, 3, 4):
        w.submit(batch(n))  # returns while batch 1 is held: submit() never waits for the exporter
    assert not gate.is_set() and names(log) == []
    assert w.pending() == 3  # one in flight, two queued
    gate.set()
    w.close(timeout_s=5)
    # Batch 2's spans were pushed out by the bound; metrics 2 and 3 were replaced by 4's totals, which
    # went out with the next batch rather than after the backlog.
    assert names(log) == ["S1", "M1", "S3", "M4", "S4"]
    assert (w.dropped_queue_full, w.superseded, w.exported) == (1, 2, 3)


def test_failures_are_reported_and_export_resumes_by_itself():
    w, exporter, log, gate = worker()
    gate.set()
    exporter.failing = True
    w.submit(batch(1))
    wait(lambda: not w.healthy)
    assert w.failed == 1 and w.last_error
    exporter.failing = False
    w.submit(batch(2))
    wait(lambda: w.healthy)
    w.close(timeout_s=5)
    assert names(log)[-2:] == ["S2", "M2"]


def test_close_flushes_what_is_queued_and_gives_up_at_its_deadline():
    w, exporter, log, gate = worker(max_batches=8)
    for n in range(3):
        w.submit(Batch(traces=[packet(f"S{n}")]))
    wait(lambda: w.pending() == 3 and len(w._queue) == 2)  # S0 in flight, held at the gate
    w.close(timeout_s=0.3)  # the test never opens the gate: the exporter hangs until shut down
    # close() gave up at its deadline and shut the exporter down, which released the export in flight
    # (it did not end by itself); the two batches still queued were dropped, not sent.
    assert exporter.shut_down.is_set() and exporter.gave_up == 0
    assert w.dropped_at_shutdown == 2 and names(log) == ["S0"]


def traces_batch(tag: str, n: int) -> Batch:
    return Batch(traces=[packet(f"{tag}{i}") for i in range(n)])


def test_queued_traces_are_bounded_too_and_go_out_in_requests_a_backend_accepts():
    """A queue bounded in batches alone held whatever the intervals brought (hundreds of MB at a high span
    rate with a slow backend); and one request per interval exceeded what a gRPC backend accepts (4 MiB).
    The oldest batches go once the queued packets' traces pass the bound (counted as dropped batches); a
    batch's spans are sent in requests of at most SPANS_PER_REQUEST."""
    from latencytrace.node_agent.export import worker as worker_module

    log, gate = [], threading.Event()
    exporter = GatedExporter(log, gate)
    w = ExportWorker(Exporters("test", exporter, exporter), max_batches=100, max_traces=1500)
    w.submit(traces_batch("a", 10))
    wait(lambda: w.pending() == 1 and not w._queue)  # "a" in flight, held at the gate
    for tag in "bcd":
        w.submit(traces_batch(tag, 600))  # b and c fit in 1500; d pushes b out
    assert [b.traces[0]() for b in w._queue] == [["c0"], ["d0"]] and w.dropped_queue_full == 1
    gate.set()
    w.close(timeout_s=5)
    per_request = worker_module.SPANS_PER_REQUEST
    assert [len(x) for x in log] == [10, per_request, 600 - per_request, per_request, 600 - per_request]
    assert [x[0] for x in log] == ["a0", "c0", f"c{per_request}", "d0", f"d{per_request}"]
    assert w.exported == 3


def test_a_packets_spans_are_made_when_sent_and_stay_in_one_request():
    """Spans are made from a packet's trace only when its request goes out, and never split across two
    requests (a root and its segments arrive together)."""
    from latencytrace.node_agent.export import worker as worker_module

    per_request = worker_module.SPANS_PER_REQUEST
    made = []

    def packet_of(i: int, n: int):
        def make():
            made.append(i)
            return [f"p{i}.{k}" for k in range(n)]
        return make

    log, gate = [], threading.Event()
    exporter = GatedExporter(log, gate)
    w = ExportWorker(Exporters("test", exporter, exporter), max_batches=4)
    n_packets = per_request // 6 + 2  # six spans each: the last ones do not fit in the first request
    w.submit(Batch(traces=[packet_of(i, 6) for i in range(n_packets)]))
    wait(lambda: len(made) > 0)
    # Held at the gate with the first request: the packets after it have not made their spans yet.
    assert made == list(range(per_request // 6 + 1)) and log == []
    gate.set()
    w.close(timeout_s=5)
    assert [len(x) for x in log] == [per_request // 6 * 6, (n_packets - per_request // 6) * 6]
    first = {s.split(".")[0] for s in log[0]}
    assert first.isdisjoint(s.split(".")[0] for s in log[1])  # no packet's spans in both requests
