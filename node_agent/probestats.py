"""When the kernel times the agent's programs (BPF run-time statistics).

With statistics on, every run of every BPF program on the machine reads the clock twice more and
updates per-CPU counters: measured here, +2 µs on a UDP ping-pong round trip into a traced pod and
-5% TCP bulk throughput (ten to twenty program runs per packet). So the agent does not leave them on:

- `always`: on from start to exit (the standalone `trace` command's default: a diagnostic session whose
  report includes what its probes cost).
- `sampled`: on for `window` seconds at the end of every `period` seconds (the cluster agent's default,
  5 s of every 300 s): the average cost per run is measured, the packets in between do not pay for it.
- `off`: never; probe cost reads as zero.

Statistics are switched on with BPF_ENABLE_STATS, which holds them on for as long as its file
descriptor is open: an agent that dies cannot leave them on. Another process may hold them on too.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

from .kernel import bpfsys

log = logging.getLogger(__name__)

MODES = ("always", "sampled", "off")


@dataclass(frozen=True)
class StatsPolicy:
    mode: str = "always"
    window_s: float = 5.0
    period_s: float = 300.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"probe statistics mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.mode == "sampled" and not 0 < self.window_s < self.period_s:
            raise ValueError(f"probe statistics window ({self.window_s} s) must be shorter than its "
                             f"period ({self.period_s} s) and positive")


class ProbeStats:
    def __init__(self, policy: StatsPolicy = StatsPolicy()) -> None:
        self.policy = policy
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_since: float | None = None
        self._seconds_on = 0.0
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self._fd is not None

    @property
    def seconds_on(self) -> float:
        """How long statistics have been on so far: the time the run counts cover."""
        with self._lock:
            extra = time.monotonic() - self._on_since if self._on_since is not None else 0.0
            return self._seconds_on + extra

    def start(self) -> None:
        self._stop.clear()
        if self.policy.mode == "always":
            self._switch(True)
        elif self.policy.mode == "sampled":
            self._thread = threading.Thread(target=self._loop, name="probe-stats", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        idle = self.policy.period_s - self.policy.window_s
        while not self._stop.wait(idle):
            self._switch(True)
            if self._stop.wait(self.policy.window_s):
                break
            self._switch(False)

    def _switch(self, on: bool) -> None:
        with self._lock:
            if on and self._fd is None:
                try:
                    self._fd = bpfsys.enable_stats()
                    self._on_since = time.monotonic()
                except OSError as e:
                    if not self._warned:
                        log.warning("BPF run-time statistics unavailable (%s); probe cost will read as 0", e)
                        self._warned = True
            elif not on and self._fd is not None:
                os.close(self._fd)
                self._fd = None
                self._seconds_on += time.monotonic() - self._on_since
                self._on_since = None

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._switch(False)
