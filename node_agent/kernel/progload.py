"""Load a compiled program as a BTF-typed tracepoint program (the kernel's tp_btf), with bpf(2) itself.

Why typed tracepoints: a raw tracepoint program reaches kernel memory only through the
bpf_probe_read_kernel() helper, about 30 ns a call measured here, and the probes read an skb, its
device and its namespace on every packet of the node. A program loaded as BPF_PROG_TYPE_TRACING with
expected_attach_type BPF_TRACE_RAW_TP and the tracepoint's `btf_trace_<name>` type attaches to the same
tracepoint (no trampoline: it works where fentry does not, as on this project's test machines) and sees
its arguments as typed kernel pointers, so the same reads are plain loads that the JIT guards against
faults, a few ns each (netif_receive_skb reading skb->dev->ifindex: 201 -> 99 ns per run with run-time
statistics on, same run). The verifier checks every such load against BTF, so a struct that changed
shape makes the program fail to load (reported, the other probes go on) rather than misread.

Why not BCC's loader: BCC 0.26's load_func derives what a tracing program attaches to from its
function's name prefix (kfunc__, lsm__) and has no way to ask for a typed raw tracepoint; the compiled
instructions (maps already resolved to file descriptors) are taken from BCC and loaded here. libbpf
could load them too, but would need its object-file path; bpf(2) with the UAPI attribute layout is a
dozen lines. Standard library only: the compiler process imports this.
"""

from __future__ import annotations

import ctypes as ct
import os

_libc = ct.CDLL(None, use_errno=True)
_NR_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_RAW_TP = 23
_ATTR_SIZE = 128  # through attach_btf_id (offset 108) and a little beyond: the kernel zero-checks the rest
_LOG_SIZE = 1 << 22
# r0 = 0; exit: what probe() loads to learn whether this kernel has typed tracepoints
_RETURN_ZERO = bytes([0xb7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])


class VerifierError(OSError):
    """The kernel refused the program; `log` holds the end of the verifier's log."""

    def __init__(self, err: int, name: str, log: str):
        # The verifier's last words before its statistics ("processed N insns ...") say why.
        why = [line for line in log.strip().splitlines()
               if line.strip() and not line.startswith(("processed ", "verification time", "stack depth"))]
        super().__init__(err, f"{name}: {os.strerror(err)}" + (f": {why[-1].strip()}" if why else ""))
        self.log = log


def load(insns: bytes, name: str, btf_id: int, log: bool = True) -> int:
    """Load `insns` as a typed tracepoint program attached (later, by raw_tracepoint_open with no name)
    to the tracepoint whose `btf_trace_<name>` type id is `btf_id`; return its fd. A refusal is retried
    once with the verifier's log on, which goes into the VerifierError."""
    try:
        return _load(insns, name, btf_id, None)
    except OSError as e:
        if not log or e.errno not in (13, 22, 7, 28):  # EACCES, EINVAL, E2BIG, ENOSPC: the verifier said no
            raise
        buf = ct.create_string_buffer(_LOG_SIZE)
        try:
            return _load(insns, name, btf_id, buf)
        except OSError as e2:
            raise VerifierError(e2.errno, name, buf.value.decode(errors="replace")[-4000:]) from None


def _load(insns: bytes, name: str, btf_id: int, log_buf) -> int:
    code = ct.create_string_buffer(insns, len(insns))
    lic = ct.create_string_buffer(b"GPL")
    attr = (ct.c_uint8 * _ATTR_SIZE)()

    def put(ctype, off: int, value) -> None:
        ctype.from_buffer(attr, off).value = value

    put(ct.c_uint32, 0, BPF_PROG_TYPE_TRACING)
    put(ct.c_uint32, 4, len(insns) // 8)
    put(ct.c_uint64, 8, ct.addressof(code))
    put(ct.c_uint64, 16, ct.addressof(lic))
    if log_buf is not None:
        put(ct.c_uint32, 24, 1)
        put(ct.c_uint32, 28, len(log_buf))
        put(ct.c_uint64, 32, ct.addressof(log_buf))
    ct.memmove(ct.addressof(attr) + 48, name.encode()[:15], min(len(name), 15))  # prog_name[16]
    put(ct.c_uint32, 68, BPF_TRACE_RAW_TP)  # expected_attach_type
    put(ct.c_uint32, 108, btf_id)  # attach_btf_id
    fd = _libc.syscall(_NR_BPF, BPF_PROG_LOAD, ct.byref(attr), _ATTR_SIZE)
    if fd < 0:
        err = ct.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return fd


def probe(btf_id: int) -> str | None:
    """None if this kernel loads typed tracepoint programs (tried on the tracepoint `btf_id`), else why not."""
    try:
        os.close(load(_RETURN_ZERO, "lt_probe_typed", btf_id, log=False))
        return None
    except OSError as e:
        return e.strerror or str(e)
