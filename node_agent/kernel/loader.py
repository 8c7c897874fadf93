"""Compile and load the probes in a short-lived child process; the agent keeps only the file descriptors.

Why a child: BCC compiles with clang and LLVM in the process that calls it. Loading libbcc alone makes
~60 MiB resident and compiling our probes another ~55 MiB, so an agent that compiled in-process peaked
at 197 MiB (VmHWM) although it needs ~110 MiB afterwards, and a container memory limit must allow the
peak. Measured alternatives (this VM, same session): compiling in-process before the agent's other
imports still peaks at 156 MiB (BCC's import and the compile alone) and makes start-up order fragile;
forking the agent would share its pages, but it runs threads (gRPC, the API watch) that make fork()
unsafe. So a fresh interpreter (`python -m latencytrace.node_agent.kernel.loader`, which imports only
the standard library and BCC) compiles, loads the programs and creates the maps, and hands their file
descriptors to the agent over a Unix socket (SCM_RIGHTS) with each map's key and value types; then it
exits, and the kernel objects live on as long as the agent holds the descriptors. The agent never maps
LLVM: it attaches and reads maps with libbpf (libbpf.py, maps.py). Its peak is its steady size; the
child's peak is paid once, in another process, for a few seconds (the container still has both for that
moment: the benchmark reports the two). Measured with tests/bench's agent start, alternating with the
in-process version in one run: the agent's VmHWM 197 -> 87 MiB, its RSS while tracing 112 -> 83 MiB;
the child peaks at 135 MiB; anonymous memory of agent and child together at start 117 MiB, against
105 MiB in the one process before (the child's own interpreter), the rest being reclaimable code pages.

What BCC prints (clang's diagnostics, a verifier's log) goes to the agent's stderr as when BCC ran
in-process. Failure modes: a compile error is one line naming clang's first error (LoadError); a child
that dies closes its end of the socket, so the agent sees end-of-file at once (no hang), and a child
that hangs is killed after `timeout`. The child dies with the agent (PR_SET_PDEATHSIG), so a SIGKILLed
agent leaves no compiler behind; nothing is pinned, so nothing outlives the processes that hold it.

Types travel as a neutral description of ctypes types (`describe`/`build`): the child lets BCC decode
its own type descriptions (the source of truth for the layout) and the agent rebuilds the same ctypes
types without BCC.
"""

from __future__ import annotations

import ctypes as ct
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

MAX_FDS = 200  # per message: below the kernel's SCM_MAX_FD (253)
MAX_MSG = 1 << 20
RAW_TRACEPOINT = 17  # BPF_PROG_TYPE_RAW_TRACEPOINT
PERF_EVENT_ARRAY, RINGBUF = 4, 27  # BPF_MAP_TYPE_*
PR_SET_PDEATHSIG = 1


class LoadError(RuntimeError):
    """The probes could not be compiled or the compiler process failed; the message says why."""


# -- ctypes types as JSON ------------------------------------------------------------------------
_SIMPLE = {t._type_: t for t in (ct.c_bool, ct.c_char, ct.c_wchar, ct.c_byte, ct.c_ubyte, ct.c_short,
                                 ct.c_ushort, ct.c_int, ct.c_uint, ct.c_long, ct.c_ulong, ct.c_longlong,
                                 ct.c_ulonglong, ct.c_float, ct.c_double, ct.c_longdouble, ct.c_char_p,
                                 ct.c_void_p)}


def describe(t: type | None):
    """A JSON-able description of a ctypes type (None stays None)."""
    if t is None:
        return None
    if issubclass(t, ct.Array):
        return {"array": describe(t._type_), "length": t._length_}
    if issubclass(t, (ct.Structure, ct.Union)):
        return {"kind": "union" if issubclass(t, ct.Union) else "struct", "name": t.__name__,
                "pack": getattr(t, "_pack_", 0), "anonymous": list(getattr(t, "_anonymous_", ())),
                "fields": [[f[0], describe(f[1]), *f[2:]] for f in t._fields_]}
    if issubclass(t, ct._SimpleCData) and _SIMPLE.get(t._type_) is not None:
        return {"simple": t._type_}
    raise TypeError(f"cannot describe ctypes type {t!r}")


def build(d) -> type | None:
    """The ctypes type a `describe()` result stands for."""
    if d is None:
        return None
    if "simple" in d:
        return _SIMPLE[d["simple"]]
    if "array" in d:
        return build(d["array"]) * d["length"]
    attrs = {"_fields_": [(f[0], build(f[1]), *f[2:]) for f in d["fields"]]}
    if d["pack"]:
        attrs["_pack_"] = d["pack"]
    if d["anonymous"]:
        attrs["_anonymous_"] = d["anonymous"]
    return type(d["name"] or "anon", (ct.Union if d["kind"] == "union" else ct.Structure,), attrs)


# -- the agent's side ------------------------------------------------------------------------------
@dataclass
class MapSpec:
    name: str
    fd: int
    key: type | None
    value: type
    event: type | None  # the record type of a ring buffer


@dataclass
class Loaded:
    programs: dict[str, int] = field(default_factory=dict)  # function name -> program fd
    failed: dict[str, str] = field(default_factory=dict)  # function name -> why it did not load
    maps: dict[str, MapSpec] = field(default_factory=dict)
    compiler_pid: int = 0
    compiler_peak_rss: int = 0  # bytes: the child's VmHWM as it finished

    def fds(self) -> list[int]:
        return [*self.programs.values(), *(m.fd for m in self.maps.values())]

    def close(self) -> None:
        for fd in self.fds():
            try:
                os.close(fd)
            except OSError:
                pass
        self.programs, self.maps = {}, {}


def load(source: str, cflags: list[str], programs: list[str], tail_calls: list[tuple[str, int, str]] = (),
         timeout: float = 300.0, typed: dict[str, tuple[str, int]] | None = None) -> Loaded:
    """Compile `source` in a child process, load `programs` (raw tracepoint programs) and create every
    map; return their file descriptors. `typed`: more programs, as typed tracepoint programs (progload),
    by the name to hand them back under -> (function, type id of the tracepoint's btf_trace_<name>).
    `tail_calls`: (program array, index, program) to fill, for the programs that go on in a fresh run of
    themselves (the array holds the program once loaded; it lives as long as the agent holds the array's
    descriptor). Raises LoadError."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    err = tempfile.TemporaryFile()
    # The request goes in a file, not a pipe: the source is larger than a pipe holds, and writing it to
    # a child that hangs before reading it would block here, past any timeout.
    request = tempfile.TemporaryFile()
    request.write(json.dumps({"source": source, "cflags": cflags, "programs": programs,
                              "tail_calls": [list(t) for t in tail_calls],
                              "typed": {k: list(v) for k, v in (typed or {}).items()}}).encode())
    request.seek(0)
    fds: list[int] = []
    proc = None
    finished = False  # the child said its last word (or died): it is exiting by itself
    try:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "latencytrace.node_agent.kernel.loader", str(child.fileno()), str(os.getpid())],
                stdin=request, stdout=subprocess.DEVNULL, stderr=err, pass_fds=(child.fileno(),))
        finally:
            child.close()  # ours: the child's death must reach us as end-of-file
            request.close()  # the child has its own descriptor of it
        deadline = time.monotonic() + timeout
        names: list[str] = []
        poller = select.poll()  # not select(): the agent may hold more than 1024 descriptors
        poller.register(parent, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise LoadError(f"the BPF compiler process did not finish within {timeout:g} s")
            data, got, _flags, _addr = socket.recv_fds(parent, MAX_MSG, MAX_FDS)
            fds += got
            msg = json.loads(data) if data else {"kind": "eof"}
            finished = msg["kind"] != "fds"
            if not data:
                raise LoadError(_death(proc, err))
            if msg["kind"] == "fds":
                names += msg["names"]
                if len(msg["names"]) != len(got):
                    raise LoadError("the BPF compiler process sent fewer file descriptors than it named")
            elif msg["kind"] == "error":
                raise LoadError(msg["message"] + _first_error(err))
            else:
                break
        by_name = dict(zip(names, fds, strict=True))
        out = Loaded(compiler_pid=proc.pid, compiler_peak_rss=msg["peak_rss"], failed=msg["failed"])
        out.programs = {name: by_name[f"prog:{name}"] for name in msg["programs"]}
        out.maps = {m["name"]: MapSpec(m["name"], by_name[f"map:{m['name']}"], build(m["key"]), build(m["value"]),
                                       build(m["event"])) for m in msg["maps"]}
        fds = []  # handed over
        return out
    finally:
        for fd in fds:
            os.close(fd)
        parent.close()
        if proc is not None and proc.poll() is None:
            try:
                proc.wait(5 if finished else 0)  # a child that did not finish (timeout) is killed at once
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _forward(err)
        err.close()


def _first_error(err) -> str:
    err.seek(0)
    lines = err.read().decode(errors="replace").splitlines()
    for pattern in (": error:", "Error"):  # clang's first error, else a Python exception's line
        for line in lines:
            if pattern in line:
                return f"; {line.strip()}"
    return ""


def _forward(err) -> None:
    """What the child printed, onto our stderr (as BCC in-process printed it)."""
    err.seek(0)
    text = err.read().decode(errors="replace")
    if text:
        sys.stderr.write(text if text.endswith("\n") else text + "\n")
        sys.stderr.flush()


def _death(proc: subprocess.Popen, err) -> str:
    try:
        rc = proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    how = f"was killed by signal {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"
    return f"the BPF compiler process {how} before handing over the probes" + _first_error(err)


# -- the child's side ------------------------------------------------------------------------------
def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(sock_fd: int, parent_pid: int) -> int:
    libc = ct.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the agent died before prctl took effect
        return 1
    sock = socket.socket(fileno=sock_fd)
    req = json.loads(sys.stdin.buffer.read())

    def send(msg: dict, fds: list[int] = ()) -> None:
        socket.send_fds(sock, [json.dumps(msg).encode()], list(fds))

    from bcc import BPF  # only here: the agent's process never loads BCC

    try:
        bpf = BPF(text=req["source"].encode(), cflags=req["cflags"])
    except Exception as e:  # BCC raises bare Exception; clang's diagnostics went to stderr
        send({"kind": "error", "message": f"BPF program failed to compile: {e}"})
        return 1
    try:
        _hand_over(bpf, req["programs"], req.get("tail_calls", []), req.get("typed", {}), send)
    except Exception as e:  # anything else: one message, not a traceback the agent has to guess from
        send({"kind": "error", "message": f"the BPF compiler process failed: {e!r}"})
        return 1
    return 0


def _hand_over(bpf, programs: list[str], tail_calls: list, typed: dict[str, list], send) -> None:
    from bcc import BPF, libbcc, table

    from . import progload

    progs, failed = {}, {}
    for name in programs:
        try:
            progs[name] = bpf.load_func(name.encode(), RAW_TRACEPOINT).fd
        except Exception as e:  # the verifier's refusal (its log is on stderr): that program alone fails
            failed[name] = str(e)
    for name, (function, btf_id) in typed.items():
        try:  # BCC compiled it; BCC cannot load it as a typed tracepoint program (progload: why)
            progs[name] = progload.load(bpf.dump_func(function.encode()), function, btf_id)
        except progload.VerifierError as e:  # as BCC does: the verifier's log on stderr
            sys.stderr.write(f"{e.log}\n")
            failed[name] = str(e)
        except Exception as e:
            failed[name] = str(e)
    for array, index, name in tail_calls:
        if name in progs:
            bpf.get_table(array)[ct.c_int(index)] = ct.c_int(progs[name])
    lib = libbcc.lib
    lib.bpf_num_tables.restype, lib.bpf_num_tables.argtypes = ct.c_ulonglong, [ct.c_void_p]
    lib.bpf_table_name.restype, lib.bpf_table_name.argtypes = ct.c_char_p, [ct.c_void_p, ct.c_ulonglong]
    maps, map_fds = [], []
    # Types come from BCC's own descriptions, whatever the map type (BCC's Python table classes are
    # needed only for the record type of ring and perf buffers).
    for i in range(lib.bpf_num_tables(bpf.module)):
        name = lib.bpf_table_name(bpf.module, i)
        key_desc = lib.bpf_table_key_desc(bpf.module, name).decode()
        value_desc = lib.bpf_table_leaf_desc(bpf.module, name).decode()
        key = BPF._decode_table_type(json.loads(key_desc)) if key_desc else None
        value = BPF._decode_table_type(json.loads(value_desc))
        event = None
        if lib.bpf_table_type_id(bpf.module, lib.bpf_table_id(bpf.module, name)) in (RINGBUF, PERF_EVENT_ARRAY):
            try:
                event = describe(table._get_event_class(bpf.get_table(name)))
            except Exception:  # no record type found: event() says so if ever called
                event = None
        maps.append({"name": name.decode(), "key": describe(key), "value": describe(value), "event": event})
        map_fds.append(lib.bpf_table_fd(bpf.module, name))
    items = [(f"prog:{n}", fd) for n, fd in progs.items()] + [(f"map:{m['name']}", fd) for m, fd in zip(maps, map_fds)]
    for i in range(0, len(items), MAX_FDS):
        chunk = items[i:i + MAX_FDS]
        send({"kind": "fds", "names": [n for n, _ in chunk]}, [fd for _, fd in chunk])
    done = json.dumps({"kind": "done", "programs": list(progs), "failed": failed, "maps": maps,
                       "peak_rss": _peak_rss()})
    if len(done) > MAX_MSG:
        raise ValueError(f"the description of the maps is {len(done)} bytes, more than {MAX_MSG}")
    send(json.loads(done))


if __name__ == "__main__":
    sys.exit(_child(int(sys.argv[1]), int(sys.argv[2])))
