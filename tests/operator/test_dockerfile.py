"""What can be checked in the Dockerfile's text; tests/cluster/test_images.py builds it and checks the
images themselves."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEXT = (ROOT / "Dockerfile").read_text()
STAGES = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", TEXT, re.M)


def stage(name: str) -> str:
    """The text of one stage, from its FROM line to the next."""
    m = re.search(rf"^FROM\s+\S+\s+AS\s+{name}\n(.*?)(?=^FROM\s|\Z)", TEXT, re.M | re.S)
    assert m, f"no stage {name}"
    return m.group(1)


def test_two_targets_on_debian_bookworm():
    names = {name for _, name in STAGES}
    assert {"operator", "agent"} <= names
    assert any(image.startswith("debian:bookworm") for image, _ in STAGES)


def test_copied_paths_exist_and_are_in_the_build_context():
    copies = re.findall(r"^COPY\s+(?!--from)(.+?)\s+\S+$", TEXT, re.M)
    assert copies
    allowed = {ln[1:].rstrip("/") for ln in (ROOT / ".dockerignore").read_text().split() if ln.startswith("!")}
    for src in copies:
        for path in src.split():
            assert (ROOT / path).exists(), path
            assert path.rstrip("/") in allowed, f"{path} is left out of the build context by .dockerignore"


def test_entrypoints_are_the_console_scripts():
    """Each console script is an image's entrypoint or the command of one of the chart's containers
    (the uninstall hook runs in the operator's image), and each of those is a console script."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoints = re.findall(r'^ENTRYPOINT \["([^"]+)"', TEXT, re.M)
    commands = [c for t in sorted((ROOT / "charts" / "latencytrace" / "templates").glob("*.yaml"))
                for c in re.findall(r"^\s*command: \[([\w-]+)\]", t.read_text(), re.M)]
    assert entrypoints and commands == ["latencytrace-uninstall"]
    assert sorted(entrypoints + commands) == sorted(scripts.keys())


def test_each_runtime_image_gets_only_its_components_extra():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"operator", "agent"} <= extras.keys()
    for target in ("operator", "agent"):
        syncs = re.findall(r"uv sync [^\n]*", stage(f"{target}-venv"))
        assert len(syncs) == 2
        assert all(f"--extra {target}" in s and "--frozen" in s and "--no-dev" in s for s in syncs)
        runtime = stage(target)
        assert f"COPY --from={target}-venv /app/.venv /app/.venv" in runtime
        assert "uv" not in re.findall(r"COPY --from=(\S+)", runtime)


def test_agent_gets_bcc_and_a_header_tree_and_the_operator_is_not_root():
    agent = stage("agent")
    assert "python3-bpfcc" in agent
    assert "COPY --from=headers /headers/usr/src/ /usr/src/" in agent
    assert "linux-headers-amd64" in stage("headers")
    assert re.search(r"^USER\s+[1-9]\d*", stage("operator"), re.M)


def test_oci_labels_in_both_runtime_images():
    for target in ("operator", "agent"):
        labels = set(re.findall(r"org\.opencontainers\.image\.(\w+)=", stage(target)))
        assert {"source", "version", "revision", "title", "description", "licenses"} <= labels
