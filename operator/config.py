"""The operator's settings: one typed object read once from LATENCYTRACE_OPERATOR_* variables.

A missing or invalid value stops the operator at start with a message naming the variable.
"""

from __future__ import annotations

import socket

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from latencytrace.node_agent import segments
from latencytrace.node_agent.envconfig import ConfigError, from_env

from .spec import Limits


class OperatorConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LATENCYTRACE_OPERATOR_", extra="ignore", frozen=True)

    # Outside a pod (tests, development) the standard variable; inside a pod, unset: in-cluster config.
    kubeconfig: str | None = Field(default=None, validation_alias=AliasChoices("KUBECONFIG"))

    # Leader election: one Lease in the operator's namespace; only its holder runs the handlers.
    leader_election: bool = True
    namespace: str = Field(default="latencytrace-system", min_length=1)  # downward API in the chart
    lease_name: str = Field(default="latencytrace-operator", min_length=1)
    identity: str = Field(default_factory=socket.gethostname, min_length=1)  # the pod name in a pod
    lease_duration_seconds: int = Field(default=15, ge=2)
    renew_deadline_seconds: int = Field(default=10, ge=1)
    retry_period_seconds: int = Field(default=2, ge=1)

    health_host: str = "0.0.0.0"
    health_port: int = Field(default=8080, ge=1, le=65535)

    status_interval_seconds: float = Field(default=5.0, gt=0, le=3600)  # trace status refresh
    resync_seconds: float = Field(default=300.0, gt=0)  # drift repair and namespace re-selection
    debounce_seconds: float = Field(default=0.5, ge=0, le=60)  # gather pod churn before publishing
    publish_concurrency: int = Field(default=16, ge=1, le=256)  # parallel LatencyTraceNode writes
    watch_timeout_seconds: int = Field(default=300, ge=10, le=3600)
    request_timeout_seconds: float = Field(default=30.0, gt=0)
    # An agent silent for this long counts as failing for the traces on its node.
    agent_stale_seconds: float = Field(default=180.0, gt=0)
    # The administrator's limits (chart values limits.*; spec.Limits). The longest duration accepted, on
    # top of the CRD's 168h bound, and the one a trace without a duration gets (0: the maximum).
    max_duration_seconds: float = Field(default=7 * 24 * 3600.0, gt=0)
    default_duration_seconds: float = Field(default=0.0, ge=0)
    min_slow_threshold_microseconds: int = Field(default=1, ge=1, le=60_000_000)
    max_spans_per_second: int = Field(default=1000, ge=0, le=1000)
    min_sample_one_in: int = Field(default=0, ge=0, le=1_000_000)
    min_time_one_in: int = Field(default=1, ge=1, le=1_000_000)
    traces_per_namespace: int = Field(default=0, ge=0)  # LatencyTraces per namespace; 0: no limit
    pods_per_trace: int = Field(default=0, ge=0)  # pods one trace traces; 0: no limit
    # Endpoints traces may name in spec.export.otlpEndpoint, as a JSON list (the chart: otlp.endpoint and
    # otlp.allowedEndpoints); unset: any endpoint.
    allowed_endpoints: tuple[str, ...] | None = None
    # Segments traces may ask for, as a JSON list (the chart: limits.segments); unset: any.
    allowed_segments: tuple[str, ...] | None = Field(default=None, min_length=1)
    failing_nodes_listed: int = Field(default=10, ge=0, le=20)  # the CRD allows 20

    log_level: str = Field(default="INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")

    @field_validator("allowed_segments")
    @classmethod
    def _known_segments(cls, names: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if names:
            segments.mask(names)  # ValueError naming the unknown ones and the known
        return names

    @model_validator(mode="after")
    def _lease_timings(self) -> OperatorConfig:
        if not self.retry_period_seconds < self.renew_deadline_seconds < self.lease_duration_seconds:
            raise ValueError("LATENCYTRACE_OPERATOR_RETRY_PERIOD_SECONDS < RENEW_DEADLINE_SECONDS < "
                             "LEASE_DURATION_SECONDS must hold")
        return self

    def limits(self) -> Limits:
        return Limits(max_duration_seconds=self.max_duration_seconds,
                      default_duration_seconds=self.default_duration_seconds or None,
                      min_slow_threshold_microseconds=self.min_slow_threshold_microseconds,
                      max_spans_per_second=self.max_spans_per_second, min_sample_one_in=self.min_sample_one_in,
                      min_time_one_in=self.min_time_one_in,
                      allowed_endpoints=None if self.allowed_endpoints is None else frozenset(self.allowed_endpoints),
                      allowed_segments=None if self.allowed_segments is None else frozenset(self.allowed_segments),
                      traces_per_namespace=self.traces_per_namespace, pods_per_trace=self.pods_per_trace)

    @property
    def liveness_endpoint(self) -> str:
        return f"http://{self.health_host}:{self.health_port}/healthz"


def load() -> OperatorConfig:
    return from_env(OperatorConfig)


__all__ = ["ConfigError", "OperatorConfig", "load"]
