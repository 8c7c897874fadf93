"""Every pod of the cluster a trace could select, in one cache the trace workers share.

A trace worker used to list and watch its own pods when its trace was applied: at 30,000 pods that list
alone took 5-7 s of the 9-13 s from `kubectl apply` to the last node published (tests/bench/RESULTS.md).
Kubernetes controllers keep such a cache from their start (client-go's shared informers); this one is
node_agent.kube.ListWatch (paged list, then watch; 410 Gone lists again) over all namespaces with the
field selector "scheduled and not finished", keeping `selection.placed_pod` of each pod (node, PodRef,
labels), and a trace's selection runs on it (selection.pods_by_node). kopf's own index is not used for
this: its list is not paged and its handlers would run on the event loop for every pod event.

The pods are also kept by namespace (`pods_in`), so that a trace's selection, which runs on the event loop
that serves every trace, looks only at the pods of the namespaces it can select: a tenant's trace costs the
operator its own namespace's pods, not the cluster's (at 30,000 pods in 100 namespaces, 0.2 ms a selection
instead of 6-9 ms; under 1 MiB for the index: tests/bench/RESULTS.md).

A pod event wakes only the workers whose trace selects the pod before or after it (their `pod_changed`);
a (re-)list wakes all of them. The cost is memory for every active pod of the cluster, traced or not
(about 2 KiB each: 63 MiB at 30,000 pods, tests/bench/RESULTS.md), and one watch carrying every pod's changes.
After each complete list the operator freezes its heap (`after_list`, heap.py): a cache this size would
otherwise be walked by each of Python's full garbage collections.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from kubernetes import client

from latencytrace.node_agent.kube import ListWatch

from . import selection
from .selection import PlacedPod

log = logging.getLogger(__name__)


class Subscriber(Protocol):
    def pod_changed(self, old: PlacedPod | None, new: PlacedPod | None) -> None: ...  # from the watch thread
    def poke(self) -> None: ...  # after a (re-)list


class PodCache:
    def __init__(self, api: client.ApiClient, watch_timeout_seconds: int,
                 after_list: Callable[[], None] | None = None):
        """`after_list` runs after each complete (re-)list, before the subscribers are told (the operator
        settles its heap there: heap.py)."""
        self._after_list = after_list
        self._subscribers: set[Subscriber] = set()
        self._lock = threading.Lock()
        self._by_namespace: dict[str, dict[str, PlacedPod]] = {}  # namespace -> uid -> pod (the watch's pods)
        self._index_lock = threading.Lock()
        self._started = time.monotonic()
        self._watch = ListWatch(client.CoreV1Api(api).list_pod_for_all_namespaces, on_change=self._listed,
                                on_event=self._changed, log=log, field_selector=selection.ACTIVE_PODS,
                                transform=selection.placed_pod, timeout_seconds=watch_timeout_seconds)
        self.synced = self._watch.synced  # set once the first list is whole

    def start(self) -> PodCache:
        self._watch.start()
        return self

    def stop(self) -> None:
        self._watch.stop()

    def subscribe(self, sub: Subscriber) -> None:
        with self._lock:
            self._subscribers.add(sub)

    def unsubscribe(self, sub: Subscriber) -> None:
        with self._lock:
            self._subscribers.discard(sub)

    def snapshot(self) -> list[PlacedPod]:
        return self._watch.snapshot()

    def pods_in(self, namespaces: Iterable[str]) -> list[PlacedPod]:
        """The cached pods of these namespaces."""
        with self._index_lock:
            return [p for ns in namespaces for p in self._by_namespace.get(ns, {}).values()]

    def _index(self, pods: Iterable[PlacedPod]) -> None:
        by_namespace: dict[str, dict[str, PlacedPod]] = {}
        for p in pods:
            by_namespace.setdefault(p.ref.namespace, {})[p.ref.uid] = p
        with self._index_lock:
            self._by_namespace = by_namespace

    def _reindex(self, old: PlacedPod | None, new: PlacedPod | None) -> None:
        """One watch event into the index: a pod keeps its namespace and uid for its whole life."""
        with self._index_lock:
            if new is not None:
                self._by_namespace.setdefault(new.ref.namespace, {})[new.ref.uid] = new
            elif old is not None:
                pods = self._by_namespace.get(old.ref.namespace, {})
                pods.pop(old.ref.uid, None)
                if not pods:
                    self._by_namespace.pop(old.ref.namespace, None)

    def _each(self, call: Callable[[Subscriber], None]) -> None:
        with self._lock:
            subs = list(self._subscribers)
        for sub in subs:
            try:
                call(sub)
            except Exception:  # one worker's trouble must not stop the watch that serves all of them
                log.exception("pod cache: a subscriber failed")

    def _listed(self) -> None:
        self._index(self._watch.snapshot())
        if self._after_list is not None:
            self._after_list()
        if self._started is not None:
            log.info("pod cache: %d pods listed in %.1f s", len(self._watch.snapshot()),
                     time.monotonic() - self._started)
            self._started = None
        self._each(lambda sub: sub.poke())

    def _changed(self, old: PlacedPod | None, new: PlacedPod | None) -> None:
        self._reindex(old, new)
        self._each(lambda sub: sub.pod_changed(old, new))
