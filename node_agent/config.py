"""The in-cluster agent's settings, read once from the environment.

Everything has a default except the node name, which the DaemonSet passes from the downward API
(`spec.nodeName`). A missing or invalid value stops the agent at start with a message naming the
variable (`envconfig.from_env`, shared with the operator's config).
"""

from __future__ import annotations

import ipaddress

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .envconfig import ConfigError, from_env
from .probestats import MODES, StatsPolicy
from .program import Sizes


class AgentConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LATENCYTRACE_AGENT_", extra="ignore", frozen=True)

    # From the downward API (fieldRef spec.nodeName): the node whose LatencyTraceNode we read.
    node_name: str = Field(min_length=1, validation_alias=AliasChoices("LATENCYTRACE_NODE_NAME"))
    # Outside a pod (tests, development) the standard variable; inside a pod, unset: in-cluster config.
    kubeconfig: str | None = Field(default=None, validation_alias=AliasChoices("KUBECONFIG"))

    interval_seconds: float = Field(default=10.0, gt=0, le=3600)  # collect + export period
    status_seconds: float = Field(default=60.0, gt=0, le=3600)  # heartbeat when nothing changes
    status_min_gap_seconds: float = Field(default=2.0, ge=0, le=600)  # never patch status faster
    retry_seconds: float = Field(default=5.0, gt=0, le=600)  # look again for pods not found yet
    # Unload the probes after the node has had nothing to trace for this long (0: never unload).
    idle_unload_seconds: float = Field(default=120.0, ge=0)
    watch_timeout_seconds: int = Field(default=300, ge=10, le=3600)

    max_targets: int = Field(default=64, gt=0, le=4096)
    rx_inflight: int = Field(default=16384, gt=0)
    tx_inflight: int = Field(default=16384, gt=0)
    send_inflight: int = Field(default=8192, gt=0)
    ringbuf_pages: int = Field(default=64, gt=0)

    # When the kernel times the probes (see node_agent/probestats.py): always, sampled or off.
    probe_stats: str = Field(default="sampled", pattern=f"^({'|'.join(MODES)})$")
    probe_stats_window_seconds: float = Field(default=StatsPolicy.window_s, gt=0)
    probe_stats_period_seconds: float = Field(default=StatsPolicy.period_s, gt=0)

    # How the probes attach (node_agent/tracer.py TRACEPOINT_KINDS): typed where the kernel loads them.
    tracepoints: str = Field(default="auto", pattern="^(auto|typed|raw)$")

    log_level: str = Field(default="INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")

    # The health endpoint (node_agent/health.py). The agent shares the node's network namespace: by default
    # only the node itself (the kubelet's probes) reaches it. 9847: no port of the kubelet (10248, 10250),
    # kube-proxy (10249, 10256), node-exporter (9100) or the common CNI and security agents. 0: any free port.
    health_port: int = Field(default=9847, ge=0, le=65535)
    health_address: str = "127.0.0.1"
    # One turn of the main loop may take this long beyond its longest wait (see liveness_seconds) before
    # liveness fails: a status patch (10 s request timeout), a walk of /proc, an export.
    health_turn_seconds: float = Field(default=30.0, gt=0, le=3600)
    # Loading the probes (a BCC compile, seconds to a minute on a busy node) may take this long.
    health_load_seconds: float = Field(default=600.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _derived(self) -> AgentConfig:
        """The settings built from several variables are checked at load, like every single one."""
        self.sizes()
        self.stats_policy()
        return self

    @field_validator("health_address")
    @classmethod
    def _an_ip(cls, v: str) -> str:
        try:
            return str(ipaddress.ip_address(v))
        except ValueError:
            raise ValueError(f"{v!r} is not an IP address (127.0.0.1, ::1, 0.0.0.0, ...)") from None

    @property
    def liveness_seconds(self) -> float:
        """Longest gap between two turns of a healthy main loop: it waits at most until the next heartbeat
        (statusSeconds) or, with no LatencyTraceNode to report to, the next collection (intervalSeconds)."""
        return max(self.status_seconds, self.interval_seconds) + self.health_turn_seconds

    def stats_policy(self) -> StatsPolicy:
        try:
            return StatsPolicy(self.probe_stats, self.probe_stats_window_seconds, self.probe_stats_period_seconds)
        except ValueError as e:
            raise ConfigError(f"LATENCYTRACE_AGENT_PROBE_STATS_*: {e}") from None

    def sizes(self) -> Sizes:
        try:
            return Sizes(max_targets=self.max_targets, rx_inflight=self.rx_inflight,
                         tx_inflight=self.tx_inflight, send_inflight=self.send_inflight,
                         ringbuf_pages=self.ringbuf_pages)
        except ValueError as e:
            raise ConfigError(f"LATENCYTRACE_AGENT_*: {e}") from None


def load() -> AgentConfig:
    return from_env(AgentConfig)
