"""The Dockerfile cannot be built here (no container engine); check what can be checked without one."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEXT = (ROOT / "Dockerfile").read_text()


def test_two_targets_on_debian_bookworm():
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", TEXT, re.M)
    names = {name for _, name in stages}
    assert {"operator", "agent"} <= names
    assert any(image.startswith("debian:bookworm") for image, _ in stages)


def test_copied_paths_exist():
    for src in re.findall(r"^COPY\s+(?!--from)(.+?)\s+\S+$", TEXT, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), path


def test_entrypoints_are_the_console_scripts():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for script in re.findall(r'^ENTRYPOINT \["([^"]+)"', TEXT, re.M):
        assert script in scripts


def test_agent_gets_bcc_headers_and_tools_and_operator_is_not_root():
    agent = TEXT.split("AS agent", 1)[1]
    for package in ("python3-bpfcc", "bpftool", "linux-headers-amd64", "iproute2"):
        assert package in agent
    operator = TEXT.split("AS operator", 1)[1].split("FROM", 1)[0]
    assert re.search(r"^USER\s+[1-9]\d*", operator, re.M)
