"""The two tracers under test, each as its own process: the latencytrace agent and a bpftrace script.

Both are started, waited for until their probes are attached (time measured from the start of the
process), sampled while they run (BPF statistics, CPU, memory), and stopped with the signal their
users would send, after which their own report is parsed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from latencytrace.node_agent import segments
from latencytrace.node_agent.probes import PROBES, needed

from .bpfprogs import ProgramSet, ProgStats
from .system import ProcessUsage, process_usage

AGENT = str(Path(sys.executable).with_name("latencytrace-agent"))
BPF_SCRIPT = Path(__file__).resolve().with_name("segments.bt")


def clean_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: never the repository on PYTHONPATH (its operator/ folder
    would shadow the standard library's `operator`)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(extra)
    return env


class TracerProcess:
    name = "tracer"

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.attach_wall_s: float | None = None
        self.progs: ProgramSet | None = None
        self.stderr_path: Path | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _spawn(self, cmd: list[str], log_dir: Path, env: dict[str, str]) -> None:
        self.stderr_path = log_dir / f"{self.name}-{int(time.time() * 1000)}.stderr"
        self.started = time.monotonic()
        # errors="replace": a byte that is not UTF-8 (a string key of a map) must not stop the reading of
        # the output, which would leave the tracer blocked on a full pipe.
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.stderr_path.open("w"), text=True,
                                     errors="replace", env=env)
        self.progs = ProgramSet(self.proc.pid)

    def _fail(self, what: str) -> RuntimeError:
        err = self.stderr_path.read_text()[-1500:] if self.stderr_path else ""
        return RuntimeError(f"{self.name} {what}: {err.strip()}")

    def _wait_programs(self, ready: Callable[[int], bool], timeout: float) -> None:
        try:
            self._wait_programs_loop(ready, timeout)
        except BaseException:
            self.kill()  # whatever went wrong here, the tracer must not outlive its start
            raise

    def _wait_programs_loop(self, ready: Callable[[int], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise self._fail(f"exited with status {self.proc.returncode} before attaching")
            self._sample()
            n = len(self.progs.ids())
            if ready(n):
                self.attach_wall_s = time.monotonic() - self.started
                self.progs.resolve_names()
                return
            if time.monotonic() > deadline:
                raise self._fail(f"had {n} programs loaded after {timeout:.0f} s")
            time.sleep(0.02)

    def _sample(self) -> None:
        """Called every 20 ms while waiting for the programs."""

    def stats(self) -> dict[str, ProgStats]:
        return self.progs.snapshot()

    def usage(self, private: bool = False) -> ProcessUsage:
        return process_usage(self.pid, private)

    def _signal_and_collect(self, sig: int, timeout: float) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            raise self._fail(f"did not stop within {timeout:.0f} s of signal {sig}") from None
        return out

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def _rss_anon(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class AgentProcess(TracerProcess):
    """`latencytrace-agent trace --netns ... --format json`, as a user runs it; stopped with SIGTERM."""

    name = "agent"

    def __init__(self, netns_paths: list[str], log_dir: Path, extra_args: tuple[str, ...] = (), agent: str = AGENT):
        super().__init__()
        self.agent = agent  # the executable: this checkout's, or another build's (paired.against)
        self.netns_paths = netns_paths
        self.log_dir = log_dir
        self.extra_args = extra_args
        self.report: dict | None = None
        # The compiler process the agent starts (node_agent/kernel/loader.py): pid -> its VmHWM, sampled
        # while waiting for the programs (it exits once it has handed them over).
        self.compiler_peak_rss: dict[int, int] = {}
        # Anonymous memory (RssAnon: what no memory limit can reclaim) of the agent and its children
        # together, the largest sample while waiting: what the container holds at start.
        self.start_anon_peak = 0

    def _sample(self) -> None:
        try:
            children = psutil.Process(self.pid).children()
            anon = _rss_anon(self.pid)
        except (OSError, psutil.NoSuchProcess):
            return
        for c in children:
            try:
                peak = process_usage(c.pid).peak_rss_bytes
                anon += _rss_anon(c.pid)
            except (OSError, psutil.NoSuchProcess):  # it exited meanwhile
                continue
            self.compiler_peak_rss[c.pid] = max(peak, self.compiler_peak_rss.get(c.pid, 0))
        self.start_anon_peak = max(self.start_anon_peak, anon)

    @staticmethod
    def expected_programs(segment_names: tuple[str, ...] = ()) -> int:
        """Programs the agent loads on this kernel for `segment_names` (none: all segments); a program
        attached to several tracepoints counts once."""
        from latencytrace.node_agent.kernel import features
        from latencytrace.node_agent.kernel.btf import KernelBTF

        feats = features.probe(KernelBTF.load(), PROBES)
        mask = segments.mask(list(segment_names))
        return len({p.program for p in feats.usable if needed(p, mask)})

    def start(self, expected_programs: int | None, timeout: float = 120) -> AgentProcess:
        """Run it and wait for its programs: `expected_programs` of them, or None for another build's agent,
        whose number this checkout cannot know: then until some are loaded and their number has held for
        SETTLE_S (an agent loads and attaches all its programs within a second of its compile's end)."""
        cmd = [self.agent, "trace", "--format", "json", "--duration", "86400", "--interval", "1", *self.extra_args]
        for path in self.netns_paths:
            cmd += ["--netns", path]
        # A crash in native code (BCC) then leaves every thread's Python stack in the stderr log.
        self._spawn(cmd, self.log_dir, clean_env(PYTHONFAULTHANDLER="1"))
        self._wait_programs(_at_least(expected_programs) if expected_programs is not None else _settled(), timeout)
        time.sleep(1.0)  # the agent writes its targets right after attaching; let it, and settle
        return self

    def stop(self) -> dict:
        out = self._signal_and_collect(signal.SIGTERM, 60)
        if self.proc.returncode != 0:
            raise self._fail(f"exited with status {self.proc.returncode}"
                             + (" (killed by signal %d)" % -self.proc.returncode if self.proc.returncode < 0 else ""))
        self.report = json.loads(out)
        return self.report

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


SETTLE_S = 2.0


def _at_least(n: int) -> Callable[[int], bool]:
    return lambda have: have >= n


def _settled() -> Callable[[int], bool]:
    """True once the number of programs is above 0 and has not changed for SETTLE_S."""
    last = {"n": 0, "since": time.monotonic()}

    def ready(have: int) -> bool:
        now = time.monotonic()
        if have != last["n"]:
            last.update(n=have, since=now)
        return have > 0 and now - last["since"] >= SETTLE_S

    return ready


class BpftraceProcess(TracerProcess):
    """bpftrace running tests/bench/segments.bt; stopped with SIGINT, which prints its maps as JSON."""

    name = "bpftrace"

    def __init__(self, params: list[int], log_dir: Path, script: Path = BPF_SCRIPT):
        super().__init__()
        self.params = params
        self.log_dir = log_dir
        self.script = script
        self.maps: dict[str, dict] = {}
        self._lines: list[str] = []
        self._attached = threading.Event()
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 120) -> BpftraceProcess:
        cmd = ["bpftrace", "-f", "json", str(self.script), *(str(p) for p in self.params)]
        # Keys of in-flight and histogram maps: room for the packets of a busy second.
        self._spawn(cmd, self.log_dir, clean_env(BPFTRACE_MAP_KEYS_MAX="65536"))
        self._reader = threading.Thread(target=self._read, daemon=True, name="bpftrace-stdout")
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not self._attached.wait(0.02):
            if self.proc.poll() is not None:
                raise self._fail(f"exited with status {self.proc.returncode} before attaching")
            if time.monotonic() > deadline:
                raise self._fail(f"did not attach within {timeout:.0f} s")
        self.attach_wall_s = time.monotonic() - self.started
        self.progs.resolve_names()
        time.sleep(0.5)
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.append(line)
            if '"attached_probes"' in line:
                self._attached.set()

    def _where(self) -> str:
        """Where a process that does not stop is: each thread's state and kernel wait, and whether our
        reader of its output is still reading (a reader that stopped would leave it blocked on a full pipe)."""
        threads = []
        for task in sorted(Path(f"/proc/{self.proc.pid}/task").glob("*")):
            try:
                state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
                threads.append(f"{task.name}:{state}/{(task / 'wchan').read_text() or '-'}")
            except OSError:
                continue
        alive = self._reader is not None and self._reader.is_alive()
        return f"threads {' '.join(threads) or '?'}; output reader {'reading' if alive else 'gone'}, " \
               f"{len(self._lines)} lines read"

    def stop(self) -> dict[str, dict]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                # Seen once in CI (2026-12-05): bpftrace still waiting in epoll_wait 120 s after the
                # signal, its output still read: a SIGINT that lands just before it blocks there is not
                # looked at until an event wakes it, and none comes. A second one interrupts the wait.
                self.proc.send_signal(signal.SIGINT)
                self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            where = self._where()  # before the kill: what it was waiting for
            self.proc.kill()
            self.proc.wait()
            raise self._fail(f"did not stop within 120 s of SIGINT, sent twice ({where})") from None
        self._reader.join(timeout=30)  # until bpftrace's last line (its maps) is read
        for line in self._lines:
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                continue
            if doc.get("type") == "map":
                self.maps.update(doc["data"])
        return self.maps
