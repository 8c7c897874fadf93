"""What the operator spends on each event, in-process: its garbage collector's settings (heap.py) and
kopf's diff-base, which the operator builds for its traces only (main.DiffBase). Measured in
tests/bench/RESULTS.md; here, that each does what its docstring says."""

from __future__ import annotations

import gc
import weakref

import kopf

from latencytrace.node_agent.contract import API_VERSION, GROUP, NODE_KIND, TRACE_KIND
from latencytrace.operator import heap
from latencytrace.operator.main import DiffBase


class Cell:
    """A container the collector tracks, that can be part of a cycle and weakly referenced."""

    def __init__(self) -> None:
        self.other: Cell | None = None


def test_settle_collects_cycles_then_freezes_what_is_left_which_reference_counting_still_frees():
    thresholds = gc.get_threshold()
    try:
        heap.configure()
        assert gc.get_threshold() == heap.THRESHOLDS
        a, b = Cell(), Cell()
        a.other, b.other = b, a  # a cycle: only the collector frees it
        cycle = weakref.ref(a)
        del a, b
        kept = Cell()
        kept_ref = weakref.ref(kept)
        frozen_before = gc.get_freeze_count()
        heap.settle()
        assert cycle() is None, "the cycle was garbage when the heap settled: collected, not frozen"
        assert gc.get_freeze_count() > frozen_before
        assert not any(o is kept for o in gc.get_objects()), "a live object is frozen: out of the collector's sight"
        del kept
        assert kept_ref() is None, "a frozen object is freed when its last reference goes"
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def test_the_diff_base_is_built_for_traces_and_not_for_latency_trace_nodes():
    store = DiffBase(prefix=GROUP, key="last-handled-configuration")
    meta = {"name": "n1", "labels": {"a": "b"}, "managedFields": [{"manager": "m"}]}
    node = kopf.Body({"apiVersion": API_VERSION, "kind": NODE_KIND, "metadata": meta,
                      "spec": {"nodeName": "n1", "traces": [{"uid": "u"}]}, "status": {"observedGeneration": 1}})
    trace = kopf.Body({"apiVersion": API_VERSION, "kind": TRACE_KIND, "metadata": {**meta, "namespace": "ns"},
                       "spec": {"podSelector": {}}, "status": {"phase": "Tracing"}})
    assert store.build(body=node) == {}
    essence = store.build(body=trace)
    assert essence["spec"] == {"podSelector": {}} and essence["metadata"]["labels"] == {"a": "b"}
    assert "status" not in essence and "managedFields" not in essence["metadata"]
