"""The project's OCI images, built on this machine without a daemon or a registry.

`ensure_all()` builds what is missing and returns {image name: OCI archive}; each archive imports with
`ctr -n k8s.io images import --all-platforms ARCHIVE` under its full name. The images:

- the Dockerfile's `operator` and `agent` targets, named as the chart's defaults (values.yaml
  repositories, Chart.yaml appVersion), built by `buildah bud --isolation chroot --pull=never --layers`
  so that the Dockerfile stays what a docker user builds, and a build with no change is served from the
  layer cache in seconds;
- what the Dockerfile pulls, made here under the same names, because no registry is reachable: its base
  `debian:bookworm-slim` (mmdebstrap --variant=minbase from the machine's own apt sources, slimmed like
  Debian's container images: no docs, man pages or locales, no apt lists) and the `ghcr.io/astral-sh/uv`
  stage (/uv and /uvx from the uv wheel of the same version, read from the Dockerfile's tag);
- the kubelet's pod sandbox image `registry.k8s.io/pause:3.10` (a static program, tests/cluster/pause);
- the test workload `latencytrace-workload` (tests/cluster/workload: an echo server and a paced client,
  one static Go binary in a scratch image, built by buildah bud like the others). Its tag is a hash of
  its sources, so a changed workload gets a new name and `imagePullPolicy: IfNotPresent` sees it.

Why buildah: it builds Dockerfiles without a daemon, with chroot isolation (no user namespaces or
nested runtime needed) into the default containers storage (overlay). buildah 1.28 leaves working
containers and their mounts behind after `bud`, so every build ends with `buildah rm --all`: nothing
else on this machine keeps buildah working containers.

HTTPS to the package registries here is re-signed by a CA that only this machine's trust store holds, so
builds bind-mount the host's CA bundle over the image's (uv reads the system's certificates:
pyproject.toml's [tool.uv] system-certs). A bind mount is not committed and the Dockerfile needs none;
but a mount target that does not exist is created in the layer (buildah 1.28), so the base carries
ca-certificates already (the Dockerfile installs it anyway) and no step rewrites the bundle while it is
mounted. (A mounted uv.toml would leave an empty /etc/uv/uv.toml in every image for that reason.)

Archives are OCI image layouts in a tar (`buildah push IMG oci:DIR`, then the index is annotated with
`io.containerd.image.name`, which is how containerd's importer names an image: the OCI
`org.opencontainers.image.ref.name` alone holds only a tag). An archive is rewritten only when its
image's id changed. Everything is serialised by one flock, so concurrent callers build once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from . import versions

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DOCKERFILE = ROOT / "Dockerfile"
CHART = ROOT / "charts" / "latencytrace"
WORKLOAD_DIR = HERE / "workload"
PAUSE_SOURCE = HERE / "pause" / "pause.c"

# The kubelet's sandbox image (its default for Kubernetes 1.35); the node configures containerd with it.
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
# What the Dockerfile's `FROM debian:bookworm-slim` resolves to.
BASE_IMAGE = "docker.io/library/debian:bookworm-slim"
BASE_SUITE = "bookworm"
# Debian's container images keep these out of every package installed later, too (dpkg path filters
# stay in the image).
_SLIM_PATHS = ("path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright",
               "path-exclude=/usr/share/man/*", "path-exclude=/usr/share/groff/*",
               "path-exclude=/usr/share/info/*", "path-exclude=/usr/share/lintian/*",
               "path-exclude=/usr/share/linda/*", "path-exclude=/usr/share/locale/*",
               "path-include=/usr/share/locale/locale.alias")
BASE_PACKAGES = ("ca-certificates",)
_ANNOTATION_NAME = "io.containerd.image.name"
_ANNOTATION_REF = "org.opencontainers.image.ref.name"


class ImageError(RuntimeError):
    pass


def _dockerfile_uv_image() -> tuple[str, str]:
    """(image, version) of the Dockerfile's uv stage: its tag is the one place the uv version is kept."""
    m = re.search(r"^FROM\s+(ghcr\.io/astral-sh/uv:(\d+\.\d+\.\d+))\s+AS\s+uv\s*$", DOCKERFILE.read_text(), re.M)
    if not m:
        raise ImageError(f"{DOCKERFILE}: no `FROM ghcr.io/astral-sh/uv:X.Y.Z AS uv` line (pin a full version)")
    return m.group(1), m.group(2)


def _chart_images() -> dict[str, str]:
    """{"operator": name, "agent": name}: the chart's default images (repository:appVersion)."""
    values = (CHART / "values.yaml").read_text()
    app = re.search(r'^appVersion:\s*"?([^"\s]+)"?', (CHART / "Chart.yaml").read_text(), re.M)
    if not app:
        raise ImageError(f"{CHART / 'Chart.yaml'}: no appVersion")
    names = {}
    for target in ("operator", "agent"):
        section = re.search(rf"^{target}:\n((?:[ #].*\n|\n)*)", values, re.M)
        repo = section and re.search(r"^  image:\n(?:    .*\n)*?    repository:\s*(\S+)", section.group(1), re.M)
        if not repo:
            raise ImageError(f"{CHART / 'values.yaml'}: no {target}.image.repository")
        names[target] = f"{repo.group(1)}:{app.group(1)}"
    return names


def _tree_hash(*paths: Path) -> str:
    h = hashlib.sha256()
    for top in paths:
        for p in sorted(top.rglob("*") if top.is_dir() else [top]):
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc":
                h.update(str(p.relative_to(top.parent)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


UV_IMAGE, UV_VERSION = _dockerfile_uv_image()
_CHART_IMAGES = _chart_images()
OPERATOR_IMAGE = _CHART_IMAGES["operator"]
AGENT_IMAGE = _CHART_IMAGES["agent"]
APP_VERSION = OPERATOR_IMAGE.rsplit(":", 1)[1]
WORKLOAD_IMAGE = f"docker.io/library/latencytrace-workload:{_tree_hash(WORKLOAD_DIR)}"
# What ensure_all() builds and exports, in build order.
IMAGES = (PAUSE_IMAGE, WORKLOAD_IMAGE, OPERATOR_IMAGE, AGENT_IMAGE)


def images_dir() -> Path:
    return versions.cache_dir() / "images"


def archive_path(image: str) -> Path:
    return images_dir() / (re.sub(r"[^A-Za-z0-9._-]+", "_", image) + ".oci.tar")


def say(msg: str) -> None:
    print(f"[images] {msg}", file=sys.stderr, flush=True)


def _run(cmd: Sequence[str | os.PathLike], **kw) -> str:
    """Runs a short command; its output is returned, or shown in the error."""
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise ImageError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout[-3000:]}{p.stderr[-3000:]}")
    return p.stdout


def _run_logged(label: str, cmd: Sequence[str | os.PathLike], show: str = r"^(\[\d+/\d+\] )?STEP \d+/\d+|^I: ") -> None:
    """Runs a long command, its output in a log file; lines matching `show` and a line every 30 s of
    silence are progress; the log's tail is in the error if it fails."""
    log = images_dir() / "logs" / f"{label}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    shown = re.compile(show)
    with log.open("w") as out, subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT, text=True, bufsize=1) as p:
        assert p.stdout is not None
        last = started
        while True:
            ready, _, _ = select.select([p.stdout], [], [], 5)
            now = time.monotonic()
            if ready:
                line = p.stdout.readline()
                if not line:
                    break
                out.write(line)
                if shown.search(line):
                    say(f"  {label}: {line.rstrip()[:150]}")
                    last = now
            if now - last >= 30:
                say(f"  {label}: still running, {now - started:.0f}s elapsed (log: {log})")
                last = now
        rc = p.wait()
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise ImageError(f"{label} failed ({rc}); last lines of {log}:\n{tail}")
    say(f"  {label}: done in {time.monotonic() - started:.0f}s")


# --- buildah ---------------------------------------------------------------------------------------

def image_id(image: str) -> str | None:
    p = subprocess.run(["buildah", "inspect", "--type", "image", "--format", "{{.FromImageID}}", image],
                       capture_output=True, text=True)
    return (p.stdout.strip() or None) if p.returncode == 0 else None


def _remove_working_containers() -> None:
    # buildah 1.28 leaves `bud`'s working containers (and their overlay mounts) behind.
    _run(["buildah", "rm", "--all"])


@contextmanager
def _working_container(image: str = "scratch") -> Iterator[str]:
    ctr = _run(["buildah", "from", "--quiet", "--pull=never", image]).strip()
    try:
        yield ctr
    finally:
        subprocess.run(["buildah", "rm", ctr], capture_output=True)


@contextmanager
def mounted(image: str) -> Iterator[Path]:
    """The root filesystem of `image`, mounted read-write in a throwaway working container (under the
    build lock: a build ends with `buildah rm --all`)."""
    with _lock(), _working_container(image) as ctr:
        root = Path(_run(["buildah", "mount", ctr]).strip())
        try:
            yield root
        finally:
            subprocess.run(["buildah", "umount", ctr], capture_output=True)


def run_in(image: str, *cmd: str, user: str | None = None, env: dict[str, str] | None = None,
           cap_add: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """Runs `cmd` in a throwaway container of `image` (chroot isolation, the host's network and PID
    namespaces, buildah's default capabilities plus `cap_add`), output captured; under the build lock."""
    with _lock(), _working_container(image) as ctr:
        args = ["buildah", "run", "--isolation", "chroot"]
        if user:
            args += ["--user", user]
        for key, value in (env or {}).items():
            args += ["--env", f"{key}={value}"]
        if cap_add:  # (buildah 1.28 ignores --cap-add after --cap-drop ALL, so no drop here)
            args += ["--cap-add", ",".join(cap_add)]
        return subprocess.run([*args, ctr, "--", *cmd], capture_output=True, text=True)


def _key_file(image: str) -> Path:
    return images_dir() / "keys" / re.sub(r"[^A-Za-z0-9._-]+", "_", image)


def _fresh(image: str, key: str) -> bool:
    """Whether `image` is in storage and was built from `key`."""
    f = _key_file(image)
    return image_id(image) is not None and f.exists() and f.read_text() == key


def _record(image: str, key: str) -> None:
    f = _key_file(image)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(key)


def _commit_from_scratch(image: str, files: dict[str, Path], config: Sequence[str]) -> None:
    """An image of a few files (path in image -> file here) on an empty root, with `buildah config` args."""
    with _working_container() as ctr:
        for dest, src in files.items():
            _run(["buildah", "copy", "--chmod", "0755", ctr, src, dest])
        _run(["buildah", "config", *config, ctr])
        _run(["buildah", "commit", "--quiet", ctr, image])


# --- the base: Debian bookworm, minbase, slimmed ---------------------------------------------------

def _apt_sources(suite: str = BASE_SUITE) -> list[str]:
    """One-line apt sources for `suite` (and its -updates/-security) from this machine's configuration,
    so the base comes from the mirror this machine uses."""
    lines: list[str] = []
    etc = Path("/etc/apt")
    files = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list")),
             *sorted((etc / "sources.list.d").glob("*.sources"))]
    for f in files:
        if not f.is_file():
            continue
        text = f.read_text()
        if f.suffix == ".sources":  # deb822 stanzas
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
                if "deb" not in fields.get("Types", "").split() or fields.get("Enabled", "yes") == "no":
                    continue
                for uri in fields.get("URIs", "").split():
                    for s in fields.get("Suites", "").split():
                        lines.append(f"deb {uri} {s} {fields.get('Components', 'main')}")
        else:
            lines += [ln.split("#", 1)[0].strip() for ln in text.splitlines()
                      if ln.strip().startswith("deb ")]
    ours = [ln for ln in lines if re.search(rf"\s{suite}(-updates|-security)?\s", ln) and "[" not in ln]
    if not any(re.search(rf"\s{suite}\s", ln) for ln in ours):
        raise ImageError(f"no apt source for Debian {suite} in /etc/apt/sources.list*: mmdebstrap needs one")
    return ours


def _mmdebstrap_args(sources: list[str]) -> list[str]:
    args = ["mmdebstrap", "--variant=minbase", "--mode=root", "--format=tar",
            f"--include={','.join(BASE_PACKAGES)}",
            '--aptopt=Acquire::Languages "none"', '--aptopt=APT::Install-Recommends "false"',
            # merged /usr by symlinks, as Debian's images have it, rather than the usrmerge package,
            # which would bring perl along.
            "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr"]
    args += [f"--dpkgopt={opt}" for opt in _SLIM_PATHS]
    # No apt lists, caches or logs in the image (mmdebstrap removes lists and caches by itself).
    args += ["--customize-hook=rm -rf \"$1\"/var/log/apt/* \"$1\"/var/log/dpkg.log \"$1\"/var/log/alternatives.log "
             "\"$1\"/var/cache/ldconfig/aux-cache \"$1\"/var/lib/apt/lists/*"]
    return [*args, BASE_SUITE]


def ensure_base() -> None:
    sources = _apt_sources()
    key = json.dumps([_mmdebstrap_args(sources), sources])
    if _fresh(BASE_IMAGE, key):
        return
    say(f"base {BASE_IMAGE}: mmdebstrap --variant=minbase {BASE_SUITE} (first build: a few minutes)")
    with tempfile.TemporaryDirectory(prefix="latencytrace-base.", dir=images_dir()) as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        _run_logged("base", [*_mmdebstrap_args(sources), rootfs, *sources])
        _commit_from_scratch_tar(BASE_IMAGE, rootfs)
    _record(BASE_IMAGE, key)


def _commit_from_scratch_tar(image: str, rootfs: Path) -> None:
    with _working_container() as ctr:
        _run(["buildah", "add", ctr, rootfs, "/"])  # a local tar is unpacked
        _run(["buildah", "config", "--os", "linux", "--arch", "amd64", "--cmd", "bash",
              "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", ctr])
        _run(["buildah", "commit", "--quiet", ctr, image])


# --- the uv stage ----------------------------------------------------------------------------------

def _uv_wheel() -> Path:
    dest = images_dir() / "downloads" / f"uv-{UV_VERSION}"
    found = sorted(dest.glob("uv-*.whl"))
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    pip = [shutil.which("pip3") or shutil.which("pip") or "pip3"]
    say(f"uv {UV_VERSION}: downloading its wheel")
    _run([*pip, "download", "--quiet", "--no-deps", "--only-binary=:all:", "--platform", "manylinux_2_17_x86_64",
          "--python-version", "3.11", "--dest", dest, f"uv=={UV_VERSION}"])
    found = sorted(dest.glob("uv-*.whl"))
    if not found:
        raise ImageError(f"pip download uv=={UV_VERSION} saved no wheel in {dest}")
    return found[0]


def ensure_uv() -> None:
    key = f"uv-wheel {UV_VERSION}"
    if _fresh(UV_IMAGE, key):
        return
    wheel = _uv_wheel()
    with tempfile.TemporaryDirectory(prefix="latencytrace-uv.", dir=images_dir()) as tmp:
        files = {}
        with zipfile.ZipFile(wheel) as z:
            for name in ("uv", "uvx"):
                member = f"uv-{UV_VERSION}.data/scripts/{name}"
                (Path(tmp) / name).write_bytes(z.read(member))
                files[f"/{name}"] = Path(tmp) / name
        _commit_from_scratch(UV_IMAGE, files, ["--os", "linux", "--arch", "amd64", "--entrypoint", '["/uv"]'])
    _record(UV_IMAGE, key)
    say(f"uv stage {UV_IMAGE}: from the uv {UV_VERSION} wheel")


# --- pause and workload binaries -------------------------------------------------------------------

def ensure_pause() -> None:
    key = _tree_hash(PAUSE_SOURCE)
    if _fresh(PAUSE_IMAGE, key):
        return
    with tempfile.TemporaryDirectory(prefix="latencytrace-pause.", dir=images_dir()) as tmp:
        binary = Path(tmp) / "pause"
        _run(["gcc", "-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror", "-o", binary, PAUSE_SOURCE])
        _commit_from_scratch(PAUSE_IMAGE, {"/pause": binary},
                             ["--os", "linux", "--arch", "amd64", "--user", "65535:65535",
                              "--entrypoint", '["/pause"]'])
    _record(PAUSE_IMAGE, key)
    say(f"pause {PAUSE_IMAGE}: built")


def _workload_binary() -> Path:
    out = images_dir() / "build" / f"workload-{WORKLOAD_IMAGE.rsplit(':', 1)[1]}"
    if (out / "workload").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cache = versions.cache_dir()
    env = {**os.environ, "CGO_ENABLED": "0", "GOTOOLCHAIN": os.environ.get("GOTOOLCHAIN", "local"),
           "GOCACHE": str(cache / "gocache"), "GOPATH": str(cache / "gopath"), "GOMODCACHE": str(cache / "gomod"),
           "GOFLAGS": "-mod=mod"}
    _run(["go", "build", "-trimpath", "-ldflags=-s -w", "-o", out / "workload.tmp", "."], cwd=WORKLOAD_DIR, env=env)
    (out / "workload.tmp").rename(out / "workload")
    return out


def ensure_workload() -> None:
    context = _workload_binary()
    _bud("workload", WORKLOAD_IMAGE, WORKLOAD_DIR / "Containerfile", context, inputs=[context / "workload"])


# --- the Dockerfile's targets ----------------------------------------------------------------------

def _build_volumes() -> list[str]:
    """Bind mounts for every RUN: the host's CA bundle over the image's (uv uses the system's
    certificates: pyproject.toml's [tool.uv] system-certs)."""
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    return ["--volume", f"{bundle}:{bundle}:ro"]


def _revision() -> str:
    p = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return p.stdout.strip() if p.returncode == 0 else "unknown"


def _bud(label: str, image: str, containerfile: Path, context: Path, *extra: str, inputs: Sequence[Path]) -> None:
    """buildah bud, skipped when the image exists and nothing it is built from changed: the files
    `inputs`, the arguments, and the ids of the images it starts from (buildah's own layer cache would
    also find every step, but it hashes each COPY's sources on the way: about 20 s for the agent)."""
    key = json.dumps([_tree_hash(containerfile, *inputs), [str(a) for a in extra],
                      [image_id(i) for i in (BASE_IMAGE, UV_IMAGE) if containerfile == DOCKERFILE]])
    if _fresh(image, key):
        return
    before = image_id(image)
    say(f"{label}: buildah bud -> {image}")
    try:
        _run_logged(label, ["buildah", "bud", "--isolation", "chroot", "--pull=never", "--layers",
                            "--network", "host", "-f", containerfile, "-t", image, *extra, context])
    finally:
        _remove_working_containers()
    after = image_id(image)
    if after is None:
        raise ImageError(f"buildah bud reported success but {image} is not in storage")
    _record(image, key)
    say(f"{label}: {'unchanged' if after == before else 'new image'} {after[:12]}")


def _context_paths() -> list[Path]:
    """What the Dockerfile's build context holds: the paths .dockerignore lets in (the one list)."""
    ignore = ROOT / ".dockerignore"
    lines = [ln.strip() for ln in ignore.read_text().splitlines()]
    return [ignore, *(ROOT / ln[1:].rstrip("/") for ln in lines if ln.startswith("!"))]


def ensure_targets() -> None:
    ensure_base()
    ensure_uv()
    args = ["--build-arg", f"VERSION={APP_VERSION}", "--build-arg", f"REVISION={_revision()}",
            *_build_volumes()]
    for target, image in (("operator", OPERATOR_IMAGE), ("agent", AGENT_IMAGE)):
        _bud(target, image, DOCKERFILE, ROOT, "--target", target, *args, inputs=_context_paths())


# --- export ----------------------------------------------------------------------------------------

def export(image: str) -> Path:
    """The image as an OCI archive that containerd imports under its full name; rewritten only when
    the image's id changed since the last export."""
    iid = image_id(image)
    if iid is None:
        raise ImageError(f"{image} is not in buildah's storage")
    archive = archive_path(image)
    stamp = archive.with_suffix(".id")
    if archive.exists() and stamp.exists() and stamp.read_text() == iid:
        return archive
    with tempfile.TemporaryDirectory(prefix="latencytrace-export.", dir=images_dir()) as tmp:
        layout = Path(tmp) / "layout"
        _run(["buildah", "push", "--quiet", image, f"oci:{layout}:{image}"])
        index = json.loads((layout / "index.json").read_text())
        if len(index.get("manifests", ())) != 1:
            raise ImageError(f"oci layout of {image}: expected one manifest, found {index.get('manifests')}")
        annotations = index["manifests"][0].setdefault("annotations", {})
        annotations[_ANNOTATION_NAME] = image
        annotations[_ANNOTATION_REF] = image.rsplit(":", 1)[1]  # OCI: the ref name is the tag
        (layout / "index.json").write_text(json.dumps(index))
        partial = archive.with_suffix(".tmp")
        with tarfile.open(partial, "w") as tar:
            for p in sorted(layout.rglob("*")):
                tar.add(p, arcname=str(p.relative_to(layout)), recursive=False)
        partial.rename(archive)
    stamp.write_text(iid)
    say(f"exported {image} -> {archive} ({archive.stat().st_size / 1e6:.0f} MB)")
    return archive


# --- the public entry --------------------------------------------------------------------------------

@contextmanager
def _lock() -> Iterator[None]:
    images_dir().mkdir(parents=True, exist_ok=True)
    with open(images_dir() / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def ensure_all() -> dict[str, Path]:
    """Builds whatever image is missing or out of date and returns {image name: OCI archive} for the
    pause, workload, operator and agent images. Safe to call concurrently (one flock); a call with
    nothing changed takes seconds."""
    for tool in ("buildah", "mmdebstrap", "gcc", "go"):
        if shutil.which(tool) is None:
            raise ImageError(f"{tool} is not installed: run .ci/images (it installs what the images need)")
    with _lock():
        started = time.monotonic()
        ensure_pause()
        ensure_workload()
        ensure_targets()
        archives = {image: export(image) for image in IMAGES}
        say(f"images ready in {time.monotonic() - started:.0f}s")
        return archives


def sizes() -> dict[str, int]:
    """{image name: bytes unpacked}, as `buildah images` reports them (decimal units)."""
    units = {"B": 1, "KB": 1e3, "kB": 1e3, "MB": 1e6, "GB": 1e9}
    out = {}
    for entry in json.loads(_run(["buildah", "images", "--json"]) or "[]"):
        number, _, unit = str(entry.get("size", "0 B")).partition(" ")
        for name in entry.get("names") or ():
            out[name] = int(float(number) * units.get(unit, 1))
    return out


def main() -> int:
    try:
        archives = ensure_all()
    except ImageError as e:
        print(f"images: {e}", file=sys.stderr)
        return 1
    unpacked = sizes()
    for image, archive in archives.items():
        print(f"{image}\n  archive {archive} ({archive.stat().st_size / 1e6:.0f} MB), "
              f"unpacked {unpacked.get(image, 0) / 1e6:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
