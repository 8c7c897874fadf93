"""Settings from the environment: a bad value stops the program with the variable's name."""

import re
from pathlib import Path

import pytest
from pydantic import AliasChoices

from latencytrace.node_agent import config as agent_config
from latencytrace.node_agent.export.config import ExportSettings
from latencytrace.operator import config
from latencytrace.operator.uninstall import UninstallConfig

ROOT = Path(__file__).resolve().parents[2]


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


def test_operator_allowed_segments_are_known_ones(monkeypatch):
    monkeypatch.setenv("LATENCYTRACE_OPERATOR_ALLOWED_SEGMENTS", '["rx_total", "tx_total"]')
    assert config.load().limits().allowed_segments == frozenset({"rx_total", "tx_total"})
    for bad, why in (('["rx_total", "rx_nope"]', "unknown segment(s) rx_nope; known: rx_irq,"), ("[]", "at least 1 item")):
        monkeypatch.setenv("LATENCYTRACE_OPERATOR_ALLOWED_SEGMENTS", bad)
        with pytest.raises(config.ConfigError, match="LATENCYTRACE_OPERATOR_ALLOWED_SEGMENTS") as e:
            config.load()
        assert why in str(e.value), str(e.value)
    monkeypatch.delenv("LATENCYTRACE_OPERATOR_ALLOWED_SEGMENTS")
    assert config.load().limits().allowed_segments is None


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


def variables_read(cls) -> set[str]:
    """Every environment variable a settings class reads: its aliases, else its prefix and field name."""
    prefix = cls.model_config.get("env_prefix", "")
    names = set()
    for field, info in cls.model_fields.items():
        alias = info.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias] if isinstance(alias, str) else []
        names |= {str(c).upper() for c in choices} or {f"{prefix}{field}".upper()}
    return names


def test_every_latencytrace_variable_the_chart_and_harnesses_set_is_read():
    """The operator's and agent's settings ignore variables they do not know: a misspelt one in the chart
    (or in the tests' process harnesses) would silently keep the default. Each one set must be read."""
    read = variables_read(config.OperatorConfig) | variables_read(agent_config.AgentConfig) | \
        variables_read(ExportSettings) | variables_read(UninstallConfig)
    sources = [*sorted((ROOT / "charts" / "latencytrace" / "templates").glob("*.yaml")),
               *sorted((ROOT / "tests").rglob("*.py"))]
    set_where = {}
    for path in sources:
        text = path.read_text()
        for name in re.findall(r"(?:name:\s*|\b)(LATENCYTRACE_[A-Z0-9_]*[A-Z0-9])\b\s*(?:=|\n\s*value)", text):
            set_where.setdefault(name, path.relative_to(ROOT))
    assert {"LATENCYTRACE_AGENT_IDLE_UNLOAD_SECONDS", "LATENCYTRACE_OPERATOR_LEASE_NAME"} <= set(set_where)
    unknown = {name: str(where) for name, where in set_where.items() if name not in read}
    assert unknown == {}, f"set but read by nothing: {unknown}"
