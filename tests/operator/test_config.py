"""Settings from the environment: a bad value stops the program with the variable's name."""

import pytest

from latencytrace.node_agent import config as agent_config
from latencytrace.operator import config


def test_operator_defaults_and_overrides(monkeypatch):
    monkeypatch.setenv("LATENCYTRACE_OPERATOR_STATUS_INTERVAL_SECONDS", "2.5")
    cfg = config.load()
    assert cfg.status_interval_seconds == 2.5 and cfg.leader_election
    assert cfg.liveness_endpoint == "http://0.0.0.0:8080/healthz"


@pytest.mark.parametrize("var, value", [("LATENCYTRACE_OPERATOR_PUBLISH_CONCURRENCY", "0"),
                                        ("LATENCYTRACE_OPERATOR_HEALTH_PORT", "http"),
                                        ("LATENCYTRACE_OPERATOR_LOG_LEVEL", "LOUD")])
def test_operator_bad_value_names_the_variable(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(config.ConfigError, match=var):
        config.load()


def test_operator_lease_timings_must_nest(monkeypatch):
    monkeypatch.setenv("LATENCYTRACE_OPERATOR_RENEW_DEADLINE_SECONDS", "20")
    with pytest.raises(config.ConfigError, match="RENEW_DEADLINE_SECONDS"):
        config.load()


def test_agent_needs_its_node_name(monkeypatch):
    monkeypatch.delenv("LATENCYTRACE_NODE_NAME", raising=False)
    with pytest.raises(agent_config.ConfigError, match="LATENCYTRACE_NODE_NAME"):
        agent_config.load()
    monkeypatch.setenv("LATENCYTRACE_NODE_NAME", "n1")
    monkeypatch.setenv("KUBECONFIG", "/tmp/kc")
    cfg = agent_config.load()
    assert cfg.node_name == "n1" and cfg.kubeconfig == "/tmp/kc" and cfg.sizes().max_targets == 64


def test_agent_bad_size_names_the_variable(monkeypatch):
    monkeypatch.setenv("LATENCYTRACE_NODE_NAME", "n1")
    monkeypatch.setenv("LATENCYTRACE_AGENT_MAX_TARGETS", "-1")
    with pytest.raises(agent_config.ConfigError, match="LATENCYTRACE_AGENT_MAX_TARGETS"):
        agent_config.load()
