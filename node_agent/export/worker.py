"""One endpoint's export queue and the thread that drains it, so that the agent's loop never waits on a
backend.

The queue holds whole intervals (batches) and is bounded: when the backend is down or slow the oldest
batch goes, counted. A cumulative metrics batch contains everything an older one said, so queueing it
retires the metrics of the batches still waiting (their spans stay) and sends the newest totals with the
next batch out: a backend that comes back gets the current totals first and nothing is lost but
resolution. The SDK exporters retry with backoff within their timeout; after that a batch counts as
failed and the next one is tried, so export resumes by itself when the backend is back. Within a batch
spans go before metrics, so that an exemplar's trace is normally there first (after a backlog, the
newest exemplars can arrive before their spans). A batch holds packets' traces, not spans: each makes
its spans when its request is sent (spans.PacketTrace), so a queue behind a slow backend holds a fraction
of the memory its spans would take.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from opentelemetry.sdk.metrics.export import MetricExportResult, MetricsData
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult

from .otlp import Exporters

log = logging.getLogger(__name__)

# Packets' traces waiting in one queue, at most (oldest batches go first, counted as dropped batches): a
# queue bounded in batches alone holds whatever an interval brought, and at a high span rate a slow backend
# let the agent grow by hundreds of MB (tests/bench/soak.py). A queued trace is about 1.3 KiB (its event
# and ids; its spans would be 5.2 KiB): 11 MiB at the bound, twice what one interval can bring (the event
# reader keeps at most 4096 events an interval).
MAX_QUEUED_TRACES = 8192
# Spans per export request: an interval's spans in one request exceeded the 4 MiB a gRPC server (the
# OpenTelemetry Collector's default) accepts, and the whole batch was refused.
SPANS_PER_REQUEST = 512


@dataclass
class Batch:
    traces: list[Callable[[], list[ReadableSpan]]] = field(default_factory=list)  # each makes one packet's spans
    metrics: MetricsData | None = None
    cumulative: bool = True  # its metrics contain those of every earlier batch


class _ExporterErrors(logging.Filter):
    """The SDK exporters tell why an export failed only in their log; this keeps the first warning or
    error of each export attempt (the cause; later ones are about giving up) per worker thread, for the
    health report. It is a filter placed first on the exporters' own loggers, because the gRPC exporter's
    logger drops repeats of a message (any endpoint) for 20 s before any handler would see them."""

    LOGGERS = ("opentelemetry.exporter.otlp.proto.grpc.exporter",
               "opentelemetry.exporter.otlp.proto.http.metric_exporter",
               "opentelemetry.exporter.otlp.proto.http.trace_exporter")

    def __init__(self) -> None:
        super().__init__()
        self.by_thread: dict[int, ExportWorker] = {}
        for name in self.LOGGERS:
            filters = logging.getLogger(name).filters
            if self not in filters:
                filters.insert(0, self)

    def filter(self, record: logging.LogRecord) -> bool:
        worker = self.by_thread.get(record.thread)
        if worker is not None and worker.captured is None and record.levelno >= logging.WARNING:
            try:
                worker.captured = record.getMessage()
            except Exception:  # a malformed record must not break the exporter's own logging
                pass
        return True  # only reads: whether the record is logged is not ours to decide


_errors = _ExporterErrors()


def _requests(traces: list[Callable[[], list[ReadableSpan]]]):
    """The spans of `traces` in requests of at most SPANS_PER_REQUEST (a packet's spans stay together),
    each made only when the one before it was sent."""
    request: list[ReadableSpan] = []
    for make in traces:
        spans = make()
        if request and len(request) + len(spans) > SPANS_PER_REQUEST:
            yield request
            request = []
        request.extend(spans)
    if request:
        yield request


class ExportWorker:
    def __init__(self, exporters: Exporters, max_batches: int = 16, max_traces: int = MAX_QUEUED_TRACES):
        self.exporters = exporters
        self.endpoint = exporters.endpoint
        self.max_batches = max_batches
        self.max_traces = max_traces
        self._queue: collections.deque[Batch] = collections.deque()
        self._cv = threading.Condition()
        self._busy = False
        self._closing = False
        self.exported = 0
        self.failed = 0  # batches the exporter gave up on after its retries
        self.dropped_queue_full = 0
        self.dropped_at_shutdown = 0
        self.superseded = 0  # metrics of queued batches replaced by newer cumulative ones (not lost)
        self.healthy = True
        self.last_error: str | None = None
        self.captured: str | None = None  # what the exporter logged during the current export
        self._thread = threading.Thread(target=self._run, name=f"lt-otlp {self.endpoint}", daemon=True)
        self._thread.start()
        _errors.by_thread[self._thread.ident] = self

    def submit(self, batch: Batch) -> None:
        with self._cv:
            if batch.metrics is not None and batch.cumulative:
                for old in self._queue:
                    if old.metrics is not None and old.cumulative:
                        old.metrics = None
                        self.superseded += 1
                self._queue = collections.deque(b for b in self._queue if b.traces)
            queued = sum(len(b.traces) for b in self._queue) + len(batch.traces)
            while self._queue and (len(self._queue) >= self.max_batches or queued > self.max_traces):
                queued -= len(self._queue.popleft().traces)
                self.dropped_queue_full += 1
                if self.dropped_queue_full == 1 or self.dropped_queue_full % 100 == 0:
                    log.warning("OTLP export to %s is behind; dropped %d batch(es) so far (last error: %s)",
                                self.endpoint, self.dropped_queue_full, self.last_error or "none yet")
            if batch.cumulative and batch.metrics is not None and self._queue:
                # The newest totals ride with the next batch out, not behind the backlog's spans.
                self._queue[0].metrics, batch.metrics = batch.metrics, None
            if batch.traces or batch.metrics is not None:
                self._queue.append(batch)
            self._cv.notify_all()

    def pending(self) -> int:
        with self._cv:
            return len(self._queue) + self._busy

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    self._cv.wait()
                if not self._queue:
                    return
                batch = self._queue.popleft()
                self._busy = True
            self.captured = None
            for session in self.exporters.sessions:
                session.last_error = None
            try:
                ok = self._export(batch)
            except Exception as e:  # a bug or an exporter surprise must not end the thread
                log.exception("OTLP export to %s failed unexpectedly", self.endpoint)
                self.captured, ok = f"{type(e).__name__}: {e}", False
            with self._cv:
                self._busy = False
                self._record(ok)
                self._cv.notify_all()

    def _export(self, batch: Batch) -> bool:
        ok = True
        if batch.traces and self.exporters.spans is not None:
            for request in _requests(batch.traces):  # one failed request fails the rest too
                ok = self.exporters.spans.export(request) == SpanExportResult.SUCCESS
                if not ok:
                    break
        if batch.metrics is not None and self.exporters.metrics is not None:
            ok = self.exporters.metrics.export(batch.metrics) == MetricExportResult.SUCCESS and ok
        return ok

    def _record(self, ok: bool) -> None:
        if ok:
            self.exported += 1
            if not self.healthy:
                log.warning("OTLP export to %s works again", self.endpoint)
            self.healthy = True
            return
        self.failed += 1
        detail = next((s.last_error for s in self.exporters.sessions if s.last_error), None)
        self.last_error = detail or self.captured or self.last_error or "export failed (see the exporter's log)"
        if self.healthy:
            log.warning("OTLP export to %s failing: %s; retrying with every interval", self.endpoint, self.last_error)
        self.healthy = False

    def close(self, timeout_s: float) -> None:
        """Export what is queued, for at most `timeout_s`; then stop (the rest is counted as dropped)."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            self._closing = True
            self._cv.notify_all()
            while (self._queue or self._busy) and (left := deadline - time.monotonic()) > 0:
                self._cv.wait(left)
            if self._queue:
                self.dropped_at_shutdown += len(self._queue)
                log.warning("OTLP export to %s: %d batch(es) not sent before shutdown (last error: %s)",
                            self.endpoint, len(self._queue), self.last_error or "none")
                self._queue.clear()
        for exporter in (self.exporters.spans, self.exporters.metrics):
            if exporter is not None:
                try:
                    exporter.shutdown()  # also cuts short a retry still sleeping
                except Exception:
                    log.exception("shutting down the OTLP exporter for %s failed", self.endpoint)
        self._thread.join(timeout=2)
        _errors.by_thread.pop(self._thread.ident, None)
