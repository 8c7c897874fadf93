"""The NIC path: a pod's download from the package registry the machine already uses, through the host's
NIC and a MASQUERADE on it, as a pod's outbound connection goes on a node. The one path here whose packets
raise a real NIC's hardirq. The fidelity part measures its rx_irq and rx_driver against nicpath.bt; the
probe-cost part what the agent's programs cost on it (the IRQ hook runs warm only there).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.netlab import Pod

from .tracers import clean_env

# A pinned wheel (pure Python, about 11 MB) from the registry pip is configured for, cached nowhere.
DOWNLOAD = "Babel==2.14.0"
DOWNLOAD_TIMEOUT_S = 60


def uplink() -> str:
    """The device of the default route: where the registry's packets come in."""
    out = subprocess.run(["ip", "-4", "route", "show", "default"], capture_output=True, text=True, check=True)
    words = out.stdout.split()
    if "dev" not in words:
        raise RuntimeError(f"no IPv4 default route: {out.stdout!r}")
    return words[words.index("dev") + 1]


@contextlib.contextmanager
def through_uplink(pod: Pod, bridge: str) -> Iterator[str]:
    """The pod's packets leave through the uplink (yielded) behind a MASQUERADE, and its replies come back.
    The host forwards on both devices meanwhile (per device, set back after; on a machine whose forwarding
    is off, as a fresh one's is, the download timed out)."""
    dev = uplink()
    rule = ["POSTROUTING", "-s", f"{pod.ip}/32", "-o", dev, "-j", "MASQUERADE"]
    forwarding = {d: Path("/proc/sys/net/ipv4/conf") / d / "forwarding" for d in (bridge, dev)}
    was_forwarding = {d: f.read_text().strip() for d, f in forwarding.items()}
    try:
        for f in forwarding.values():
            f.write_text("1")
        subprocess.run(["iptables", "-t", "nat", "-I", *rule], check=True, capture_output=True)
        yield dev
    finally:
        subprocess.run(["iptables", "-t", "nat", "-D", *rule], check=False, capture_output=True)
        for d, f in forwarding.items():
            f.write_text(was_forwarding[d])


def download(pod: Pod) -> dict:
    """`pip download` of DOWNLOAD inside the pod, into a directory removed afterwards."""
    python = shutil.which("python3")
    with tempfile.TemporaryDirectory(prefix="lt-nicpath-") as d:
        t0 = time.monotonic()
        out = subprocess.run(pod.exec(python, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
                                      "--only-binary=:all:", "--disable-pip-version-check", "-q", "-d", d,
                                      DOWNLOAD),
                             capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S, env=clean_env())
        seconds = time.monotonic() - t0
        if out.returncode != 0:
            raise RuntimeError(f"pip download {DOWNLOAD} in {pod.name} failed: {out.stderr.strip()[-500:]}")
        size = sum(f.stat().st_size for f in Path(d).iterdir())
    return {"bytes": size, "seconds": round(seconds, 3)}
