"""The in-cluster agent's health endpoint: what the kubelet's startup, liveness and readiness probes ask.

- `GET /startupz`: the agent is up and has done its first read of its LatencyTraceNode (and what that read
  asked for: loading the probes, a BCC compile, when the node already has something to trace).
- `GET /livez`: the main loop is turning: its last heartbeat is younger than the loop's longest wait plus
  one turn's allowance (AgentConfig.liveness_seconds), or it has been loading the probes for less than
  their allowance (AgentConfig.health_load_seconds). A wedged loop answers 503; the kubelet restarts it.
- `GET /readyz`: the programs this node needs are attached (or nothing needs tracing) and the last status
  report to the API server succeeded. The loop decides this (cluster.readiness) and hands it over here.

Each answers 200 or 503 with a one-line JSON document `{"ok": ..., "reason": "..."}`; other paths 404.

Why the standard library's http.server in a daemon thread: three GET endpoints answering a few bytes to
the local kubelet every few seconds need no framework and no event loop (the agent has none). The
handlers only read a lock-protected snapshot that the main loop writes (`Health`): a probe never touches
the BPF objects or the API client, and a slow or malformed request holds only its own daemon thread
(with a socket timeout), never the loop. Errors inside a request are logged at debug level and never
leave the server's threads.

The agent runs in the node's network namespace (hostNetwork), so by default the server binds 127.0.0.1:
the kubelet runs its httpGet probes from the node's network namespace too, and reaches it there with
`host: 127.0.0.1`, while nothing off the node can. A port that cannot be bound at start is an error
that stops the agent with a message naming the setting: in the node's namespace the holder is another
process, whose answers the kubelet would otherwise take for ours.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Path -> the Health method that answers it (the chart's probes ask these paths).
ROUTES = {"/startupz": "startup", "/livez": "liveness", "/readyz": "readiness"}


class HealthError(RuntimeError):
    """The health endpoint cannot serve (its address cannot be bound)."""


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str


class Health:
    """The state the probes read: written by the main loop, read by the server's threads."""

    def __init__(self, stall_seconds: float, load_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.stall_seconds = stall_seconds  # longest gap between heartbeats of a healthy loop
        self.load_seconds = load_seconds  # longest a healthy loop takes to load the probes
        self.clock = clock
        self._lock = threading.Lock()
        self._started = False
        self._waiting_for = "the LatencyTraceNode has not been read yet"
        self._beat = clock()
        self._busy: tuple[str, float] | None = None  # (what, since)
        self._ready = Verdict(False, "starting")

    # -- written by the loop ------------------------------------------------------------------------
    def beat(self) -> None:
        with self._lock:
            self._beat = self.clock()

    def started(self) -> None:
        with self._lock:
            self._started = True

    def waiting_for(self, what: str) -> None:
        """Why startup is not done yet (shown by /startupz and /readyz)."""
        with self._lock:
            self._waiting_for = what

    def set_ready(self, ok: bool, reason: str) -> None:
        with self._lock:
            self._ready = Verdict(ok, reason)

    @contextmanager
    def busy(self, what: str) -> Iterator[None]:
        """A long step of the loop (loading the probes): liveness allows `load_seconds` for it, and
        readiness answers 503 with `what` meanwhile."""
        with self._lock:
            self._busy = (what, self.clock())
        try:
            yield
        finally:
            with self._lock:
                self._busy = None
                self._beat = self.clock()

    # -- read by the probes -------------------------------------------------------------------------
    def startup(self) -> Verdict:
        with self._lock:
            if self._started:
                return Verdict(True, "started: the LatencyTraceNode was read")
            if self._busy is not None:
                return Verdict(False, f"starting: {self._busy[0]}")
            return Verdict(False, f"starting: {self._waiting_for}")

    def liveness(self) -> Verdict:
        with self._lock:
            now = self.clock()
            if self._busy is not None:
                what, since = self._busy
                age = now - since
                return Verdict(age <= self.load_seconds,
                               f"{what} for {age:.0f} s (allowed {self.load_seconds:.0f} s)")
            age = now - self._beat
            if age <= self.stall_seconds:
                return Verdict(True, f"main loop turned {age:.1f} s ago")
            return Verdict(False, f"main loop stuck: last turned {age:.0f} s ago (allowed {self.stall_seconds:.0f} s)")

    def readiness(self) -> Verdict:
        with self._lock:
            if self._busy is not None:
                return Verdict(False, self._busy[0])
            if not self._started:
                return Verdict(False, f"starting: {self._waiting_for}")
            return self._ready


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    timeout = 5  # a client that sends nothing holds its thread no longer than this

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        check = self.server.routes.get(self.path.split("?", 1)[0])
        if check is None:
            self._send(404, {"ok": False, "reason": f"no such endpoint; try {', '.join(self.server.routes)}"})
            return
        verdict = check()
        self._send(200 if verdict.ok else 503, {"ok": verdict.ok, "reason": verdict.reason})

    def _send(self, code: int, doc: dict) -> None:
        body = (json.dumps(doc) + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args) -> None:  # a probe every few seconds would flood the log
        log.debug("health %s: " + fmt, self.client_address[0], *args)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], routes: dict[str, Callable[[], Verdict]]):
        self.address_family = socket.AF_INET6 if ipaddress.ip_address(address[0]).version == 6 else socket.AF_INET
        self.routes = routes
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address) -> None:  # a broken request ends its thread, nothing else
        log.debug("health request from %s failed", client_address[0], exc_info=True)


class HealthServer:
    """Serves `health` on address:port (port 0: any free port, see `.port`) from a daemon thread."""

    def __init__(self, health: Health, address: str, port: int):
        routes = {path: getattr(health, check) for path, check in ROUTES.items()}
        try:
            self._server = _Server((address, port), routes)
        except OSError as e:
            raise HealthError(f"cannot serve the health endpoint on {address}:{port}: {e.strerror or e} "
                              "(another process on the node holds the port? choose another with "
                              "LATENCYTRACE_AGENT_HEALTH_PORT, the chart's agent.health.port)") from None
        self._thread = threading.Thread(target=self._server.serve_forever, name="health", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> HealthServer:
        self._thread.start()
        log.info("health endpoint on %s:%d (/startupz, /livez, /readyz)", self._server.server_address[0], self.port)
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
