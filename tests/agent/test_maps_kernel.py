"""The agent's map access (node_agent/kernel/maps.py) on real kernel maps of every type the probes may
declare: what BCC's tables did for the readers, whatever the map type."""

from __future__ import annotations

import ctypes as ct
import os

import pytest

from latencytrace.node_agent.kernel import libbpf, maps
from latencytrace.node_agent.kernel.bpfsys import possible_cpus, read_percpu_array

libbpf.lib.bpf_map_create.restype = ct.c_int
libbpf.lib.bpf_map_create.argtypes = [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32, ct.c_uint32, ct.c_void_p]


class Stat(ct.Structure):
    _fields_ = [("count", ct.c_uint64), ("small", ct.c_uint32)]  # 12 bytes: padded per CPU


class CreateOpts(ct.Structure):
    """The head of libbpf's struct bpf_map_create_opts (its `sz` says how much of it we give)."""
    _fields_ = [("sz", ct.c_size_t), ("btf_fd", ct.c_uint32), ("btf_key_type_id", ct.c_uint32),
                ("btf_value_type_id", ct.c_uint32), ("btf_vmlinux_value_type_id", ct.c_uint32),
                ("inner_map_fd", ct.c_uint32), ("map_flags", ct.c_uint32)]


@pytest.fixture
def make():
    fds = []

    def make(map_type: int, key: type, value: type, entries: int = 8, flags: int = 0) -> maps.Map:
        opts = CreateOpts(sz=ct.sizeof(CreateOpts), map_flags=flags)
        fd = libbpf.check(libbpf.lib.bpf_map_create(map_type, b"lt_test", ct.sizeof(key), ct.sizeof(value),
                                                    entries, ct.byref(opts)), "BPF_MAP_CREATE")
        fds.append(fd)
        return maps.open_map("lt_test", fd, key, value)

    yield make
    for fd in fds:
        os.close(fd)


@pytest.mark.parametrize("map_type", [maps.HASH, maps.LRU_HASH])
def test_hash_maps(make, map_type):
    t = make(map_type, ct.c_uint32, Stat)
    assert type(t) is maps.Map and len(t) == 0 and t.items() == []
    for k in (3, 1, 2):
        v = t.Leaf()
        v.count, v.small = k * 10, k
        t[ct.c_uint32(k)] = v
    assert sorted((k.value, v.count, v.small) for k, v in t.items()) == [(1, 10, 1), (2, 20, 2), (3, 30, 3)]
    assert t[2].count == 20 and len(t) == 3
    del t[ct.c_uint32(2)]
    with pytest.raises(KeyError):
        t[ct.c_uint32(2)]
    with pytest.raises(KeyError):
        del t[ct.c_uint32(2)]
    t.clear()
    assert list(t.keys()) == []
    with pytest.raises(TypeError):  # a key of the wrong size never reaches the kernel
        t[ct.c_uint64(1)]


def test_arrays_index_by_position_and_delete_by_zeroing(make):
    t = make(maps.ARRAY, ct.c_int, Stat, 4)
    assert type(t) is maps.ArrayMap and len(t) == 4 and [k.value for k in t.keys()] == [0, 1, 2, 3]
    v = t.Leaf()
    v.count = 7
    t[ct.c_int(2)] = v
    assert t[2].count == 7 and [x.count for x in t.values()] == [0, 0, 7, 0]
    del t[2]
    assert t[2].count == 0
    with pytest.raises(IndexError):
        t[4]
    keys, values = (ct.c_int * 4)(*range(4)), (Stat * 4)()
    for i in range(4):
        values[i].count = i + 1
    t.items_update_batch(keys, values)
    assert [x.count for x in t.values()] == [1, 2, 3, 4]
    t.clear()
    assert [x.count for x in t.values()] == [0, 0, 0, 0]


class Trio(ct.Structure):
    _fields_ = [("a", ct.c_uint32), ("b", ct.c_uint32), ("c", ct.c_uint32)]  # 12 bytes, 16 apart in an array


def test_one_field_of_a_mapped_array_entry_is_stored_alone(make):
    """What the tracer does with each CPU's lt_cpu entry: one field stored through the mapping, the
    entry's other fields (the programs') as they were."""
    t = make(maps.ARRAY, ct.c_uint32, Trio, 1000, flags=maps.F_MMAPABLE)  # more than a page
    for i in (0, 999):
        t[i] = Trio(10 + i, 7, 8)
    t.store(999, "c", 0xFFFFFFFF)
    t.store(0, "b", 5)
    assert [(t[i].a, t[i].b, t[i].c) for i in (0, 999)] == [(10, 5, 8), (1009, 7, 0xFFFFFFFF)]
    assert all(x.a == x.b == x.c == 0 for x in t.values()[1:999])
    with pytest.raises(IndexError):
        t.store(1000, "a", 1)
    t.close()
    assert t[0].b == 5  # unmapped; the map stays (its file descriptor is the loader's)
    plain = make(maps.ARRAY, ct.c_uint32, Trio, 4)
    with pytest.raises(TypeError, match="not mmapable"):
        plain.store(0, "a", 1)


@pytest.mark.parametrize("map_type", [maps.PERCPU_ARRAY, maps.PERCPU_HASH, maps.LRU_PERCPU_HASH])
@pytest.mark.parametrize("value", [ct.c_uint64, ct.c_uint32, Stat])
def test_per_cpu_maps_give_one_value_per_possible_cpu(make, map_type, value):
    ncpu = possible_cpus()
    t = make(map_type, ct.c_int, value, 4)
    per_cpu = t.Leaf()
    assert len(per_cpu) == ncpu and ct.sizeof(per_cpu) == ncpu * ((ct.sizeof(value) + 7) // 8 * 8)
    for cpu in range(ncpu):
        if value is Stat:
            per_cpu[cpu].count, per_cpu[cpu].small = cpu + 1, 2
        else:
            per_cpu[cpu] = cpu + 1
    t[ct.c_int(1)] = per_cpu
    got = t[ct.c_int(1)]
    if value is Stat:
        assert [x.count for x in got] == list(range(1, ncpu + 1)) and {x.small for x in got} == {2}
    else:
        assert [int(x) for x in got] == list(range(1, ncpu + 1))
    if map_type == maps.PERCPU_ARRAY and value is ct.c_uint32:
        # The collectors' batched read sees what the item access wrote (u32 in 8-byte per-CPU slots).
        arr = read_percpu_array(libbpf.BATCH, t.map_fd, 0, 4, 4, ncpu)
        assert [int(x) & 0xFFFFFFFF for x in arr[1, :, 0]] == list(range(1, ncpu + 1))
        assert int(arr[0].sum()) == 0
