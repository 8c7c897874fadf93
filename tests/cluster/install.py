"""Where latencytrace's chart is and where it installs, its CRDs applied without helm (for control
planes of fake nodes), and the detached cluster's record of what `down` must stop."""

from __future__ import annotations

import json
from pathlib import Path

from .controlplane import ControlPlane
from .procs import Proc, wait_until

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "latencytrace"
NAMESPACE = "latencytrace"
RELEASE = "latencytrace"


def apply_crds(cp: ControlPlane) -> None:
    """The project's CRDs (crds/*.yaml), applied and Established.

    Polled here, not `kubectl wait --for=condition=Established`: that fails at once instead of waiting
    when it reads a CRD the API server has given no status condition yet (".status.conditions accessor
    error: <nil> is of the type <nil>", seen in a CI run)."""
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        cp.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))

    def established() -> bool:
        crds = json.loads(cp.kubectl("get", "-f", str(ROOT / "crds"), "-o", "json").stdout)["items"]
        return bool(crds) and all(
            any(c.get("type") == "Established" and c.get("status") == "True"
                for c in (crd.get("status") or {}).get("conditions") or [])
            for crd in crds)

    wait_until("the CRDs to be Established", established, timeout=60)


def record(cp: ControlPlane, procs: list[Proc], **extra) -> None:
    """Add processes (and anything else `down` must clean up) to the detached cluster's state."""
    state = json.loads(cp.state_file.read_text())
    state["procs"] += [{"name": p.name, "pid": p.pid, "exe": p.argv[0]} for p in procs]
    state.update(extra)
    cp.state_file.write_text(json.dumps(state, indent=2))
