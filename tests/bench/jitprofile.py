"""Where inside the BPF programs the time goes, instruction by instruction, while a command runs.

The kernel's BPF statistics (the cost part) say how long each program runs, not which of its loads
waits. This samples every CPU with perf's `cpu-clock` event while COMMAND runs, keeps the JIT image of
every program loaded meanwhile whose name starts with the prefix, and prints for each program its
hottest offsets with the x86 code before them. A tracepoint program runs with interrupts on, so the
sampling timer lands inside it; the sample names the instruction *after* the one that stalled (a
load that missed the cache shows as the instruction that uses its value).

Written here rather than taken from perf or bpftool: this VM has no hardware counters (only the
timer event samples), Debian's perf is linked without libopcodes (`perf annotate` refuses BPF
programs) and its bpftool without a disassembler (`bpftool prog dump jited` refuses too). So the
images are read with bpf(BPF_OBJ_GET_INFO_BY_FD) while their programs are loaded (a poll every
0.2 s: a program loaded for less than that may be missed) and disassembled with binutils' objdump.
A program's tag is the hash of its instructions, so a program loaded again with the same code and
sizes has the same tag and the same image (map addresses aside).

    python -m tests.bench.jitprofile [--top N] [--prefix lt_] -- COMMAND [ARG...]
e.g. `python -m tests.bench.jitprofile -- .ci/bench --only cost --out /tmp/cost`.
"""

from __future__ import annotations

import argparse
import collections
import ctypes as ct
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from latencytrace.node_agent.kernel import bpfsys
from latencytrace.node_agent.kernel.btf import KernelBTF

from . import bpfprogs

BPF_PROG_GET_FD_BY_ID = 13
SAMPLE = re.compile(r"^\s*[0-9a-f]+\s+bpf_prog_([0-9a-f]{16})_(\w+)\+0x([0-9a-f]+)", re.M)


@dataclass
class Image:
    name: str
    tag: str
    code: bytes
    samples: collections.Counter = field(default_factory=collections.Counter)


class ImageReader:
    """JIT images of loaded programs, by id (bpf_prog_info's layout from BTF, as bpfsys reads it)."""

    def __init__(self) -> None:
        btf = KernelBTF.load()
        self._size = btf.struct_size("bpf_prog_info")
        self._off_len = btf.offset("bpf_prog_info", "jited_prog_len")
        self._off_insns = btf.offset("bpf_prog_info", "jited_prog_insns")

    def _info(self, fd: int, code: ct.Array | None) -> ct.Array:
        info = (ct.c_uint8 * self._size)()
        if code is not None:
            ct.c_uint32.from_buffer(info, self._off_len).value = len(code)
            ct.c_uint64.from_buffer(info, self._off_insns).value = ct.addressof(code)
        bpfsys.obj_info(fd, info)
        return info

    def read(self, prog_id: int) -> bytes:
        attr = (ct.c_uint8 * 16)()
        ct.c_uint32.from_buffer(attr, 0).value = prog_id
        fd = bpfsys._bpf(BPF_PROG_GET_FD_BY_ID, attr)
        try:
            n = ct.c_uint32.from_buffer(self._info(fd, None), self._off_len).value
            code = (ct.c_uint8 * n)()
            self._info(fd, code)
            return bytes(code)
        finally:
            os.close(fd)


class Collector(threading.Thread):
    """Polls the loaded programs and keeps the image of each new tag whose name has the prefix."""

    def __init__(self, prefix: str, period_s: float = 0.2):
        super().__init__(daemon=True)
        self.prefix, self.period_s = prefix, period_s
        self.images: dict[str, Image] = {}
        self.stopping = threading.Event()
        self._reader = ImageReader()

    def poll(self) -> None:
        for p in bpfprogs.all_programs():
            tag, name = p.get("tag", ""), p.get("name", "")
            if tag in self.images or not name.startswith(self.prefix):
                continue
            try:
                self.images[tag] = Image(name, tag, self._reader.read(p["id"]))
            except OSError:
                pass  # unloaded meanwhile

    def run(self) -> None:
        while not self.stopping.wait(self.period_s):
            self.poll()


def count_samples(data: Path, images: dict[str, Image]) -> int:
    """Charge perf's samples to the images' offsets; the number of samples in no image."""
    out = subprocess.run(["perf", "script", "-i", str(data), "-F", "ip,sym,symoff"], capture_output=True,
                         text=True, check=True).stdout
    total = out.count("\n")
    for tag, _name, off in SAMPLE.findall(out):
        if tag in images:
            images[tag].samples[int(off, 16)] += 1
    return total - sum(sum(i.samples.values()) for i in images.values())


def disassemble(code: bytes) -> list[tuple[int, str]]:
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(code)
        f.flush()
        out = subprocess.run(["objdump", "-D", "-b", "binary", "-mi386:x86-64", f.name], capture_output=True,
                             text=True, check=True).stdout
    return [(int(m.group(1), 16), m.group(2).strip()) for m in re.finditer(r"^\s*([0-9a-f]+):\t(?:[0-9a-f ]+\t)?(.*)$",
                                                                        out, re.M)]


def report(images: dict[str, Image], other: int, top: int, context: int) -> str:
    inside = sum(sum(i.samples.values()) for i in images.values())
    lines = [f"{inside} samples inside the programs, {other} elsewhere (idle included)"]
    for img in sorted(images.values(), key=lambda i: -sum(i.samples.values())):
        n = sum(img.samples.values())
        if not n:
            continue
        lines.append(f"\n== {img.name} (tag {img.tag}, {len(img.code)} bytes of x86): {n} samples")
        insns = disassemble(img.code)
        index = {off: k for k, (off, _) in enumerate(insns)}
        for off, c in img.samples.most_common(top):
            lines.append(f"  +{off:#x}: {c} samples ({100 * c / n:.0f}%)")
            k = index.get(off)
            if k is None:
                continue
            for o, text in insns[max(0, k - context):k + 1]:
                lines.append(f"      {o:6x}  {'>' if o == off else ' '} {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.jitprofile", description=__doc__.split("\n\n")[0])
    p.add_argument("--prefix", default="lt_", help="profile programs whose name starts with this")
    p.add_argument("--top", type=int, default=6, help="offsets shown per program")
    p.add_argument("--context", type=int, default=6, help="instructions shown before each offset")
    p.add_argument("--hz", type=int, default=10000, help="samples per second per CPU")
    p.add_argument("command", nargs="+")
    args = p.parse_args(argv)
    for tool in ("perf", "objdump", "bpftool"):
        if not shutil.which(tool):
            p.error(f"{tool} is not installed")
    collector = Collector(args.prefix)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "perf.data"
        perf = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", str(args.hz), "-a",
                                 "-o", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        collector.start()
        try:
            rc = subprocess.call(args.command)
        finally:
            collector.stopping.set()
            collector.join()
            perf.send_signal(signal.SIGINT)
            perf.wait(timeout=120)
        other = count_samples(data, collector.images)
    print(report(collector.images, other, args.top, args.context))
    return rc


if __name__ == "__main__":
    sys.exit(main())
