"""The exporter's one typed configuration: arguments first, then environment variables, then defaults.

Variables are LATENCYTRACE_EXPORT_<FIELD> (e.g. LATENCYTRACE_EXPORT_MAX_SERIES=8192) and, where
OpenTelemetry defines one, the standard variable (OTEL_EXPORTER_OTLP_PROTOCOL, ..._TEMPORALITY_PREFERENCE,
..._DEFAULT_HISTOGRAM_AGGREGATION). Endpoint, headers, TLS files, compression and timeout left unset here
are read by the OpenTelemetry exporters themselves from the standard OTEL_EXPORTER_OTLP_* variables, with
their per-signal variants. An invalid value fails at start with a message naming the variable.

`allowed_endpoints` (LATENCYTRACE_EXPORT_ALLOWED_ENDPOINTS, JSON) is the administrator's list of the
endpoints a LatencyTrace may name besides the default, each saying whether the agent's credentials (OTLP
headers, client certificate, CA bundle) go there too; unset, any endpoint is allowed, without them.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .. import endpoints
from ..version import version
from .datapoints import DEFAULT_EXPLICIT_BOUNDS_S

PREFIX = "LATENCYTRACE_EXPORT_"


class ExportConfigError(ValueError):
    pass


class AllowedEndpoint(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoint: str
    credentials: bool = False  # the agent's headers and certificates go to it as well

    @field_validator("endpoint")
    @classmethod
    def _url(cls, v):
        why = endpoints.problem(v)
        if why:
            raise ValueError(why)
        return v


def _env(field: str, *standard: str) -> AliasChoices:
    return AliasChoices(field, f"{PREFIX}{field.upper()}", *standard)


class ExportSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, frozen=True, extra="forbid", populate_by_name=True,
                                      case_sensitive=False)

    # Default destination for every target; None: OTEL_EXPORTER_OTLP_[METRICS_|TRACES_]ENDPOINT.
    endpoint: str | None = None
    protocol: Literal["grpc", "http/protobuf"] | None = Field(
        None, validation_alias=_env("protocol", "OTEL_EXPORTER_OTLP_PROTOCOL"))
    headers: dict[str, str] | None = None
    insecure: bool | None = None  # gRPC only; HTTP follows the URL's scheme
    certificate: str | None = None  # CA bundle (PEM) to verify the endpoint's certificate
    compression: Literal["gzip", "deflate", "none"] | None = None
    timeout_s: float | None = Field(None, gt=0)  # per export, retries included; None: 5 s or the OTEL variable
    temporality: Literal["cumulative", "delta"] = Field(
        "cumulative", validation_alias=_env("temporality", "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE"))
    histogram: Literal["exponential", "explicit"] = Field(
        "exponential",
        validation_alias=_env("histogram", "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION"))
    explicit_bounds_s: tuple[float, ...] = DEFAULT_EXPLICIT_BOUNDS_S
    max_series: int = Field(4096, ge=1)  # per metric
    max_exemplars: int = Field(8, ge=0)  # per histogram data point
    spans: bool = True  # export exemplar spans (OTEL_TRACES_EXPORTER=none turns them off as well)
    queue_batches: int = Field(16, ge=1)  # per endpoint; one batch is one interval
    node_name: str | None = None
    service_version: str = Field(default_factory=version)
    resource_attributes: dict[str, str] = Field(default_factory=dict)
    # Endpoints traces may name (see the module docstring); None: any, without credentials.
    allowed_endpoints: tuple[AllowedEndpoint, ...] | None = None

    def trace_endpoint_allowed(self, url: str) -> bool:
        """May a trace export to `url`? The default endpoint and the allow-list's; any without a list."""
        if self.allowed_endpoints is None:
            return True
        default = self.endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return (default is not None and same_endpoint(url, default)) or \
            any(same_endpoint(url, a.endpoint) for a in self.allowed_endpoints)

    def credentials_for(self, url: str) -> bool:
        """Do the agent's credentials go to a trace's endpoint `url`? Only where the administrator said so."""
        return any(a.credentials and same_endpoint(url, a.endpoint) for a in self.allowed_endpoints or ())

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v):
        # The same rules as a trace's endpoint; gRPC also takes host:port without a scheme.
        why = None if v is None else endpoints.problem(v if "://" in v else f"grpc://{v}")
        if why:
            raise ValueError(why)
        return v

    @field_validator("temporality", mode="before")
    @classmethod
    def _temporality(cls, v):
        v = str(v).strip().lower()
        # "lowmemory" asks for delta on synchronous counters and histograms, which is all we have that can be.
        return "delta" if v == "lowmemory" else v

    @field_validator("histogram", mode="before")
    @classmethod
    def _histogram(cls, v):
        v = str(v).strip().lower()
        return {"base2_exponential_bucket_histogram": "exponential", "explicit_bucket_histogram": "explicit"}.get(v, v)

    @field_validator("protocol", "compression", mode="before")
    @classmethod
    def _lower(cls, v):
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("explicit_bounds_s")
    @classmethod
    def _bounds(cls, v):
        if not v or any(b <= 0 for b in v) or any(x >= y for x, y in zip(v, v[1:])):
            raise ValueError("boundaries must be positive and increasing (seconds)")
        return v


def same_endpoint(a: str, b: str) -> bool:
    """Endpoints compare as written, but for a trailing slash (as the operator compares them)."""
    return a.rstrip("/") == b.rstrip("/")


def load(**overrides) -> ExportSettings:
    """ExportSettings from `overrides` (None values are ignored) and the environment, or a clear error."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return ExportSettings(**given)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            name = str(err["loc"][0]) if err["loc"] else "?"
            field = ExportSettings.model_fields.get(name)
            where = name if name in given else _variables(name, field)
            problems.append(f"{where}: {err['msg']}")
        raise ExportConfigError("invalid OTLP export configuration: " + "; ".join(problems)) from None


def _variables(name: str, field) -> str:
    alias = getattr(field, "validation_alias", None) if field is not None else None
    if isinstance(alias, AliasChoices):
        return " or ".join(str(c) for c in alias.choices if str(c).isupper())
    return f"{PREFIX}{name.upper()}"
