"""The OTLP sink: each interval the agent publishes becomes exemplar spans and metrics, cut per
destination and queued for that destination's export thread.

All the work done on the agent's thread is bounded by the number of series and the span cap (no
per-packet work); everything that talks to a backend runs on the export threads (see worker.py).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import replace
from urllib.parse import urlparse

from opentelemetry.sdk.metrics.export import MetricsData, ResourceMetrics, ScopeMetrics
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.semconv.schemas import Schemas

from ..agent import Interval
from ..contract import DestinationReport, ExportReport
from . import attributes as a, otlp
from .clock import WallClock
from .config import ExportSettings
from .metrics import EVENTS_DROPPED, EXPORT_DROPPED, NODE, Built, MetricsBuilder, MetricsConfig, Totals
from .routing import Route, Router, base_resource, exports_of
from .spans import PacketTrace, SpanBuilder, target_key
from .worker import Batch, ExportWorker

log = logging.getLogger(__name__)

# Our attribute names come from this semantic-conventions package; its newest schema describes them.
SCHEMA_URL = max(Schemas, key=lambda s: tuple(int(p) for p in s.value.rsplit("/", 1)[1].split("."))).value


class OtlpSink:
    """A Sink (see agent.Sink) exporting over OTLP. Build one with sink_from_settings() or sink_from_cli()."""

    def __init__(self, settings: ExportSettings, *, clock: WallClock | None = None,
                 exporter_factory: Callable[[str | None], otlp.Exporters] | None = None):
        """`exporter_factory(endpoint)` makes the exporters of one destination (None: the default); the
        default factory builds the SDK's OTLP exporters from `settings`."""
        self.settings = settings
        self.clock = clock or WallClock()
        self.default = otlp.default_destination(settings)
        self._factory = exporter_factory or self._exporters
        self.router = Router(base_resource(settings.service_version, settings.node_name, settings.resource_attributes),
                             self.default is not None, settings.endpoint)
        self.scope = InstrumentationScope("latencytrace.node_agent.export", settings.service_version, SCHEMA_URL)
        self.metrics = MetricsBuilder(MetricsConfig(settings.temporality, settings.histogram, settings.explicit_bounds_s,
                                                    settings.max_series, settings.max_exemplars), settings.node_name)
        self.spans = SpanBuilder(self.clock, settings.node_name)
        self.spans_enabled = otlp.signal_enabled("traces", settings)
        self._workers: dict[str | None, ExportWorker] = {}
        self._retired: Totals = {}  # drop counts of workers closed after their endpoint went out of use
        self._broken: dict[str, str] = {}  # endpoints of traces that cannot be exported to -> why
        self._lock = threading.Lock()
        self._closed = False
        self.last_consume_cpu_s = 0.0  # CPU time the last consume() took on the agent's thread
        if self.default is not None:
            self._worker(None)  # a bad default setting (certificate, URL) fails now, not at the first interval

    # -- configuration -------------------------------------------------------------------------
    def set_traces(self, traces: Iterable) -> None:
        """The cluster's LatencyTraces on this node (contract.NodeTrace): their export overrides decide
        where the pods they select are exported. Call again whenever they change."""
        with self._lock:
            self.router.set_exports(exports_of(traces))
            in_use = self.router.endpoints()
            self._broken = {e: why for e, why in self._broken.items() if e in in_use}
            for endpoint in [e for e in self._workers if e not in in_use]:
                worker = self._workers.pop(endpoint)
                threading.Thread(target=self._retire, args=(worker,), name="lt-otlp-retire", daemon=True).start()

    def _retire(self, worker: ExportWorker) -> None:
        worker.close(self._flush_timeout())
        with self._lock:
            for key, n in _worker_totals(worker).items():
                self._retired[key] = self._retired.get(key, 0) + n

    def _exporters(self, endpoint: str | None) -> otlp.Exporters:
        if endpoint is None:
            return otlp.build(self.default or {}, self.settings, from_env=self.settings.endpoint is None)
        if not self.settings.trace_endpoint_allowed(endpoint):
            raise otlp.ExportConfigError(f"{endpoint} is not in this cluster's allowed export endpoints")
        signals = {s: endpoint if otlp.signal_enabled(s, self.settings) else None for s in otlp.SIGNALS}
        # A trace's own endpoint: the agent's credentials only where the administrator configured them.
        return otlp.build(signals, self.settings, with_credentials=self.settings.credentials_for(endpoint))

    def _worker(self, endpoint: str | None) -> ExportWorker:
        w = self._workers.get(endpoint)
        if w is None:
            w = self._workers[endpoint] = ExportWorker(self._factory(endpoint), self.settings.queue_batches)
        return w

    def _trace_worker(self, endpoint: str) -> ExportWorker | None:
        """The worker of a trace's own endpoint; None (reported, logged once) if its settings are unusable,
        so that one trace's bad endpoint does not stop the others' export."""
        if endpoint in self._broken:
            return None
        try:
            return self._worker(endpoint)
        except Exception as e:  # ExportConfigError, or whatever else the exporters make of a bad URL
            self._broken[endpoint] = str(e) if isinstance(e, otlp.ExportConfigError) else f"{type(e).__name__}: {e}"
            log.error("not exporting to %s: %s", endpoint, self._broken[endpoint])
            return None

    def _flush_timeout(self) -> float:
        return (self.settings.timeout_s or otlp.DEFAULT_TIMEOUT_S) + 1.0

    # -- the Sink protocol ---------------------------------------------------------------------
    def consume(self, interval: Interval) -> None:
        started = time.thread_time()
        with self._lock:
            if self._closed:
                return
            self.clock.maybe_resync()
            traces = self.spans.build(interval) if self.spans_enabled else []
            built = self.metrics.build(interval, traces, self._totals())
            owners: dict[Route, set[Hashable]] = defaultdict(set)
            for target in interval.targets.values():
                for route in self.router.routes(target):
                    owners[route].add(target_key(target))
            for route in self.router.node_routes():
                owners[route].add(NODE)
            by_endpoint: dict[str | None, list[Route]] = defaultdict(list)
            for route in owners:
                by_endpoint[route.endpoint].append(route)
            for endpoint, routes in by_endpoint.items():
                worker = self._worker(None) if endpoint is None else self._trace_worker(endpoint)
                if worker is None:
                    continue
                worker.submit(self._batch(routes, owners, built, traces, with_spans=worker.exporters.spans is not None))
        self.last_consume_cpu_s = time.thread_time() - started

    def _batch(self, routes: list[Route], owners: dict[Route, set[Hashable]], built: Built,
               traces: list[PacketTrace], with_spans: bool) -> Batch:
        """One resource per route and owner: a traced pod is the resource of its metrics and spans (the
        agent's resource with the pod's attributes); the agent's own metrics (NODE) have the agent's."""
        resource_metrics, packets = [], []  # packets: one callable per packet, making its spans (worker.Batch)
        traces_of: dict[Hashable, list[PacketTrace]] = defaultdict(list)
        if with_spans:
            for tr in traces:
                traces_of[tr.owner].append(tr)
        for route in sorted(routes, key=lambda r: r.resource_attributes):
            metrics_of = built.by_owner(owners[route])
            for owner in sorted(owners[route], key=_owner_order):
                resource = self.router.resource(route, built.resources.get(owner))
                metrics = metrics_of.get(owner, [])
                if not with_spans:  # exemplars would name spans this destination never receives
                    metrics = [_without_exemplars(m) for m in metrics]
                if metrics:
                    resource_metrics.append(ResourceMetrics(resource, [ScopeMetrics(self.scope, metrics, SCHEMA_URL)],
                                                            SCHEMA_URL))
                packets.extend(functools.partial(tr.spans, resource, self.scope) for tr in traces_of.get(owner, ()))
        return Batch(packets, MetricsData(resource_metrics) if resource_metrics else None,
                     cumulative=self.settings.temporality == "cumulative")

    def _totals(self) -> Totals:
        """Cumulative counts kept here rather than in the kernel, for the health metrics."""
        out: Totals = dict(self._retired)
        out[(EVENTS_DROPPED, ((a.ERROR_TYPE, "span_rate_limit"),))] = self.spans.rate_limited
        out[(EVENTS_DROPPED, ((a.ERROR_TYPE, "target_removed"),))] = self.spans.unknown_target
        for w in self._workers.values():
            for key, n in _worker_totals(w).items():
                out[key] = out.get(key, 0) + n
        return out

    def close(self) -> None:
        """Export everything queued (each destination for at most the export timeout + 1 s), then stop."""
        with self._lock:
            self._closed = True
            workers = list(self._workers.values())
        closers = [threading.Thread(target=w.close, args=(self._flush_timeout(),), daemon=True) for w in workers]
        for t in closers:
            t.start()
        for t in closers:
            t.join()

    # -- health ----------------------------------------------------------------------------------
    def report(self) -> ExportReport:
        """For the node's status: healthy if every destination's last export worked; each destination's
        own health in `destinations` (the operator shows each trace the one it exports to)."""
        with self._lock:
            workers = list(self._workers.items())
            broken = dict(self._broken)
        errors = [f"{w.endpoint}: {w.last_error}" for _, w in workers if not w.healthy and w.last_error]
        errors += [f"{endpoint}: {why}" for endpoint, why in broken.items()]
        default = self.default or {}
        default_endpoint = default.get("metrics") or default.get("traces")
        destinations = [DestinationReport(endpoint=default_endpoint if key is None else key, default=key is None,
                                          healthy=w.healthy, dropped_batches=sum(_worker_totals(w).values()),
                                          last_error=w.last_error)
                        for key, w in workers]
        destinations += [DestinationReport(endpoint=endpoint, healthy=False, last_error=why)
                         for endpoint, why in broken.items()]
        return ExportReport(
            endpoint=default_endpoint,
            healthy=all(w.healthy for _, w in workers) and not broken,
            dropped_batches=sum(n for _, w in workers for n in _worker_totals(w).values())
            + sum(self._retired.values()),
            last_error="; ".join(errors) or next((w.last_error for _, w in workers if w.last_error), None),
            destinations=sorted(destinations, key=lambda d: (not d.default, d.endpoint or "")))


def _server(endpoint: str) -> tuple[tuple[str, object], ...]:
    u = urlparse(endpoint if "//" in endpoint else f"//{endpoint}")
    out: list[tuple[str, object]] = [(a.SERVER_ADDRESS, u.hostname or endpoint)]
    try:
        port = u.port
    except ValueError:  # not a number, or out of range: the address says it all
        port = None
    if port:
        out.append((a.SERVER_PORT, port))
    return tuple(out)


def _worker_totals(w: ExportWorker) -> Totals:
    out: Totals = {}
    for reason, n in (("queue_full", w.dropped_queue_full), ("export_failed", w.failed),
                      ("shutdown", w.dropped_at_shutdown)):
        out[(EXPORT_DROPPED, tuple(sorted(((a.ERROR_TYPE, reason), *_server(w.endpoint)))))] = n
    return out


def _owner_order(owner: Hashable) -> tuple:
    """The agent's own resource first, then targets by slot: a stable order of resources in a request."""
    return (0, ()) if owner == NODE else (1, owner)


def _without_exemplars(metric):
    data = metric.data
    points = [replace(p, exemplars=[]) for p in data.data_points]
    return replace(metric, data=replace(data, data_points=points))
