"""The images built here (tests/cluster/images.py) from the Dockerfile and tests/cluster: what is in them,
that their entrypoints run inside them, and that their archives name them the way containerd imports.

Built once before the tests run (the `images_built` fixture; a first build takes minutes and shows
progress). Containers run with buildah's chroot isolation on this machine's kernel.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from . import images
from .images import AGENT_IMAGE, OPERATOR_IMAGE, PAUSE_IMAGE, WORKLOAD_IMAGE

RUNTIME_IMAGES = (OPERATOR_IMAGE, AGENT_IMAGE)
# The agent's capabilities in the chart (values.yaml agent.capabilities).
AGENT_CAPS = ("CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN", "CAP_SYS_PTRACE")


def _config(image: str) -> dict:
    out = subprocess.run(["buildah", "inspect", "--type", "image", image], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)["OCIv1"]["config"]


def test_chart_default_names_and_one_archive_each(images_built):
    values = (images.CHART / "values.yaml").read_text()
    assert re.search(r"^\s+repository: ghcr.io/latencytrace/latencytrace-operator$", values, re.M)
    assert OPERATOR_IMAGE == "ghcr.io/latencytrace/latencytrace-operator:0.1.0"
    assert AGENT_IMAGE == "ghcr.io/latencytrace/latencytrace-agent:0.1.0"
    assert set(images_built) == {PAUSE_IMAGE, WORKLOAD_IMAGE, OPERATOR_IMAGE, AGENT_IMAGE}
    for name, archive in images_built.items():
        # containerd's importer names an image by this annotation of the OCI index.
        with tarfile.open(archive) as tar:
            index = json.load(tar.extractfile("index.json"))
        [manifest] = index["manifests"]
        assert manifest["annotations"]["io.containerd.image.name"] == name
        assert manifest["annotations"]["org.opencontainers.image.ref.name"] == name.rsplit(":", 1)[1]


def test_operator_runs_as_non_root_and_both_carry_oci_labels(images_built):
    assert _config(OPERATOR_IMAGE)["User"] == "65532:65532"
    for image in RUNTIME_IMAGES:
        labels = _config(image)["Labels"]
        assert labels["org.opencontainers.image.version"] == images.APP_VERSION
        assert re.fullmatch(r"[0-9a-f]{40}|unknown", labels["org.opencontainers.image.revision"])
        for key in ("source", "title", "description", "licenses"):
            assert labels[f"org.opencontainers.image.{key}"], key
    assert _config(AGENT_IMAGE)["Labels"]["org.opencontainers.image.title"] == "latencytrace-agent"


@pytest.mark.parametrize("image", RUNTIME_IMAGES)
def test_runtime_images_hold_no_build_tools_docs_or_package_lists(images_built, image):
    with images.mounted(image) as root:
        executables = {p.name for d in ("usr/bin", "usr/local/bin", "usr/sbin") for p in (root / d).iterdir()}
        assert (root / "usr/bin/python3").exists() and (root / "app/.venv/bin/python").exists()
        tools = {e for e in executables if re.fullmatch(r"uvx?|gcc.*|cc|c\+\+|g\+\+.*|clang.*|cc1|ld|as|llc.*", e)}
        assert not tools
        assert not list((root / "usr/lib").glob("gcc/x86_64-linux-gnu/*/cc1"))
        assert not [p for p in (root / "var/lib/apt/lists").iterdir() if p.name not in ("lock", "partial", "auxfiles")]
        docs = [p for d in ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale")
                for p in (root / d).rglob("*") if p.is_file() and p.name not in ("copyright", "locale.alias", "dir")]
        assert not docs, docs[:5]
        assert list((root / "usr/share/doc").rglob("copyright"))  # licences stay
        site = root / "app/.venv/lib/python3.11/site-packages"
        packages = {p.name for p in site.iterdir()}
        assert {"kubernetes", "pydantic", "latencytrace"} <= packages
        if image == OPERATOR_IMAGE:
            assert "kopf" in packages
            assert not packages & {"numpy", "bcc", "pyroute2", "opentelemetry", "rich", "grpc"}
        else:
            assert {"numpy", "bcc", "pyroute2", "opentelemetry"} <= packages
            assert list((root / "usr/src").glob("linux-headers-*-common/include/linux/kconfig.h"))
            assert not (root / "usr/sbin/bpftool").exists() and not (root / "usr/bin/ip").exists()


def test_operator_entrypoint_runs_as_its_user(images_built):
    # Every module of the operator imports (with only the operator's dependencies), then a bad setting
    # stops it with the variable named, as at any start.
    p = images.run_in(OPERATOR_IMAGE, "latencytrace-operator", user="65532:65532",
                      env={"LATENCYTRACE_OPERATOR_HEALTH_PORT": "0"})
    assert p.returncode == 1, p.stderr
    assert "latencytrace-operator: LATENCYTRACE_OPERATOR_HEALTH_PORT" in p.stderr


def test_agent_compiles_loads_and_attaches_its_probes_in_the_image(images_built):
    # BCC from the image (its LLVM and header tree), on this kernel, with the chart's capabilities:
    # trace a network namespace this test makes, for two seconds.
    p = images.run_in(AGENT_IMAGE, "python", "-c", "import bcc, latencytrace.node_agent.cli")
    assert p.returncode == 0, p.stderr
    holder = subprocess.Popen(["unshare", "--net", "sleep", "120"])
    try:
        time.sleep(0.3)
        inode = os.stat(f"/proc/{holder.pid}/ns/net").st_ino
        p = images.run_in(AGENT_IMAGE, "latencytrace-agent", "trace", "--pid", str(holder.pid), "--duration", "2",
                          "--format", "json", cap_add=AGENT_CAPS)
    finally:
        holder.kill()
        holder.wait()
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads(p.stdout)
    assert [t["netns_inode"] for t in report["targets"]] == [inode]
    assert report["probes"] and all("run_cnt" in v for v in report["probes"].values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def catches_sigterm(pid: int, timeout: float = 60) -> None:
    """Wait until process `pid` has a handler for SIGTERM (the SigCgt mask in its /proc status)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:") and int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)):
                return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} never installed a SIGTERM handler")


def test_pause_holds_until_sigterm_with_nothing_but_itself(images_built):
    with images.mounted(PAUSE_IMAGE) as root:
        assert sorted(p.name for p in root.iterdir() if p.name not in ("dev", "proc", "sys", "etc", "run")) == ["pause"]
        p = subprocess.Popen(["chroot", str(root), "/pause"])  # no libc in there: it must be static
        try:
            catches_sigterm(p.pid)  # then SIGTERM is its own to answer, however slowly it started
            assert p.poll() is None
            p.send_signal(signal.SIGTERM)
            assert p.wait(timeout=5) == 0
        finally:
            p.kill()
    assert _config(PAUSE_IMAGE)["Entrypoint"] == ["/pause"]


def test_workload_echoes_tcp_and_udp_and_reports_losses(images_built):
    port = _free_port()
    with images.mounted(WORKLOAD_IMAGE) as root:
        server = subprocess.Popen(["chroot", str(root), "/workload", "serve", "-listen", f"127.0.0.1:{port}"],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert "echo on tcp and udp" in server.stdout.readline()
            for proto in ("tcp", "udp"):
                c = subprocess.run(["chroot", str(root), "/workload", "client", "-to", f"127.0.0.1:{port}",
                                    "-proto", proto, "-n", "40", "-rate", "200"], capture_output=True, text=True,
                                   timeout=30)
                summary = json.loads(c.stdout)
                assert c.returncode == 0, c.stdout + c.stderr
                assert (summary["proto"], summary["sent"], summary["received"], summary["errors"]) == (proto, 40, 40, 0)
                assert 0 < summary["p50_us"] <= summary["p99_us"]
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=5)
        lost = subprocess.run(["chroot", str(root), "/workload", "client", "-to", f"127.0.0.1:{port}", "-n", "3"],
                              capture_output=True, text=True, timeout=30)
        assert lost.returncode == 1 and json.loads(lost.stdout)["received"] == 0


def test_second_build_with_no_change_rebuilds_and_exports_nothing(images_built):
    # Behaviour, not a wall-clock bound: the same images (ids) and the archives left untouched.
    before = {name: path.stat().st_mtime_ns for name, path in images_built.items()}
    ids = {name: images.image_id(name) for name in images_built}
    again = images.ensure_all()
    assert again == images_built
    assert {name: images.image_id(name) for name in again} == ids
    assert {name: Path(path).stat().st_mtime_ns for name, path in again.items()} == before


def test_no_working_containers_left_behind(images_built):
    listed = subprocess.run(["buildah", "containers", "--quiet"], capture_output=True, text=True, check=True)
    assert listed.stdout.strip() == ""
