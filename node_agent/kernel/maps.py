"""BPF maps held by file descriptor, with the item access the agent's readers expect from BCC's tables.

The agent gets its maps as file descriptors from the compiler process (loader.py), with their key and
value types as ctypes types; it never loads BCC (see libbpf.py for why). These classes give the part of
BCC's table interface the agent and its tests use (item access with ctypes keys or ints, `Key`,
`Leaf`, `map_fd`, `keys()/values()/items()`, `clear()`, `items_update_batch()`, per-CPU values as one
array per key, ring buffer polling), chosen by the map type the kernel reports, so any map type the
probes declare works: arrays and per-CPU arrays index by position, hashes (LRU or not, per-CPU or not)
iterate their keys, ring buffers deliver records to a callback.
"""

from __future__ import annotations

import ctypes as ct
import errno
import mmap
import os
import threading
from collections.abc import Callable, Iterator, MutableMapping

from . import libbpf
from .bpfsys import possible_cpus

# Kernel map types (include/uapi/linux/bpf.h, enum bpf_map_type)
HASH, ARRAY, PERCPU_HASH, PERCPU_ARRAY, LRU_HASH, LRU_PERCPU_HASH, RINGBUF = 1, 2, 5, 6, 9, 10, 27
F_MMAPABLE = 1 << 10  # map_flags: an array user space can map (BPF_F_MMAPABLE)
PER_CPU = {PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH}
ARRAYS = {ARRAY, PERCPU_ARRAY}


def per_cpu_leaf(value: type, ncpu: int) -> type:
    """The buffer type of a per-CPU value: one element per possible CPU, each padded to 8 bytes as the
    kernel lays them out. Integers narrower than 8 bytes widen to 64 bits (as BCC does: the value is
    the low bytes on little-endian machines); a smaller struct gets trailing padding."""
    size = ct.sizeof(value)
    pad = -size % 8
    if not pad:
        elem = value
    elif issubclass(value, ct._SimpleCData) and value._type_ in "bBhHiIlLqQ?":
        elem = ct.c_int64 if value._type_.islower() else ct.c_uint64
    else:
        elem = type(value.__name__, (value,), {"_fields_": [("_lt_pad", ct.c_uint8 * pad)]})
    return elem * ncpu


class Map(MutableMapping):
    """A hash-like map: keys found by iterating the kernel's map."""

    def __init__(self, name: str, fd: int, info: libbpf.BPF_MAP_INFO, key: type | None, value: type):
        self.name = name
        self.map_fd = fd
        self.ttype = info.type
        self.map_flags = info.map_flags
        self.max_entries = info.max_entries
        self.key_size, self.value_size = info.key_size, info.value_size
        self.Key = key
        self.sLeaf = value  # one value (per CPU, for per-CPU maps)
        self.Leaf = per_cpu_leaf(value, possible_cpus()) if info.type in PER_CPU else value
        for what, t, size in (("key", key, info.key_size), ("value", value, info.value_size)):
            if t is not None and size and ct.sizeof(t) != size:
                raise TypeError(f"map {name}: {what} type is {ct.sizeof(t)} bytes, the kernel's {size}")

    def _key(self, key):
        if isinstance(key, int):
            key = self.Key(key)
        if ct.sizeof(key) != self.key_size:
            raise TypeError(f"map {self.name}: key of {ct.sizeof(key)} bytes, the map's are {self.key_size}")
        return key

    def _leaf(self, leaf):
        if ct.sizeof(leaf) != ct.sizeof(self.Leaf):
            raise TypeError(f"map {self.name}: value of {ct.sizeof(leaf)} bytes, the map's are "
                            f"{ct.sizeof(self.Leaf)}")
        return leaf

    def __getitem__(self, key):
        leaf = self.Leaf()
        if libbpf.lib.bpf_map_lookup_elem(self.map_fd, ct.byref(self._key(key)), ct.byref(leaf)) < 0:
            raise KeyError(key)
        return leaf

    def __setitem__(self, key, leaf) -> None:
        libbpf.check(libbpf.lib.bpf_map_update_elem(self.map_fd, ct.byref(self._key(key)),
                                                    ct.byref(self._leaf(leaf)), 0),
                     f"update of map {self.name}")

    def __delitem__(self, key) -> None:
        if libbpf.lib.bpf_map_delete_elem(self.map_fd, ct.byref(self._key(key))) < 0:
            raise KeyError(key)

    def __iter__(self) -> Iterator:
        key = None
        while True:
            nxt = self.Key()
            if libbpf.lib.bpf_map_get_next_key(self.map_fd, None if key is None else ct.byref(key),
                                               ct.byref(nxt)) < 0:
                return
            yield nxt
            key = nxt

    def __len__(self) -> int:
        return sum(1 for _ in self)

    # As BCC's tables: lists, and an entry deleted between finding its key and reading it is skipped.
    def items(self) -> list:
        out = []
        for k in list(self):
            try:
                out.append((k, self[k]))
            except KeyError:
                pass
        return out

    def values(self) -> list:
        return [v for _, v in self.items()]

    def clear(self) -> None:
        for k in list(self):
            try:
                del self[k]
            except KeyError:
                pass

    def close(self) -> None:
        """Release what this process holds of the map besides its file descriptor (the loader's)."""

    def items_update_batch(self, keys: ct.Array, values: ct.Array) -> None:
        if len(keys) != len(values):
            raise ValueError("keys and values differ in length")
        n = ct.c_uint32(len(keys))
        libbpf.check(libbpf.lib.bpf_map_update_batch(self.map_fd, ct.byref(keys), ct.byref(values),
                                                     ct.byref(n), None),
                     f"batch update of map {self.name}")


class ArrayMap(Map):
    """Arrays (per-CPU or not): every position exists; deleting one zeroes it."""

    def _key(self, key):
        key = super()._key(key)
        if not 0 <= key.value < self.max_entries:
            raise IndexError(f"map {self.name}: index {key.value} out of range")
        return key

    def __iter__(self) -> Iterator:
        return (self.Key(i) for i in range(self.max_entries))

    def __len__(self) -> int:
        return self.max_entries

    def __delitem__(self, key) -> None:
        self[key] = self.Leaf()

    def clear(self) -> None:
        n = self.max_entries
        self.items_update_batch((self.Key * n)(*range(n)), (self.Leaf * n)())

    _mm: mmap.mmap | None = None

    def store(self, index: int, field: str, value: int) -> None:
        """Set one field of entry `index` with a single store into the array, mapped into this process
        (arrays created BPF_F_MMAPABLE): the programs may be writing the entry's other fields meanwhile,
        which an update by bpf(2), a copy of the whole value, would overwrite with what it read before."""
        if not self.map_flags & F_MMAPABLE:
            raise TypeError(f"map {self.name} is not mmapable")
        if self.ttype != ARRAY:
            raise TypeError(f"map {self.name}: only plain arrays can be mapped")
        if not 0 <= index < self.max_entries:
            raise IndexError(f"map {self.name}: index {index} out of range")
        if self._mm is None:
            size = -(-self.max_entries * self._stride // mmap.PAGESIZE) * mmap.PAGESIZE
            self._mm = mmap.mmap(self.map_fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        kind = dict(self.Leaf._fields_)[field]
        kind.from_buffer(self._mm, index * self._stride + getattr(self.Leaf, field).offset).value = value

    @property
    def _stride(self) -> int:
        return -(-self.value_size // 8) * 8  # the kernel's elem_size

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None


class RingBuf(Map):
    """A BPF ring buffer: records go to the callback given to open_ring_buffer(), from poll()."""

    def __init__(self, *args, event: type | None = None):
        super().__init__(*args)
        self._event = event
        self._rb = None
        self._cb = None
        self._lock = threading.Lock()  # poll() against close(): the ring is unmapped on close

    def __len__(self) -> int:
        return 0

    def __iter__(self) -> Iterator:
        return iter(())

    def event(self, data):
        """The record at `data` as the program's event struct (as BCC's RingBuf.event)."""
        if self._event is None:
            raise TypeError(f"ring buffer {self.name}: the compiler found no record type for it")
        return ct.cast(data, ct.POINTER(self._event)).contents

    def open_ring_buffer(self, callback: Callable) -> None:
        def sample(ctx, data, size) -> int:
            ret = callback(ctx, data, size)
            return int(ret) if isinstance(ret, int) else 0

        with self._lock:
            if self._rb is not None:
                raise RuntimeError(f"ring buffer {self.name} is open already")
            self._cb = libbpf.RINGBUF_SAMPLE_FN(sample)  # kept: libbpf calls it until close()
            rb = libbpf.lib.ring_buffer__new(self.map_fd, self._cb, None, None)
            if not rb:
                err = ct.get_errno() or errno.EINVAL
                raise OSError(err, f"ring buffer {self.name}: {os.strerror(err)}")
            self._rb = rb

    def poll(self, timeout_ms: int) -> int:
        """Wait up to timeout_ms for records and hand each to the callback; the number handled."""
        with self._lock:
            if self._rb is None:
                return 0
            ret = libbpf.lib.ring_buffer__poll(self._rb, timeout_ms)
        if ret == -errno.EINTR:
            return 0
        return libbpf.check(ret, f"poll of ring buffer {self.name}")

    def consume(self) -> int:
        """Hand every record waiting now to the callback, without waiting."""
        with self._lock:
            if self._rb is None:
                return 0
            return libbpf.check(libbpf.lib.ring_buffer__consume(self._rb), f"ring buffer {self.name}")

    def close(self) -> None:
        with self._lock:
            if self._rb is not None:
                libbpf.lib.ring_buffer__free(self._rb)
                self._rb = None
                self._cb = None


def open_map(name: str, fd: int, key: type | None, value: type, event: type | None = None) -> Map:
    info = libbpf.map_info(fd)
    if info.type == RINGBUF:
        return RingBuf(name, fd, info, key, value, event=event)
    if info.type in ARRAYS:
        return ArrayMap(name, fd, info, key, value)
    return Map(name, fd, info, key, value)
