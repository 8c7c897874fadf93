"""Give back what compiling the probes cost, once they are loaded.

BCC compiles with clang and LLVM inside the agent's process: their heap and the pages of their ~160 MB
of code stay resident afterwards, although nothing runs them again (maps, ring buffers and program
loads are libbcc/libbpf code). We return the heap to the system and drop those code pages: code is
never written, so should anything run it again the kernel simply reads it back in from the file.
"""

from __future__ import annotations

import ctypes
import logging
import re

log = logging.getLogger(__name__)

MADV_DONTNEED = 4
_COMPILER = re.compile(r"/lib(LLVM|clang)[^/]*\.so")
_MAPS = re.compile(r"([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s+(\S*)")


def release_compiler(bpf) -> int:
    """Free BCC's compiler memory; returns the bytes of compiler code mappings dropped."""
    bpf.free_bcc_memory()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.malloc_trim(0)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    dropped = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            m = _MAPS.match(line)
            # Only code (r-x): a read-only data mapping may be relocated data (RELRO), whose dirty private
            # pages would come back from the file unrelocated.
            if m and m[3].startswith("r-x") and _COMPILER.search(m[4]):
                lo, hi = int(m[1], 16), int(m[2], 16)
                if libc.madvise(lo, hi - lo, MADV_DONTNEED) == 0:
                    dropped += hi - lo
    log.debug("released %d MiB of compiler code pages", dropped >> 20)
    return dropped
