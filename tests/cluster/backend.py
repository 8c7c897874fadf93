"""What the test backends (jaeger.py, prometheus.py, otelcol.py) share: one binary started with a
generated config under its work directory, waited for until its readiness probe answers, and stopped
(also at interpreter exit, unless detached to outlive this process).

A subclass names its tool (`name`, as versions.ensure_tools knows it, also its log's name), says what
ready means (`what`, for the timeout message), and provides only `argv` (picks its ports, writes its
config, returns the command line) and `_ready` (the probe).
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path
from typing import Any, Self

import yaml

from . import versions
from .procs import Proc, wait_until


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
