"""What the test backends (jaeger.py, prometheus.py, otelcol.py) share: one binary started with a
generated config under its work directory, waited for until its readiness probe answers, and stopped
(also at interpreter exit, unless detached to outlive this process).

A subclass names its tool (`name`, as versions.ensure_tools knows it, also its log's name), says what
ready means (`what`, for the timeout message), and provides only `argv` (picks its ports, writes its
config, returns the command line) and `_ready` (the probe). OtlpBackend adds what the two OTLP
receivers among them (Jaeger, the collector) share: their OTLP/gRPC and OTLP/HTTP ports.
"""

from __future__ import annotations

import atexit
import os
import socket
from pathlib import Path
from typing import Any, Self

import yaml

from . import versions
from .procs import Proc, free_port, wait_until


class Backend:
    name: str  # the tool in versions.ensure_tools; logs/<name>.log
    what: str  # what _ready() checks, as a timeout says it

    def __init__(self, workdir: str | os.PathLike[str], *, startup_timeout: float, detach: bool) -> None:
        self.workdir = Path(workdir).resolve()
        self.startup_timeout = startup_timeout
        self.detach = detach
        self.proc: Proc | None = None

    def argv(self, binary: str) -> list[str]:
        """The command line (after picking ports and writing the config)."""
        raise NotImplementedError

    def _ready(self) -> bool:
        """True (or an exception while coming up) once the server answers."""
        raise NotImplementedError

    def write_config(self, filename: str, config: dict[str, Any]) -> Path:
        path = self.workdir / filename
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def start(self) -> Self:
        if self.proc is not None:
            return self
        binary = versions.ensure_tools(self.name)[self.name]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = Proc(self.name, self.argv(binary), self.workdir / "logs" / f"{self.name}.log",
                         cwd=self.workdir, die_with_parent=not self.detach)
        if not self.detach:
            atexit.register(self.stop)
        try:
            wait_until(self.what, self._ready, self.startup_timeout, [self.proc])
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class OtlpBackend(Backend):
    """A backend with an OTLP receiver (gRPC and HTTP, plaintext) on free 127.0.0.1 ports."""

    def __init__(self, workdir: str | os.PathLike[str], *, startup_timeout: float, detach: bool) -> None:
        super().__init__(workdir, startup_timeout=startup_timeout, detach=detach)
        self.ports: dict[str, int] = {}

    @property
    def otlp_grpc_endpoint(self) -> str:
        """host:port for an OTLP/gRPC exporter (plaintext)."""
        return f"127.0.0.1:{self.ports['otlp_grpc']}"

    @property
    def otlp_http_endpoint(self) -> str:
        """Base URL of the OTLP/HTTP receiver; an exporter adds /v1/traces or /v1/metrics."""
        return f"http://127.0.0.1:{self.ports['otlp_http']}"

    def pick_ports(self, *others: str) -> None:
        """A free port for each OTLP protocol and each of `others` (by name, in self.ports)."""
        for name in ("otlp_grpc", "otlp_http", *others):
            self.ports[name] = free_port()

    def otlp_receiver(self) -> dict[str, Any]:
        """The `receivers` section of its config: the otlp receiver on its two ports."""
        return {"otlp": {"protocols": {
            "grpc": {"endpoint": self.otlp_grpc_endpoint},
            "http": {"endpoint": f"127.0.0.1:{self.ports['otlp_http']}"},
        }}}

    def otlp_listening(self) -> bool:
        """Both OTLP ports accept connections (raises until they do)."""
        for port in (self.ports["otlp_grpc"], self.ports["otlp_http"]):
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
        return True
