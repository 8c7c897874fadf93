"""libbpf, the kernel's own BPF user-space library, through ctypes: map access, raw tracepoint links, ring buffers.

Why libbpf and not BCC in the agent's process: libbcc links LLVM and clang, and merely loading it makes
~60 MiB resident (relocated data of libLLVM, code pages its constructors touch); the agent keeps BCC in a
short-lived compiler process instead (loader.py) and works on the file descriptors that process hands
over. libbpf.so.1 is what libbcc itself is linked against (so it is in the agent's image already), and
it is small. Why not raw bpf(2) for everything, as bpfsys.py does for a few commands: the ring buffer's
consumer must order its loads and stores against the kernel's producer with memory barriers, which
libbpf's ring_buffer implements and Python cannot express; map commands come along from the same library.

libbpf 1.x returns a negative errno from these calls (and sets errno); ring_buffer__new returns NULL.
"""

from __future__ import annotations

import ctypes as ct
import os

lib = ct.CDLL("libbpf.so.1", use_errno=True)

_vp, _int, _u32p = ct.c_void_p, ct.c_int, ct.POINTER(ct.c_uint32)
for _name, _res, _args in (
    ("bpf_map_lookup_elem", _int, [_int, _vp, _vp]),
    ("bpf_map_update_elem", _int, [_int, _vp, _vp, ct.c_uint64]),
    ("bpf_map_delete_elem", _int, [_int, _vp]),
    ("bpf_map_get_next_key", _int, [_int, _vp, _vp]),
    ("bpf_map_lookup_batch", _int, [_int, _vp, _vp, _vp, _vp, _u32p, _vp]),
    ("bpf_map_update_batch", _int, [_int, _vp, _vp, _u32p, _vp]),
    ("bpf_raw_tracepoint_open", _int, [ct.c_char_p, _int]),
    ("bpf_obj_get_info_by_fd", _int, [_int, _vp, _u32p]),
    ("ring_buffer__new", _vp, [_int, _vp, _vp, _vp]),
    ("ring_buffer__poll", _int, [_vp, _int]),
    ("ring_buffer__consume", _int, [_vp]),
    ("ring_buffer__free", None, [_vp]),
):
    _f = getattr(lib, _name)
    _f.restype, _f.argtypes = _res, _args

# int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size)
RINGBUF_SAMPLE_FN = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_size_t)


def check(ret: int, what: str) -> int:
    """Raise OSError for a negative libbpf return value; pass any other through."""
    if ret < 0:
        err = -ret if ret != -1 else (ct.get_errno() or 1)
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


class BPF_MAP_INFO(ct.Structure):
    """The head of the kernel's struct bpf_map_info (UAPI, stable): the kernel fills what fits."""

    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32), ("map_flags", ct.c_uint32),
                ("name", ct.c_char * 16)]


def map_info(fd: int) -> BPF_MAP_INFO:
    info = BPF_MAP_INFO()
    n = ct.c_uint32(ct.sizeof(info))
    check(lib.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(n)), "BPF_OBJ_GET_INFO_BY_FD")
    return info


def raw_tracepoint_open(tracepoint: str, prog_fd: int, typed: bool = False) -> int:
    """Attach a program to a raw tracepoint; the returned link fd detaches it when closed. A typed
    tracepoint program (kernel/progload.py) names its tracepoint at load, and the kernel wants no name
    here."""
    name = None if typed else tracepoint.encode()
    return check(lib.bpf_raw_tracepoint_open(name, prog_fd), f"raw tracepoint {tracepoint}")


class BatchOps:
    """libbcc's bpf_lookup_batch() signature over libbpf, for bpfsys.read_percpu_array()."""

    @staticmethod
    def bpf_lookup_batch(fd, in_batch, out_batch, keys, values, count) -> int:
        return lib.bpf_map_lookup_batch(fd, in_batch, out_batch, keys, values, count, None)


BATCH = BatchOps()
