"""Agents' reports to a LatencyTrace status: counts, failing nodes, staleness, completion."""

from datetime import UTC, datetime, timedelta

from latencytrace.node_agent.contract import NAMESPACED, NodeSpec, NodeStatus, NodeTrace, PodRef, PodReport, TraceReport
from latencytrace.operator import aggregation, conditions, handlers
from latencytrace.operator.config import OperatorConfig

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)


def trace_status(spec, generation, old, views, cfg, now, kind=NAMESPACED, rank=None):
    body = {"metadata": {"namespace": "app", "name": "web", "uid": "t1", "generation": generation}, "spec": spec}
    return handlers.trace_status(handlers.Trace(kind, body, lambda: views, lambda: rank), old, cfg, now)


def ltn(node, pods, states, heartbeat_age=5.0, ready=("True", "Tracing"), generation=1, observed=1, uid="t1",
        created_age=600.0):
    spec = NodeSpec(node_name=node, traces=[NodeTrace(name="web", namespace="app", uid=uid, pods=[
        PodRef(namespace="app", name=p, uid=f"u-{p}") for p in pods])])
    status = NodeStatus(
        observed_generation=observed,
        heartbeat_time=None if heartbeat_age is None else conditions.timestamp(NOW - timedelta(seconds=heartbeat_age)),
        conditions=[conditions.make("Ready", ready[0] == "True", ready[1], "why")] if ready else [],
        traces=[TraceReport(name="web", namespace="app", uid=uid, pods=[
            PodReport(namespace="app", name=p, uid=f"u-{p}", state=s, message="boom" if s == "Failed" else "")
            for p, s in zip(pods, states)])])
    meta = {"generation": generation,
            "creationTimestamp": conditions.timestamp(NOW - timedelta(seconds=created_age))}
    return aggregation.index_node(node, meta, spec.wire(), status.wire())["t1"]


def summarize(*views):
    return aggregation.summarize(views, NOW, stale_seconds=180, listed=10)


def test_counts_of_a_healthy_trace():
    s = summarize(ltn("n1", ["a", "b"], ["Tracing", "Tracing"]), ltn("n2", ["c"], ["NotFound"]))
    assert (s.matched_pods, s.traced_pods, s.matched_nodes, s.tracing_nodes, s.ready_nodes, s.failing_nodes) == \
        (3, 2, 2, 1, 2, 0)


def test_failing_nodes_are_counted_and_listed_with_their_error():
    s = summarize(ltn("n3", ["a"], ["Failed"]), ltn("n1", ["b"], ["Tracing"], heartbeat_age=999),
                  ltn("n2", ["c"], [], heartbeat_age=None), ltn("n4", ["d"], ["Pending"], ready=("False", "TracerFailed")))
    assert s.failing_nodes == 4 and s.traced_pods == 0  # a silent agent's old report does not count
    assert [n for n, _ in s.failing_sample] == ["n1", "n2", "n3", "n4"]
    msgs = dict(s.failing_sample)
    assert "silent since" in msgs["n1"] and "no agent has reported" in msgs["n2"]
    assert msgs["n3"] == "pod app/a: boom" and msgs["n4"].startswith("agent not ready: TracerFailed")


def test_a_new_node_gets_a_grace_period_and_the_list_is_bounded():
    assert summarize(ltn("n1", ["a"], [], heartbeat_age=None, created_age=10)).failing_nodes == 0
    views = [ltn(f"n{i:03}", ["a"], ["Failed"]) for i in range(50)]
    s = aggregation.summarize(views, NOW, 180, listed=10)
    assert s.failing_nodes == 50 and len(s.failing_sample) == 10


def test_stale_generation_is_not_ready_and_removed_pods_do_not_count():
    assert summarize(ltn("n1", ["a"], ["Tracing"], generation=2, observed=1)).ready_nodes == 0
    view = ltn("n1", ["a"], ["Tracing"])
    gone = aggregation.NodeTraceView(**{**view.__dict__, "published": view.published.model_copy(update={"pods": []})})
    assert aggregation.traced_pods(gone) == 0


def test_trace_status_end_to_end():
    cfg = OperatorConfig()
    views = [ltn("n1", ["a"], ["Tracing"])]
    spec = {"podSelector": {}, "duration": "10m", "directions": ["receive", "transmit"]}
    status, invalid = trace_status(spec, 1, {}, views, cfg, NOW)
    assert invalid is None and status["phase"] == "Tracing" and status["tracedPods"] == 1
    assert status["startTime"] == conditions.timestamp(NOW) and status["nodes"]["tracing"] == 1
    # Ten minutes later: completed; counts kept, nothing traced, completionTime = the deadline.
    later = NOW + timedelta(minutes=10, seconds=1)
    done, _ = trace_status(spec, 1, status, [], cfg, later)
    assert done["phase"] == "Completed" and done["tracedPods"] == 0 and done["matchedPods"] == 1
    assert done["completionTime"] == conditions.timestamp(NOW + timedelta(minutes=10))
    # Unchanged inputs: nothing to patch (an operator restart writes nothing).
    again, _ = trace_status(spec, 1, done, [], cfg, later + timedelta(minutes=1))
    assert handlers.status_patch(done, again) is None
    # Extending the duration revives it, and the completion time is removed.
    revived, _ = trace_status({**spec, "duration": "1h"}, 2, done, views, cfg, later)
    completed = next(c for c in revived["conditions"] if c["type"] == "Completed")
    assert completed["status"] == "False" and revived["phase"] != "Completed"
    assert handlers.status_patch(done, revived)["completionTime"] is None


def test_invalid_spec_status():
    status, invalid = trace_status({"podNames": ["a"], "podSelector": {}}, 3, {}, [], OperatorConfig(), NOW)
    assert "exactly one way" in invalid and status["phase"] == "Invalid" and "startTime" not in status
    assert status["observedGeneration"] == 3


def test_orphans_are_entries_of_traces_that_are_gone():
    spec = NodeSpec(node_name="n1", traces=[NodeTrace(name="a", namespace="x", uid="live"),
                                            NodeTrace(name="b", namespace="x", uid="dead")]).wire()
    assert handlers.orphans(spec, {"live"}.__contains__) == ["dead"]


def with_export(view, *destinations, own=None):
    """`view` with the agent's export report (contract.DestinationReport) and the trace's own endpoint."""
    from dataclasses import replace

    from latencytrace.node_agent.contract import ExportOverrides, ExportReport

    published = view.published.model_copy(update={"export": ExportOverrides(otlp_endpoint=own)})
    return replace(view, published=published, export=ExportReport(destinations=list(destinations)))


def test_export_health_per_destination_of_the_trace():
    from latencytrace.node_agent.contract import DestinationReport as D

    default_ok = D(endpoint="http://collector:4317", default=True, healthy=True, dropped_batches=1)
    own_bad = D(endpoint="http://mine:4317", healthy=False, dropped_batches=3, last_error="UNAVAILABLE")
    own_ok = D(endpoint="http://mine:4317", healthy=True)
    # The trace names its own endpoint: only that destination counts, the default is another trace's.
    s = summarize(with_export(ltn("n2", ["a"], ["Tracing"]), default_ok, own_bad, own=own_bad.endpoint),
                  with_export(ltn("n1", ["b"], ["Tracing"]), default_ok, own_ok, own=own_bad.endpoint),
                  with_export(ltn("n3", ["c"], ["Tracing"], heartbeat_age=999), own_bad, own=own_bad.endpoint))
    assert [d.wire() for d in s.destinations] == [
        {"endpoint": "http://mine:4317", "default": False, "healthy": False, "nodes": 2, "unhealthyNodes": 1,
         "droppedBatches": 3, "lastError": "n2: UNAVAILABLE"}]  # n3 is silent: its report is not counted
    # No endpoint of its own: the default; a trace naming the agent's own endpoint goes there too.
    for own in (None, default_ok.endpoint):
        s = summarize(with_export(ltn("n1", ["a"], ["Tracing"]), default_ok, own_bad, own=own))
        assert [d.wire() for d in s.destinations] == [
            {"endpoint": "http://collector:4317", "default": True, "healthy": True, "nodes": 1, "unhealthyNodes": 0,
             "droppedBatches": 1}]
    # An agent that reports no destination for the trace (exports nowhere): nothing is claimed.
    assert summarize(with_export(ltn("n1", ["a"], ["Tracing"]), own_bad)).destinations == ()


def test_export_health_in_the_status_and_kept_when_completed():
    view = with_export(ltn("n1", ["a"], ["Tracing"]),
                       aggregation.DestinationReport(endpoint="http://c:4317", default=True, healthy=False,
                                                     last_error="x" * 5000))
    status = aggregation.trace_status({}, conditions.TraceFacts(1), summarize(view), None, None, NOW)
    (d,) = status["export"]["destinations"]
    assert d["healthy"] is False and len(d["lastError"]) <= 512  # the CRD's maxLength
    done = aggregation.trace_status(status, conditions.TraceFacts(1, completed=True, duration="1m"), None, None, None, NOW)
    assert done["export"] == status["export"]
