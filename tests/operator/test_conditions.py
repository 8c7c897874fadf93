"""Conditions: built in one place, lastTransitionTime moves only when a status flips."""

from datetime import UTC, datetime, timedelta

from latencytrace.operator import conditions
from latencytrace.operator.conditions import Summary, TraceFacts

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def by_type(conds):
    return {c.type: c for c in conds}


def test_transition_time_kept_until_the_status_flips():
    first = conditions.merge([], conditions.trace_conditions(TraceFacts(1, summary=Summary(matched_pods=2))), T0)
    later = T0 + timedelta(minutes=5)
    same = conditions.merge([c.wire() for c in first], conditions.trace_conditions(
        TraceFacts(1, summary=Summary(matched_pods=3, matched_nodes=1))), later)
    assert by_type(same)["Tracing"].last_transition_time == conditions.timestamp(T0)
    assert by_type(same)["Tracing"].message != by_type(first)["Tracing"].message  # message may change freely
    flipped = conditions.merge(same, conditions.trace_conditions(
        TraceFacts(1, summary=Summary(matched_pods=3, traced_pods=3, matched_nodes=1, tracing_nodes=1))), later)
    assert by_type(flipped)["Tracing"].last_transition_time == conditions.timestamp(later)
    assert by_type(flipped)["Accepted"].last_transition_time == conditions.timestamp(T0)


def test_conditions_and_phase_for_each_situation():
    cases = {
        "Invalid": TraceFacts(1, invalid="spec.duration: bad"),
        "Completed": TraceFacts(2, completed=True, duration="10m"),
        "Pending": TraceFacts(1, summary=Summary(matched_pods=0)),
        "Tracing": TraceFacts(1, summary=Summary(matched_pods=2, traced_pods=1, matched_nodes=1, tracing_nodes=1)),
        "Degraded": TraceFacts(1, summary=Summary(matched_pods=2, traced_pods=1, matched_nodes=2, tracing_nodes=1,
                                                  failing_nodes=1, failing_sample=(("n2", "agent silent"),))),
    }
    for phase, facts in cases.items():
        conds = conditions.trace_conditions(facts)
        assert [c.type for c in conds] == ["Accepted", "Tracing", "Degraded", "Completed", "Ready"]
        assert all(c.observed_generation == facts.generation for c in conds)
        assert conditions.phase(conds) == phase, phase
    degraded = by_type(conditions.trace_conditions(cases["Degraded"]))["Degraded"]
    assert degraded.reason == "NodesFailing" and "n2: agent silent" in degraded.message
    assert by_type(conditions.trace_conditions(cases["Invalid"]))["Accepted"].message == "spec.duration: bad"


def test_ready_summarizes_the_others():
    def ready(facts):
        return by_type(conditions.trace_conditions(facts))["Ready"]
    all_traced = Summary(matched_pods=3, traced_pods=3, matched_nodes=2, ready_nodes=2, tracing_nodes=2)
    cases = [
        (TraceFacts(4, summary=all_traced), "True", "AllPodsTraced"),
        (TraceFacts(4, summary=Summary(matched_pods=3, traced_pods=2, matched_nodes=2, tracing_nodes=2)),
         "False", "PodsPending"),
        (TraceFacts(4, summary=Summary(matched_pods=3, traced_pods=3, matched_nodes=3, tracing_nodes=2)),
         "False", "PodsPending"),
        (TraceFacts(4, summary=Summary()), "False", "NoPodsMatched"),
        (TraceFacts(4, summary=Summary(matched_pods=3, traced_pods=3, matched_nodes=2, tracing_nodes=2,
                                       failing_nodes=1, failing_sample=(("n2", "pod a/b: no such netns"),))),
         "False", "NodesFailing"),
        (TraceFacts(4, summary=all_traced, pods_over_limit=(9, 3)), "False", "PodLimitExceeded"),
        (TraceFacts(4, invalid="spec.podSelector: bad", invalid_reason="InvalidSpec"), "False", "InvalidSpec"),
        (TraceFacts(4, invalid="too many", invalid_reason="TooManyTraces"), "False", "TooManyTraces"),
        (TraceFacts(4, completed=True, duration="10m", summary=all_traced), "False", "Completed"),
    ]
    for facts, status, reason in cases:
        c = ready(facts)
        assert (c.status, c.reason, c.observed_generation) == (status, reason, 4), (facts, c)
    assert "n2: pod a/b: no such netns" in ready(cases[4][0]).message
    assert len(ready(TraceFacts(1, invalid="x" * 100_000)).message) == conditions.MESSAGE_LIMIT


def test_timestamps_are_rfc3339_utc():
    assert conditions.timestamp(T0) == "2026-01-01T00:00:00Z"
    assert conditions.parse_time("2026-01-01T00:00:00Z") == T0


def test_messages_are_bounded_and_say_how_much_was_cut():
    from latencytrace.node_agent import cluster
    from latencytrace.node_agent.agent import TargetState

    huge = "compiler says: " + "é" * 200_000  # a BCC error, a user's spec: any size, any characters
    ready = cluster.ready_condition(failure=("TracerFailed", huge), loaded=False, targets_n=0,
                                    probes=cluster.probe_report(None), generation=1)
    invalid = by_type(conditions.trace_conditions(TraceFacts(1, invalid=huge)))["Accepted"]
    for c in (ready, invalid):
        assert len(c.message) == 1024
        assert c.message.startswith("compiler says: éé")
        assert c.message.endswith(f"... ({len(huge) - c.message.index('...')} more characters)")
    pod = cluster.pod_report("ns", "p", "u", TargetState("k", "Failed", huge))
    assert len(pod.message) == 512
    short = conditions.make("Ready", True, "Fine", "all good")
    assert short.message == "all good"
