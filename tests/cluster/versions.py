"""Pinned tool versions and where their built binaries live.

The versions themselves are in versions.env (shared with build.sh); this module
reads them and maps a tool name to its cached binary, running build.sh when a
binary is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build.sh"


def _read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip()
    return values


_PINS = _read_env_file(HERE / "versions.env")
KUBERNETES_VERSION = _PINS["KUBERNETES_VERSION"]
ETCD_VERSION = _PINS["ETCD_VERSION"]
KWOK_VERSION = _PINS["KWOK_VERSION"]
HELM_VERSION = _PINS["HELM_VERSION"]
JAEGER_VERSION = _PINS["JAEGER_VERSION"]
CNI_PLUGINS_VERSION = _PINS["CNI_PLUGINS_VERSION"]
CRICTL_VERSION = _PINS["CRICTL_VERSION"]
PROMETHEUS_VERSION = _PINS["PROMETHEUS_VERSION"]
OTELCOL_VERSION = _PINS["OTELCOL_VERSION"]

# tool -> (pinned version, build.sh target that produces it)
TOOLS: dict[str, tuple[str, str]] = {
    "etcd": (ETCD_VERSION, "etcd"),
    "kube-apiserver": (KUBERNETES_VERSION, "kubernetes"),
    "kube-controller-manager": (KUBERNETES_VERSION, "kubernetes"),
    "kube-scheduler": (KUBERNETES_VERSION, "kubernetes"),
    "kubectl": (KUBERNETES_VERSION, "kubernetes"),
    "kubelet": (KUBERNETES_VERSION, "kubernetes"),
    "kube-proxy": (KUBERNETES_VERSION, "kubernetes"),
    "kwok": (KWOK_VERSION, "kwok"),
    "helm": (HELM_VERSION, "helm"),
    "jaeger": (JAEGER_VERSION, "jaeger"),
    "bridge": (CNI_PLUGINS_VERSION, "cni"),
    "host-local": (CNI_PLUGINS_VERSION, "cni"),
    "loopback": (CNI_PLUGINS_VERSION, "cni"),
    "portmap": (CNI_PLUGINS_VERSION, "cni"),
    "crictl": (CRICTL_VERSION, "crictl"),
    "prometheus": (PROMETHEUS_VERSION, "prometheus"),
    "otelcol": (OTELCOL_VERSION, "otelcol"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LATENCYTRACE_CACHE", "/var/cache/latencytrace"))


def bin_path(tool: str) -> Path:
    """Where build.sh puts `tool` (whether or not it is built yet)."""
    version, _ = TOOLS[tool]
    return cache_dir() / "bin" / f"{tool}-{version}" / tool


def run_build(targets: list[str]) -> None:
    """Runs build.sh for `targets`, its progress lines going straight to our stderr
    (not captured) so a long first build is visibly alive, also under pytest -s."""
    cmd = ["bash", str(BUILD_SCRIPT), *targets]
    print(f"[cluster] building missing tools: {' '.join(targets)}", file=sys.stderr, flush=True)
    # stdout too goes to stderr: callers may be parsing our stdout.
    subprocess.run(cmd, check=True, stdout=sys.stderr, stderr=sys.stderr)


def ensure_tools(*tools: str) -> dict[str, Path]:
    """Returns {tool: path}, building whatever is missing first."""
    targets: list[str] = []
    for tool in tools:
        target = TOOLS[tool][1]
        if not os.access(bin_path(tool), os.X_OK) and target not in targets:
            targets.append(target)
    if targets:
        run_build(targets)
    return {tool: bin_path(tool) for tool in tools}
