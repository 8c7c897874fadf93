"""Starting and stopping the background servers the tests need.

Each server runs in its own session/process group so stop() can signal it and any
children it forked as one unit; with die_with_parent (the default for in-process
use) the kernel also sends it SIGTERM if the Python process dies, so a crashed or
killed pytest leaves no orphans behind.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A currently unused TCP port on 127.0.0.1 (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Looked up once here: the child between fork and exec must not dlopen (another
# thread of ours may have held the loader lock at fork time).
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> None:
    # Runs in the child between fork and exec. PDEATHSIG fires when the forking
    # thread exits, which for pytest's main thread means when pytest exits.
    _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


class Proc:
    """One background server, its output appended to `log`."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, *,
                 env: dict[str, str] | None = None, cwd: Path | None = None,
                 die_with_parent: bool = True) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,  # own process group: pgid == pid
                preexec_fn=_die_with_parent if die_with_parent else None,
            )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def check_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(
                f"{self.name} exited with code {self.popen.returncode}; last log lines "
                f"({self.log}):\n{self.tail()}"
            )

    def stop(self, timeout: float = 10.0) -> None:
        stop_group(self.pid, timeout)
        try:
            self.popen.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop_group(pgid: int, timeout: float = 10.0) -> None:
    """SIGTERM the process group, SIGKILL it if still there after `timeout`."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pgid)
        if not _group_alive(pgid):
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(50):
        _reap(pgid)
        if not _group_alive(pgid):
            return
        time.sleep(0.1)


def _reap(pid: int) -> None:
    # A child of ours stays a zombie (and its group "alive") until waited for.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def wait_until(what: str, probe: Callable[[], bool], timeout: float,
               procs: Sequence[Proc] = (), interval: float = 0.25) -> None:
    """Polls `probe` until true; fails early (with its log) if a watched process dies."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        for p in procs:
            p.check_alive()
        try:
            if probe():
                return
        except Exception as exc:  # probes raise while the server is still coming up
            last_error = exc
        time.sleep(interval)
    logs = "\n".join(f"--- {p.name} ({p.log}):\n{p.tail()}" for p in procs)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} "
                       f"(last error: {last_error!r})\n{logs}")


def http_get(url: str, context: ssl.SSLContext | None = None, timeout: float = 5.0) -> bytes:
    """GET url, ignoring any *_proxy environment (every server here is on loopback)."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    with urllib.request.build_opener(*handlers).open(url, timeout=timeout) as resp:
        return resp.read()


def http_ok(url: str, context: ssl.SSLContext | None = None, timeout: float = 3.0) -> bool:
    """True when GET url answers 200."""
    try:
        http_get(url, context, timeout)
        return True
    except urllib.error.HTTPError:
        return False


def insecure_tls() -> ssl.SSLContext:
    """For the health ports of components that serve a self-signed cert."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def listening_addresses(pid: int) -> list[str]:
    """host:port of TCP sockets `pid` listens on (from /proc, no tools needed)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and inode in inodes:  # 0A = LISTEN
                    host_hex, port_hex = local.split(":")
                    found.append(f"{_hex_ip(host_hex)}:{int(port_hex, 16)}")
    return found


def _hex_ip(host_hex: str) -> str:
    if len(host_hex) == 8:
        return ".".join(str(b) for b in reversed(bytes.fromhex(host_hex)))
    return f"[{host_hex}]"  # IPv6, raw hex: never "127.0.0.1", so a check flags it
