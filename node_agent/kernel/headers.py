"""Make sure BCC can compile: it needs a kernel header tree, though our probes include no kernel header.

BCC runs clang inside /lib/modules/$(uname -r)/build and pulls in a few generic headers from there.
Our programs read kernel structs only at BTF-derived offsets, so any header tree that compiles will do,
including one from another kernel version (Debian's linux-headers-amd64 on a newer kernel, say). When
the running kernel's tree is missing we link a distribution tree in its place.
"""

from __future__ import annotations

import os
from pathlib import Path

MODULES = Path("/lib/modules")


class HeadersError(RuntimeError):
    pass


def _candidates(src: Path = Path("/usr/src")) -> list[tuple[Path, Path]]:
    """(build, source) pairs of installed Debian-style header trees, newest first."""
    pairs = []
    for build in sorted(src.glob("linux-headers-*"), reverse=True):
        if build.name.endswith("-common") or not (build / "Makefile").exists():
            continue
        common = build.with_name(build.name.rsplit("-", 1)[0] + "-common")
        if (build / "include/linux/kconfig.h").exists():
            pairs.append((build, build))
        elif (common / "include/linux/kconfig.h").exists():
            pairs.append((build, common))
    return pairs


def ensure(release: str | None = None) -> Path:
    """Return the build directory BCC will use, linking one in if the running kernel has none."""
    release = release or os.uname().release
    kdir = MODULES / release
    build, source = kdir / "build", kdir / "source"
    if (build / "include/linux/kconfig.h").exists() or (source / "include/linux/kconfig.h").exists():
        return build
    found = _candidates()
    if not found:
        raise HeadersError(
            f"no kernel headers for BCC: {build} is missing and no /usr/src/linux-headers-* tree exists; "
            "install any kernel header package (Debian: apt install linux-headers-amd64)")
    tree_build, tree_source = found[0]
    kdir.mkdir(parents=True, exist_ok=True)
    for link, target in ((build, tree_build), (source, tree_source)):
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    return build
