"""A real OTLP receiver for tests: gRPC (opentelemetry-proto's MetricsService and TraceService) and
HTTP/protobuf (/v1/metrics, /v1/traces), keeping every request it accepted.

Jaeger stores no metrics, so this is where the tests read metrics; traces can be forwarded to Jaeger as
well (`forward_traces_to`), so that one agent endpoint feeds both. `available = False` makes it answer
UNAVAILABLE / 503 like a backend that is down, `delay_s` like a slow one, and clearing `gate` one that
holds every request until the test sets it again (`arrived` counts the requests that reached it);
`rejected_points` answers metrics over HTTP with an OTLP partial success.

    with Receiver() as r:
        ... export to r.grpc_endpoint or r.http_endpoint ...
        r.wait_for(lambda: r.data_points("latencytrace.network.stack.duration"))
"""

from __future__ import annotations

import gzip
import ssl
import threading
import time
import zlib
from collections.abc import Callable
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as msvc, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tsvc, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue


def value(v: AnyValue):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def attrs(kvs: list[KeyValue]) -> dict:
    return {kv.key: value(kv.value) for kv in kvs}


class Receiver:
    def __init__(self, forward_traces_to: str | None = None, tls=None, grpc_port: int = 0, http_port: int = 0):
        """`tls`: a tests.cluster.pki.CertPair to serve both protocols over TLS with. The ports: 0 for any
        free one, or the ports of a receiver that was stopped (a backend coming back)."""
        self.grpc_port, self.http_port = grpc_port, http_port
        self.rejected_points = 0  # > 0: answer with an OTLP partial success rejecting this many points
        self.forward_traces_to = forward_traces_to
        self.tls = tls
        self.metrics: list[msvc.ExportMetricsServiceRequest] = []
        self.traces: list[tsvc.ExportTraceServiceRequest] = []
        self.headers: list[dict[str, str]] = []
        self.available = True
        self.delay_s = 0.0
        self.gate = threading.Event()
        self.gate.set()
        self.arrived = 0
        self.refused = 0
        self._lock = threading.Lock()
        self._grpc: grpc.Server | None = None
        self._http: ThreadingHTTPServer | None = None
        self._forward: grpc.Channel | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> Receiver:
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(self), self._grpc)
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(self), self._grpc)
        if self.tls is None:
            self.grpc_port = self._grpc.add_insecure_port(f"127.0.0.1:{self.grpc_port}")
        else:
            creds = grpc.ssl_server_credentials([(self.tls.key_pem, self.tls.cert_pem)])
            self.grpc_port = self._grpc.add_secure_port(f"127.0.0.1:{self.grpc_port}", creds)
        self._grpc.start()
        self._http = ThreadingHTTPServer(("127.0.0.1", self.http_port), _http_handler(self))
        if self.tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.tls.cert, self.tls.key)
            self._http.socket = ctx.wrap_socket(self._http.socket, server_side=True)
        self.http_port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, name="otlp-http-receiver", daemon=True).start()
        if self.forward_traces_to:
            self._forward = grpc.insecure_channel(self.forward_traces_to)
        return self

    def stop(self) -> None:
        self.gate.set()  # release held requests, so that the servers can stop
        if self._grpc is not None:
            self._grpc.stop(grace=None)
            self._grpc = None
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._forward is not None:
            self._forward.close()
            self._forward = None

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def scheme(self) -> str:
        return "http" if self.tls is None else "https"

    @property
    def grpc_endpoint(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.http_port}"

    # -- what the servers call ------------------------------------------------------------------
    def _accept(self) -> bool:
        with self._lock:
            self.arrived += 1
        self.gate.wait()
        if self.delay_s:
            time.sleep(self.delay_s)
        if not self.available:
            with self._lock:
                self.refused += 1
            return False
        return True

    def _store(self, request, headers: dict[str, str]) -> None:
        with self._lock:
            (self.metrics if isinstance(request, msvc.ExportMetricsServiceRequest) else self.traces).append(request)
            self.headers.append(headers)
        if self._forward is not None and isinstance(request, tsvc.ExportTraceServiceRequest):
            trace_service_pb2_grpc.TraceServiceStub(self._forward).Export(request, timeout=10)

    # -- reading what arrived -------------------------------------------------------------------
    def data_points(self, metric: str) -> list[tuple[dict, dict, object]]:
        """(resource attributes, point attributes, point) of every data point of `metric` received."""
        out = []
        with self._lock:
            requests = list(self.metrics)
        for req in requests:
            for rm in req.resource_metrics:
                res = attrs(rm.resource.attributes)
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        if m.name != metric:
                            continue
                        kind = m.WhichOneof("data")
                        for p in getattr(m, kind).data_points:
                            out.append((res, attrs(p.attributes), p))
        return out

    def metric_names(self) -> set[str]:
        with self._lock:
            return {m.name for req in self.metrics for rm in req.resource_metrics for sm in rm.scope_metrics
                    for m in sm.metrics}

    def metric(self, name: str):
        """The last Metric message named `name` (for its unit, type and temporality)."""
        with self._lock:
            found = [m for req in self.metrics for rm in req.resource_metrics for sm in rm.scope_metrics
                     for m in sm.metrics if m.name == name]
        return found[-1] if found else None

    def spans(self) -> list[tuple[dict, object]]:
        """(resource attributes, span) of every span received."""
        with self._lock:
            requests = list(self.traces)
        return [(attrs(rs.resource.attributes), s) for req in requests for rs in req.resource_spans
                for ss in rs.scope_spans for s in ss.spans]

    def wait_for(self, what: Callable[[], object], timeout: float = 20.0, message: str = "") -> object:
        deadline = time.monotonic() + timeout
        while True:
            got = what()
            if got:
                return got
            if time.monotonic() > deadline:
                raise TimeoutError(message or "the OTLP receiver did not get what the test waited for")
            time.sleep(0.05)


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, r: Receiver):
        self.r = r

    def Export(self, request, context):
        return _grpc_export(self.r, request, context, msvc.ExportMetricsServiceResponse())


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, r: Receiver):
        self.r = r

    def Export(self, request, context):
        return _grpc_export(self.r, request, context, tsvc.ExportTraceServiceResponse())


def _grpc_export(r: Receiver, request, context, response):
    if not r._accept():
        context.abort(grpc.StatusCode.UNAVAILABLE, "receiver unavailable (test)")
    r._store(request, dict(context.invocation_metadata()))
    return response


def _http_handler(r: Receiver):
    paths = {"/v1/metrics": (msvc.ExportMetricsServiceRequest, msvc.ExportMetricsServiceResponse),
             "/v1/traces": (tsvc.ExportTraceServiceRequest, tsvc.ExportTraceServiceResponse)}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            kinds = paths.get(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if kinds is None:
                self.send_error(404)
                return
            if not r._accept():
                self.send_error(503, "receiver unavailable (test)")
                return
            encoding = self.headers.get("Content-Encoding", "")
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            request = kinds[0]()
            request.ParseFromString(body)
            r._store(request, {k.lower(): v for k, v in self.headers.items()})
            response = kinds[1]()
            if r.rejected_points and isinstance(request, msvc.ExportMetricsServiceRequest):
                response.partial_success.rejected_data_points = r.rejected_points
                response.partial_success.error_message = "rejected by the test backend"
            out = response.SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):  # keep pytest's output clean
            pass

    return Handler
