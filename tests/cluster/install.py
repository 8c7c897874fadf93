"""Where latencytrace's chart is and where it installs, its CRDs applied without helm (for control
planes of fake nodes), and the detached cluster's record of what `down` must stop."""

from __future__ import annotations

import json
from pathlib import Path

from .controlplane import ControlPlane
from .procs import Proc

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "latencytrace"
NAMESPACE = "latencytrace"
RELEASE = "latencytrace"


def apply_crds(cp: ControlPlane) -> None:
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        cp.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    cp.kubectl("wait", "--for=condition=Established", "--timeout=60s",
               "crd/latencytraces.latencytrace.io", "crd/latencytracenodes.latencytrace.io")


def record(cp: ControlPlane, procs: list[Proc], **extra) -> None:
    """Add processes (and anything else `down` must clean up) to the detached cluster's state."""
    state = json.loads(cp.state_file.read_text())
    state["procs"] += [{"name": p.name, "pid": p.pid, "exe": p.argv[0]} for p in procs]
    state.update(extra)
    cp.state_file.write_text(json.dumps(state, indent=2))
