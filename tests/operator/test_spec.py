"""The spec checks beyond the schema, the duration parser and the deadline."""

from datetime import UTC, datetime, timedelta

import pytest

from latencytrace.operator import spec as specs

WEEK = specs.Limits(max_duration_seconds=7 * 24 * 3600.0)


def test_defaults_fill_what_the_user_left_out():
    s = specs.parse({"podSelector": {"matchLabels": {"app": "web"}}}, WEEK)
    assert s.directions == ("receive", "transmit")
    assert s.slow_threshold_microseconds == 1000 and s.spans_per_second == 10 and s.sample_one_in == 0
    settings = s.settings()
    assert settings.segments == [] and settings.directions == ["receive", "transmit"]
    assert s.time_one_in == 1 and settings.time_one_in == 1  # full fidelity unless asked


def test_time_one_in_is_carried_and_bounded_by_the_schema_and_the_administrator():
    assert specs.parse({"podNames": ["a"], "timeOneIn": 8}, WEEK).settings().time_one_in == 8
    for bad in (0, -1, 1_000_001, "8", 8.5, True):
        with pytest.raises(specs.SpecError, match="spec.timeOneIn"):
            specs.parse({"podNames": ["a"], "timeOneIn": bad}, WEEK)
    limits = specs.Limits(min_time_one_in=8)
    assert specs.parse({"podNames": ["a"], "timeOneIn": 16}, limits).time_one_in == 16
    with pytest.raises(specs.SpecError, match=r"spec.timeOneIn: timing 1 packet in 1 is more often than this "
                                              r"cluster allows \(at least 1 in 8\)") as e:
        specs.parse({"podNames": ["a"]}, limits)  # the default (every packet) is over such a limit too
    assert e.value.reason == "NotAllowed"


def test_segments_come_out_in_table_order():
    s = specs.parse({"podNames": ["a"], "segments": ["tx_total", "rx_irq", "rx_total"]}, WEEK)
    assert s.settings().segments == ["rx_irq", "rx_total", "tx_total"]


def test_the_administrator_can_allow_only_some_segments():
    """limits.segments: a trace asks for allowed segments only, and must name them (leaving the list out asks
    for every segment, which would escape the limit); an unknown or wrong-direction name stays a spec error."""
    limits = specs.Limits(allowed_segments=frozenset({"rx_socket_queue", "rx_total", "rx_host_to_pod"}))
    ok = specs.parse({"podNames": ["a"], "directions": ["receive"], "segments": ["rx_total", "rx_socket_queue"]},
                     limits)
    assert ok.settings().segments == ["rx_socket_queue", "rx_total"]
    allowed = "allowed: rx_host_to_pod, rx_socket_queue, rx_total"  # in the table's order
    for raw, why in (({"segments": ["rx_total", "rx_irq", "tx_app_to_dev"]},
                      f"spec.segments: rx_irq, tx_app_to_dev are not segments this cluster's administrator allows "
                      f"traces to ask for ({allowed})"),
                     ({"segments": ["rx_driver"]}, "spec.segments: rx_driver is not a segment"),
                     ({}, f"spec.segments: this cluster's administrator allows traces only some segments: list the "
                          f"ones to trace ({allowed})")):
        with pytest.raises(specs.SpecError) as e:
            specs.parse({"podNames": ["a"], **raw}, limits)
        assert why in str(e.value) and e.value.reason == "NotAllowed", str(e.value)
    with pytest.raises(specs.SpecError) as e:
        specs.parse({"podNames": ["a"], "segments": ["nope"]}, limits)
    assert "unknown segment 'nope'" in str(e.value) and e.value.reason == "InvalidSpec"
    with pytest.raises(specs.SpecError) as e:
        specs.parse({"podNames": ["a"], "directions": ["transmit"], "segments": ["rx_total"]}, limits)
    assert "rx_total is a receive segment" in str(e.value) and e.value.reason == "InvalidSpec"
    assert specs.parse({"podNames": ["a"]}, specs.Limits()).settings().segments == []  # no limit: all of them


@pytest.mark.parametrize("raw, fragment", [
    ({}, "exactly one way"),
    ({"podNames": ["a"], "podSelector": {}}, "exactly one way"),
    ({"podSelector": {"matchLabels": {"-bad": "x"}}}, "not a valid label key"),
    ({"podSelector": {"matchLabels": {"app": "x" * 64}}}, "matchLabels.app: String should have at most 63"),
    ({"podSelector": {"matchLabels": {"app": "x\n"}}}, "not a valid label value"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}, "In needs at least one value"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}}, "takes no values"),
    ({"podNames": ["a"], "directions": ["receive"], "segments": ["tx_total"]}, "tx_total is a transmit segment"),
    ({"podNames": ["a"], "segments": ["nope"]}, "unknown segment 'nope'"),
    ({"podNames": ["a"], "duration": "8d"}, "is not a duration"),
    ({"podNames": ["a"], "duration": "169h"}, "longer than this cluster allows"),
    ({"podNames": ["a"], "slowThresholdMicroseconds": 0}, "spec.slowThresholdMicroseconds"),
    ({"podNames": ["a"], "slowThresholdMicroseconds": "5"}, "spec.slowThresholdMicroseconds"),
    ({"podNames": ["a"], "spansPerSecond": 1001}, "spec.spansPerSecond"),
    ({"podNames": ["a", "a"]}, "spec.podNames: each entry at most once"),
    ({"podNames": ["A_b"]}, "is not a pod name"),
    ({"podNames": ["a"], "duration": "5s"}, "shorter than 10s"),
    ({"podNames": ["a"], "export": {"otlpEndpoint": "http://h:abc"}}, "spec.export.otlpEndpoint: 'http://h:abc' is not"),
    ({"podNames": ["a"], "export": {"otlpEndpoint": "http://h:99999"}}, "has port 99999; a port is 1-65535"),
    ({"podNames": ["a"], "export": {"otlpEndpoint": "http://u:p@h:4317"}}, "no user name, password"),
    ({"podNames": ["a"], "export": {"otlpEndpoint": "ftp://h:4317"}}, "use scheme http, https or grpc"),
    ({"podNames": ["a"], "export": {"otlpEndpoint": "http://h:4317 "}}, "is not an OTLP endpoint"),
    ({"podNames": ["a"], "export": {"otlpEndpoint": "http://h\u00e9:4317"}}, "'http://h\\xe9:4317' is not"),
    ({"podNames": ["a"], "export": {"otlpEndpoint": "http://h:4317/" + "x" * 600}}, "at most 512 characters"),
    ({"podNames": ["a"], "export": {"resourceAttributes": {"k8s.pod.name": "x"}}}, "keys starting with k8s."),
    ("podNames: [a]", "spec must be an object"),
])
def test_invalid_specs_name_the_field(raw, fragment):
    with pytest.raises(specs.SpecError) as e:
        specs.parse(raw, WEEK)
    assert fragment in str(e.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(specs.SpecError) as e:
        specs.parse({"podSelector": {"matchLabels": {"-bad": "x"}}, "podNames": ["a"], "duration": "1y"}, WEEK)
    assert str(e.value).count(";") >= 2


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("15m", 900), ("1h30m", 5400), ("1.5h", 5400),
                                           ("500ms", 0.5), ("2h0m10s", 7210)])
def test_parse_duration(text, seconds):
    assert specs.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "h", "10x", "1h 2m", "-5s"])
def test_parse_duration_rejects(text):
    with pytest.raises(specs.SpecError):
        specs.parse_duration(text)


def test_deadline_counts_from_start():
    s = specs.parse({"podNames": ["a"], "duration": "10m"}, WEEK)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    assert specs.deadline(s, start) == start + timedelta(minutes=10)
    assert specs.deadline(s, None) is None
    # No duration: the cluster's default, or its maximum; never unbounded.
    assert specs.deadline(specs.parse({"podNames": ["a"]}, WEEK), start) == start + timedelta(days=7)
    limits = specs.Limits(max_duration_seconds=3600, default_duration_seconds=600)
    assert specs.deadline(specs.parse({"podNames": ["a"]}, limits), start) == start + timedelta(minutes=10)
