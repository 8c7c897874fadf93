"""OTLP exporters (the OpenTelemetry SDK's, gRPC or HTTP/protobuf) for one endpoint.

We build the data ourselves but send it with the SDK's exporters: they bring TLS, headers, compression,
the standard OTEL_EXPORTER_OTLP_* variables and retries with backoff. What is not given here explicitly
they read from those variables, including the per-signal ones (..._METRICS_ENDPOINT, ..._TRACES_HEADERS).

Credentials: the SDK's exporters read the headers, client certificate and key, CA bundle and credential
providers from the environment for every exporter they build, whatever its endpoint (and an empty value
given here falls back to the environment). So an exporter built `with_credentials=False` (a trace's own
endpoint the administrator did not configure them for) is built with those variables out of the
environment, under a lock, and gets none of the explicit ones either: the backend's token never goes to an
endpoint a tenant named.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from urllib.parse import urlparse

import requests
from opentelemetry.sdk.metrics.export import MetricExporter
from opentelemetry.sdk.trace.export import SpanExporter

from .config import ExportConfigError, ExportSettings

DEFAULT_TIMEOUT_S = 5.0  # short, so that a dead backend costs little and shutdown is quick
SIGNALS = ("metrics", "traces")


@dataclass(frozen=True)
class Exporters:
    endpoint: str  # as shown in reports and metrics
    metrics: MetricExporter | None
    spans: SpanExporter | None
    sessions: tuple[HttpSession, ...] = ()  # HTTP only: they know why the last request failed


def protocol(settings: ExportSettings) -> str:
    return settings.protocol or "grpc"


def env_endpoint(signal: str) -> str | None:
    return os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT")


def signal_enabled(signal: str, settings: ExportSettings) -> bool:
    """OTEL_METRICS_EXPORTER / OTEL_TRACES_EXPORTER=none turn a signal off, as for any OpenTelemetry SDK."""
    if signal == "traces" and not settings.spans:
        return False
    return os.environ.get(f"OTEL_{signal.upper()}_EXPORTER", "otlp").strip().lower() != "none"


def default_destination(settings: ExportSettings) -> dict[str, str | None] | None:
    """The endpoint per signal that targets without an override go to, None where there is none
    (the signal is then not exported by default); None if neither signal has one."""
    out = {}
    for signal in SIGNALS:
        url = settings.endpoint or env_endpoint(signal)
        out[signal] = url if url and signal_enabled(signal, settings) else None
    return out if any(out.values()) else None


def _timeout(settings: ExportSettings) -> float | None:
    if settings.timeout_s is not None:
        return settings.timeout_s
    if os.environ.get("OTEL_EXPORTER_OTLP_TIMEOUT") or os.environ.get("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT"):
        return None  # the exporter reads it (opentelemetry-python takes it in seconds)
    return DEFAULT_TIMEOUT_S


def _http_url(base: str, signal: str) -> str:
    # An endpoint given here is a base URL, as OTEL_EXPORTER_OTLP_ENDPOINT is; the exporters want the
    # signal's path when the URL is passed to them.
    path = urlparse(base).path.rstrip("/")
    if path.endswith(f"/v1/{signal}"):
        return base
    return f"{base.rstrip('/')}/v1/{signal}"


_ENV_LOCK = threading.Lock()
_CREDENTIAL_SUFFIXES = ("_HEADERS", "_CERTIFICATE", "_CLIENT_KEY", "_CLIENT_CERTIFICATE")


def credential_variables(environ=os.environ) -> list[str]:
    """The environment variables through which the SDK's exporters pick up credentials."""
    return [k for k in environ if (k.startswith("OTEL_EXPORTER_OTLP_") and k.endswith(_CREDENTIAL_SUFFIXES))
            or (k.startswith("OTEL_PYTHON_EXPORTER_OTLP_") and k.endswith("CREDENTIAL_PROVIDER"))]


@contextlib.contextmanager
def _without_credentials():
    with _ENV_LOCK:
        saved = {k: os.environ.pop(k) for k in credential_variables()}
        try:
            yield
        finally:
            os.environ.update(saved)


def build(endpoints: dict[str, str | None], settings: ExportSettings, from_env: bool = False,
          with_credentials: bool = True) -> Exporters:
    """Exporters for `endpoints` ({signal: url or None}). With `from_env` the URLs came from the OTEL
    variables and are left for the exporters to resolve (they add the HTTP path per signal themselves).
    Without `with_credentials`, no header, certificate or key of the agent's reaches them."""
    if not with_credentials:
        with _without_credentials():
            return _build(endpoints, replace_credentials(settings), from_env)
    with _ENV_LOCK:  # not while another thread has the credentials out of the environment
        return _build(endpoints, settings, from_env)


def replace_credentials(settings: ExportSettings) -> ExportSettings:
    return settings.model_copy(update={"headers": None, "certificate": None})


def _build(endpoints: dict[str, str | None], settings: ExportSettings, from_env: bool) -> Exporters:
    proto = protocol(settings)
    shown = endpoints.get("metrics") or endpoints.get("traces") or "?"
    made: dict[str, object] = {}
    sessions: list[HttpSession] = []
    for signal in SIGNALS:
        url = endpoints.get(signal)
        if not url:
            made[signal] = None
            continue
        given = None if from_env else url
        if proto == "http/protobuf" and urlparse(url).scheme not in ("http", "https"):
            raise ExportConfigError(f"OTLP/HTTP endpoint {url!r} is not a URL: give http://host:port or https://...")
        try:
            if proto == "grpc":
                made[signal] = _grpc(signal, given, settings)
            else:
                sessions.append(HttpSession())
                made[signal] = _http(signal, given, settings, sessions[-1])
        except (ValueError, OSError) as e:
            raise ExportConfigError(f"cannot export {signal} to {url} over {proto}: {e}") from e
    return Exporters(shown, made["metrics"], made["traces"], tuple(sessions))


def _compression_grpc(settings: ExportSettings):
    if settings.compression is None:
        return None
    from grpc import Compression

    if settings.compression == "deflate":
        return Compression.Deflate
    return Compression.Gzip if settings.compression == "gzip" else Compression.NoCompression


def _grpc(signal: str, url: str | None, settings: ExportSettings):
    credentials = None
    if settings.certificate:
        import grpc

        with open(settings.certificate, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
    kwargs = dict(endpoint=url, insecure=settings.insecure, credentials=credentials, headers=settings.headers,
                  timeout=_timeout(settings), compression=_compression_grpc(settings))
    if signal == "metrics":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter(**kwargs)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(**kwargs)


def _http(signal: str, url: str | None, settings: ExportSettings, session: HttpSession):
    from opentelemetry.exporter.otlp.proto.http import Compression

    compression = None if settings.compression is None else Compression(settings.compression)
    if settings.certificate and not os.path.exists(settings.certificate):
        raise ExportConfigError(f"CA certificate {settings.certificate} does not exist")
    kwargs = dict(endpoint=_http_url(url, signal) if url else None, certificate_file=settings.certificate,
                  headers=settings.headers, timeout=_timeout(settings), compression=compression)
    if not any(v.startswith("OTEL_PYTHON_EXPORTER_OTLP_HTTP") and v.endswith("CREDENTIAL_PROVIDER") for v in os.environ):
        kwargs["session"] = session
    if signal == "metrics":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter(**kwargs)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(**kwargs)




class HttpSession(requests.Session):
    """The HTTP exporters' session, for two things plain requests does not do:
    - the configured CA stays the CA: requests lets REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE in the
      environment override a session's `verify` (psf/requests#3829, kept for compatibility), which would
      make OTEL_EXPORTER_OTLP_CERTIFICATE silently ineffective;
    - it remembers why an export failed: the exporter's own final message does not say. The first failure
      since the worker cleared `last_error` is kept: it is the cause, while the exporter's last retry,
      made with what is left of its timeout, fails with a meaningless "read timed out"."""

    last_error: str | None = None

    def _failed(self, why: str) -> None:
        if self.last_error is None:
            self.last_error = why

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        merged = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if verify is None and isinstance(self.verify, str):
            merged["verify"] = self.verify
        return merged

    def request(self, method, url, *args, **kwargs):
        try:
            response = super().request(method, url, *args, **kwargs)
        except Exception as e:
            self._failed(f"{method} {url}: {e}")
            raise
        if response.status_code >= 400:
            self._failed(f"{method} {url}: HTTP {response.status_code} {response.reason}")
        return response
