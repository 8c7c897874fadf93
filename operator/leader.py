"""Leader election with a coordination.k8s.io Lease, so that several operator replicas can run and
exactly one of them handles LatencyTraces.

The protocol is client-go's: the holder renews the Lease every retry period; a candidate takes it over
once it has seen the same record unchanged for a whole lease duration (measured on its own clock, so
clock skew between machines does not matter). A holder that cannot renew within the renew deadline
stops leading (the operator exits and its pod restarts as a candidate). A holder that stops cleanly
releases the Lease, so the next one takes over at once.

While waiting, a candidate answers liveness probes itself (kopf's health endpoint only exists once it
leads), so that standby replicas are not restarted for being healthy but idle.
"""

from __future__ import annotations

import http.server
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from kubernetes import client
from kubernetes.client.rest import ApiException

from latencytrace.node_agent.kube import Trouble, describe, or_none

from .config import OperatorConfig

log = logging.getLogger(__name__)


class Lease:
    def __init__(self, api: client.ApiClient, namespace: str, name: str, identity: str, duration: int):
        self.coord = client.CoordinationV1Api(api)
        self.namespace, self.name, self.identity, self.duration = namespace, name, identity, duration
        self._observed: tuple | None = None  # (holder, renewTime) as last seen
        self._observed_at = 0.0  # monotonic time it was first seen

    def _read(self) -> client.V1Lease | None:
        return or_none(self.coord.read_namespaced_lease, self.name, self.namespace, _request_timeout=10)

    def try_acquire_or_renew(self) -> bool:
        """One attempt; True if we hold the Lease afterwards."""
        now = datetime.now(UTC)
        lease = self._read()
        if lease is None:
            body = client.V1Lease(metadata=client.V1ObjectMeta(name=self.name), spec=client.V1LeaseSpec(
                holder_identity=self.identity, lease_duration_seconds=self.duration, acquire_time=now,
                renew_time=now, lease_transitions=0))
            try:
                self.coord.create_namespaced_lease(self.namespace, body, _request_timeout=10)
                return True
            except ApiException as e:
                if e.status == 409:
                    return False
                raise
        spec = lease.spec or client.V1LeaseSpec()
        record = (spec.holder_identity, spec.renew_time)
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
        mine = spec.holder_identity == self.identity
        if spec.holder_identity and not mine and time.monotonic() - self._observed_at < (spec.lease_duration_seconds or self.duration):
            return False
        if not mine:
            spec.acquire_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
        spec.holder_identity, spec.renew_time, spec.lease_duration_seconds = self.identity, now, self.duration
        lease.spec = spec
        try:
            self.coord.replace_namespaced_lease(self.name, self.namespace, lease, _request_timeout=10)
        except ApiException as e:
            if e.status == 409:  # someone else wrote it first
                return False
            raise
        return True

    def release(self) -> None:
        """Give the Lease up (if we hold it) so that a standby takes over without waiting."""
        try:
            lease = self._read()
            if lease is None or lease.spec is None or lease.spec.holder_identity != self.identity:
                return
            lease.spec.holder_identity = None
            lease.spec.lease_duration_seconds = 1
            lease.spec.renew_time = datetime.now(UTC)
            self.coord.replace_namespaced_lease(self.name, self.namespace, lease, _request_timeout=10)
            log.info("released leadership (Lease %s/%s)", self.namespace, self.name)
        except Exception as e:  # best effort: the Lease expires by itself anyway
            log.warning("could not release Lease %s/%s: %s", self.namespace, self.name, describe(e))


class _Standby(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = b'{"leader": false}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # probes every few seconds would flood the log
        pass


@contextmanager
def standby_health(host: str, port: int) -> Iterator[None]:
    server = http.server.ThreadingHTTPServer((host, port), _Standby)
    thread = threading.Thread(target=server.serve_forever, name="standby-health", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def _attempt(lease: Lease, trouble: Trouble) -> bool:
    """One try to take or renew the Lease; API trouble counts as a failed attempt, logged once (not on
    each retry of an outage) and once more when the API answers again."""
    try:
        held = lease.try_acquire_or_renew()
    except Exception as e:
        trouble.failed(e)
        return False
    trouble.ok()
    return held


class Leading:
    """Handed to the leader: `lost` is set (and the callbacks called, from a thread) if it stops leading."""

    def __init__(self) -> None:
        self.lost = threading.Event()
        self._callbacks: list[Callable[[], None]] = []

    def on_lost(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def lose(self) -> None:
        self.lost.set()
        for cb in self._callbacks:
            cb()


def _renew(lease: Lease, cfg: OperatorConfig, leading: Leading, done: threading.Event, trouble: Trouble) -> None:
    last_ok = time.monotonic()
    while not done.wait(cfg.retry_period_seconds):
        if _attempt(lease, trouble):
            last_ok = time.monotonic()
        elif time.monotonic() - last_ok > cfg.renew_deadline_seconds:
            log.error("could not renew Lease %s/%s for %ss: stopping leading", lease.namespace, lease.name,
                      cfg.renew_deadline_seconds)
            leading.lose()
            return


@contextmanager
def leadership(api: client.ApiClient, cfg: OperatorConfig, stop: threading.Event) -> Iterator[Leading | None]:
    """Block until this process leads (or `stop` is set: yields None); then yield a Leading that tells
    if leadership is lost. Without leader election, lead at once."""
    if not cfg.leader_election:
        yield Leading()
        return
    lease = Lease(api, cfg.namespace, cfg.lease_name, cfg.identity, cfg.lease_duration_seconds)
    log.info("waiting to lead (Lease %s/%s, identity %s)", cfg.namespace, cfg.lease_name, cfg.identity)
    trouble = Trouble(log, f"Lease {cfg.namespace}/{cfg.lease_name}")
    with standby_health(cfg.health_host, cfg.health_port):
        while not _attempt(lease, trouble):
            if stop.wait(cfg.retry_period_seconds):
                break
    if stop.is_set():
        yield None
        return
    log.info("leading (Lease %s/%s)", cfg.namespace, cfg.lease_name)
    leading, done = Leading(), threading.Event()
    renewer = threading.Thread(target=_renew, args=(lease, cfg, leading, done, trouble), name="lease-renewer", daemon=True)
    renewer.start()
    try:
        yield leading
    finally:
        done.set()
        renewer.join(timeout=cfg.retry_period_seconds + 15)
        if not leading.lost.is_set():
            lease.release()
