"""The few bpf(2) commands the agent makes itself: run-time statistics and batched reads of per-CPU arrays.

BPF_ENABLE_STATS is preferred to the kernel.bpf_stats_enabled sysctl because it is scoped to our file
descriptor: statistics switch off again when the agent exits, whatever way it exits. The layout of
bpf_prog_info is taken from BTF like every other kernel struct we read.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .btf import KernelBTF
from .progload import LIBC as _libc, NR_BPF as _NR_BPF
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0


def _bpf(cmd: int, attr: ct.Array) -> int:
    ret = _libc.syscall(_NR_BPF, cmd, ct.byref(attr), ct.sizeof(attr))
    if ret < 0:
        err = ct.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return ret


def obj_info(fd: int, info: ct.Array) -> None:
    """Fill `info` (a bpf_*_info buffer, its fields set where the kernel is to copy more) for object `fd`."""
    attr = (ct.c_uint8 * 16)()
    ct.c_uint32.from_buffer(attr, 0).value = fd
    ct.c_uint32.from_buffer(attr, 4).value = len(info)
    ct.c_uint64.from_buffer(attr, 8).value = ct.addressof(info)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)


def enable_stats() -> int:
    """Turn on run-time statistics for as long as the returned fd stays open."""
    attr = (ct.c_uint8 * 16)()
    ct.c_uint32.from_buffer(attr, 0).value = BPF_STATS_RUN_TIME
    return _bpf(BPF_ENABLE_STATS, attr)


def prog_id(fd: int) -> int:
    m = re.search(r"^prog_id:\s+(\d+)", Path(f"/proc/self/fdinfo/{fd}").read_text(), re.M)
    return int(m.group(1)) if m else 0


@dataclass(frozen=True)
class ProgStats:
    run_cnt: int = 0
    run_time_ns: int = 0

    def __sub__(self, other: ProgStats) -> ProgStats:
        return ProgStats(self.run_cnt - other.run_cnt, self.run_time_ns - other.run_time_ns)

    def __add__(self, other: ProgStats) -> ProgStats:
        return ProgStats(self.run_cnt + other.run_cnt, self.run_time_ns + other.run_time_ns)

    @property
    def avg_ns(self) -> float | None:
        return self.run_time_ns / self.run_cnt if self.run_cnt else None


class ProgInfoReader:
    def __init__(self, btf: KernelBTF):
        self._size = btf.struct_size("bpf_prog_info")
        self._off_cnt = btf.offset("bpf_prog_info", "run_cnt")
        self._off_time = btf.offset("bpf_prog_info", "run_time_ns")

    def read(self, fd: int) -> ProgStats:
        buf = (ct.c_uint8 * self._size)()
        obj_info(fd, buf)
        return ProgStats(ct.c_uint64.from_buffer(buf, self._off_cnt).value,
                         ct.c_uint64.from_buffer(buf, self._off_time).value)


def possible_cpus() -> int:
    """Number of possible CPUs, the stride of per-CPU map values."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


def read_percpu_array(lib, fd: int, start: int, count: int, value_size: int, ncpu: int) -> np.ndarray:
    """Entries start..start+count-1 of a per-CPU array as a (count, ncpu, value_size/8) uint64 array.

    One BPF_MAP_LOOKUP_BATCH call per chunk instead of one syscall per key and CPU. For arrays the batch
    token is the previous key, so a range starts after key start-1. `lib` provides bpf_lookup_batch()
    with libbcc's signature (libbpf.BATCH in the agent).
    """
    stride = (value_size + 7) // 8 * 8
    values = np.zeros(count * ncpu * stride // 8, dtype=np.uint64)
    keys = np.zeros(count, dtype=np.uint32)
    done = 0
    in_batch = ct.c_uint32(start - 1)
    out_batch = ct.c_uint32(0)
    first = start == 0
    while done < count:
        n = ct.c_uint32(count - done)
        ret = lib.bpf_lookup_batch(
            fd, None if first else ct.byref(in_batch), ct.byref(out_batch),
            keys[done:].ctypes.data, values[done * ncpu * stride // 8:].ctypes.data, ct.byref(n))
        got = n.value
        err = ct.get_errno() if ret < 0 else 0
        if ret < 0 and err != errno.ENOENT and abs(ret) != errno.ENOENT:
            raise OSError(err or -ret, f"BPF_MAP_LOOKUP_BATCH: {os.strerror(err or -ret)}")
        done += got
        if got == 0 or ret < 0:
            break
        first = False
        in_batch = ct.c_uint32(out_batch.value)
    return values.reshape(count, ncpu, stride // 8)
