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

Why a BTF of one function with each program: the kernel keeps 15 characters of a program's name
(lt_net_dev_start_xmit and lt_net_dev_start_xmit@... would read alike in bpftool, perf and the
kernel's symbols); given a BTF that describes the program as one function, it uses that function's
full name. BCC does the same for the programs it loads. A program that calls subprograms would need
one record per subprogram, so it loads without (and keeps the short name).
"""

from __future__ import annotations

import ctypes as ct
import os
import struct

LIBC = ct.CDLL(None, use_errno=True)
NR_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)
BPF_PROG_LOAD = 5
BPF_BTF_LOAD = 18
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
    btf_fd = -1 if _calls_subprograms(insns) else _btf_fd(_func_btf(name.split("@")[0]))
    try:
        try:
            return _load(insns, name, btf_id, None, btf_fd)
        except OSError as e:
            if not log or e.errno not in (13, 22, 7, 28):  # EACCES, EINVAL, E2BIG, ENOSPC: the verifier said no
                raise
            buf = ct.create_string_buffer(_LOG_SIZE)
            try:
                return _load(insns, name, btf_id, buf, btf_fd)
            except OSError as e2:
                raise VerifierError(e2.errno, name, buf.value.decode(errors="replace")[-4000:]) from None
    finally:
        if btf_fd >= 0:
            os.close(btf_fd)  # the program holds its own reference to its BTF


def _func_btf(name: str) -> bytes:
    """A BTF blob with one global function `name`: int name(void *ctx) (type 4)."""
    strings = b"\0int\0ctx\0" + name.encode() + b"\0"
    types = b"".join([
        struct.pack("<IIII", 1, 1 << 24, 4, (1 << 24) | 32),  # 1: int, signed, 32 bits
        struct.pack("<III", 0, 2 << 24, 0),  # 2: void *
        struct.pack("<IIIII", 0, (13 << 24) | 1, 1, 5, 2),  # 3: int (void *ctx)
        struct.pack("<III", 9, (12 << 24) | 1, 3),  # 4: global function `name` of type 3
    ])
    return struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings)) + types + strings


def _btf_fd(blob: bytes) -> int:
    """Load a BTF blob; its fd, or -1 if the kernel would not (the program then loads without)."""
    buf = ct.create_string_buffer(blob, len(blob))
    attr = (ct.c_uint8 * 32)()
    ct.c_uint64.from_buffer(attr, 0).value = ct.addressof(buf)
    ct.c_uint32.from_buffer(attr, 16).value = len(blob)
    return LIBC.syscall(NR_BPF, BPF_BTF_LOAD, ct.byref(attr), len(attr))


def _calls_subprograms(insns: bytes) -> bool:
    """A BPF-to-BPF call or a function's address (src_reg BPF_PSEUDO_CALL / BPF_PSEUDO_FUNC)."""
    return any((insns[i] == 0x85 and insns[i + 1] >> 4 == 1) or (insns[i] == 0x18 and insns[i + 1] >> 4 == 4)
               for i in range(0, len(insns), 8))


def _load(insns: bytes, name: str, btf_id: int, log_buf, btf_fd: int) -> int:
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
    func_info = (ct.c_uint32 * 2)(0, 4)  # the function at instruction 0 is BTF type 4
    if btf_fd >= 0:
        put(ct.c_uint32, 72, btf_fd)  # prog_btf_fd
        put(ct.c_uint32, 76, ct.sizeof(func_info))  # func_info_rec_size
        put(ct.c_uint64, 80, ct.addressof(func_info))
        put(ct.c_uint32, 88, 1)  # func_info_cnt
    put(ct.c_uint32, 108, btf_id)  # attach_btf_id
    fd = LIBC.syscall(NR_BPF, BPF_PROG_LOAD, ct.byref(attr), _ATTR_SIZE)
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
