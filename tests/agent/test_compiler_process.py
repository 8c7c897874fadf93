"""The probes are compiled in a child process: the agent never maps the compiler, fails clearly when
the compiler fails, and leaves nothing behind however the compiler or the agent ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from latencytrace.node_agent.kernel import features, loader
from latencytrace.node_agent.kernel.btf import KernelBTF
from latencytrace.node_agent.probes import PROBES
from latencytrace.node_agent.tracer import Tracer, TracerError
from tests.agent.kernel import held_ids
from tests.agent.conftest import AGENT, running_agent

COMPILER_LIBS = ("libLLVM", "libclang", "libbcc.so")  # libbcc links both; libbcc_bpf is not the compiler

# Runs in a fresh interpreter (this test process has BCC loaded by other tests): what the agent imports,
# a tracer started and closed, and what the process held and mapped at each step.
_AGENT_PROCESS = r"""
import json, os, re, sys
from latencytrace.node_agent import agent, cli, collectors, events  # the agent's imports
from latencytrace.node_agent.tracer import Tracer

def held(kind):
    out = set()
    for fd in os.listdir("/proc/self/fdinfo"):
        try:
            m = re.search(rf"^{kind}_id:\s+(\d+)", open(f"/proc/self/fdinfo/{fd}").read(), re.M)
        except OSError:
            continue
        if m:
            out.add(int(m.group(1)))
    return sorted(out)

def status(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))

fds_before = len(os.listdir("/proc/self/fd"))
t = Tracer()
t.start()
doc = {"pid": os.getpid(), "compiler_pid": t.loaded.compiler_pid, "compiler_peak_kib": t.loaded.compiler_peak_rss >> 10,
       "mapped": sorted({l.split()[-1] for l in open("/proc/self/maps") if any(x in l for x in sys.argv[1:])}),
       "bcc_imported": "bcc" in sys.modules, "programs": sorted(t.program_fds()), "progs_held": len(held("prog")),
       "maps_held": len(held("map")), "attached": len(t.status.attached), "peak_kib": status("VmHWM")}
t.close()
doc.update(fds_before=fds_before, fds_after=len(os.listdir("/proc/self/fd")), progs_after=held("prog"),
           maps_after=held("map"))
print(json.dumps(doc))
"""


def usable_programs() -> set[str]:
    return {p.program for p in features.probe(KernelBTF.load(), PROBES).usable}


def test_the_agent_process_never_maps_the_compiler_and_close_leaves_nothing():
    out = subprocess.run([sys.executable, "-c", _AGENT_PROCESS, *COMPILER_LIBS], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    # The compile happened in another process, which is gone; this one never loaded BCC or LLVM.
    assert doc["compiler_pid"] not in (0, doc["pid"])
    assert not psutil.pid_exists(doc["compiler_pid"]) or psutil.Process(doc["compiler_pid"]).ppid() != doc["pid"]
    assert doc["mapped"] == [] and doc["bcc_imported"] is False, doc
    # The compiler's peak was paid there: the agent's own peak stayed below it (the same run's figures).
    assert doc["peak_kib"] < doc["compiler_peak_kib"], doc
    # Every usable program was handed over and attached, with the maps.
    assert set(doc["programs"]) == usable_programs()
    assert doc["progs_held"] == len(doc["programs"]) and doc["maps_held"] > 0 and doc["attached"] == len(PROBES)
    # close() gave every descriptor back: no program, link or map held, no fd left over.
    assert doc["progs_after"] == [] and doc["maps_after"] == [] and doc["fds_after"] == doc["fds_before"], doc


class BrokenSource(Tracer):
    def build_source(self):
        src, cflags, feats = super().build_source()
        return src + "\nint lt_broken(void *ctx) { return lt_no_such_symbol; }\n", cflags, feats


def _held() -> tuple[set[int], set[int], int]:
    return held_ids("self", "prog"), held_ids("self", "map"), len(os.listdir("/proc/self/fd"))


def test_a_compile_error_is_one_clear_tracer_error_with_the_compilers_words():
    before = _held()
    tracer = BrokenSource()
    with pytest.raises(TracerError) as e:
        tracer.start()
    msg = str(e.value)
    assert msg.startswith("BPF program failed to compile"), msg
    assert "lt_no_such_symbol" in msg and "--dump-bpf" in msg, msg  # clang's diagnostic, and what to do
    tracer.close()
    assert _held() == before


def _compiler_children(pid: int) -> list[psutil.Process]:
    return [c for c in psutil.Process(pid).children()
            if "latencytrace.node_agent.kernel.loader" in " ".join(c.cmdline())]


def test_a_compiler_that_dies_fails_start_and_leaks_nothing():
    before = _held()
    tracer = Tracer()
    result: dict = {}

    def start():
        try:
            tracer.start()
        except TracerError as e:
            result["error"] = str(e)

    thread = threading.Thread(target=start)
    thread.start()
    deadline = time.monotonic() + 60
    while not (children := _compiler_children(os.getpid())) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert children, "no compiler process was started"
    children[0].send_signal(signal.SIGKILL)
    thread.join(120)  # a hang guard, not a timing claim: a dead child is end-of-file at once
    assert not thread.is_alive(), "start() hung after its compiler died"
    assert "killed by signal SIGKILL" in result.get("error", ""), result
    tracer.close()
    assert _held() == before


def test_an_agent_killed_while_compiling_leaves_no_compiler_behind(lab):
    a = lab.add_pod("a")
    agent = subprocess.Popen([AGENT, "trace", "--netns", a.path, "--format", "json"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (children := _compiler_children(agent.pid)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert children, "no compiler process was started"
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.wait()
    child = children[0]
    try:
        child.wait(30)  # the kernel sends it SIGKILL when its parent dies (PR_SET_PDEATHSIG)
    except psutil.TimeoutExpired:
        child.kill()
        raise AssertionError("the compiler process outlived the killed agent") from None


def test_the_running_agent_holds_the_programs_and_maps_no_compiler(lab):
    with running_agent(lab) as agent:
        mapped = {line.split()[-1] for line in open(f"/proc/{agent.pid}/maps")
                  if any(x in line for x in COMPILER_LIBS)}
        assert mapped == set()
        assert len(held_ids(agent.pid, "prog")) == len(usable_programs()) and held_ids(agent.pid, "map")
        assert _compiler_children(agent.pid) == []


def test_a_compiler_that_hangs_is_killed_after_the_timeout():
    """A stopped child stands for one that hangs: load() gives up after its timeout and kills it."""
    src, cflags, _ = Tracer().build_source()
    before = _held()
    result: dict = {}

    def load():
        try:
            loader.load(src, cflags, [], timeout=5)
        except loader.LoadError as e:
            result["error"] = str(e)

    thread = threading.Thread(target=load)
    thread.start()
    deadline = time.monotonic() + 60
    while not (children := _compiler_children(os.getpid())) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert children, "no compiler process was started"
    children[0].send_signal(signal.SIGSTOP)
    thread.join(120)
    assert not thread.is_alive()
    assert result.get("error") == "the BPF compiler process did not finish within 5 s", result
    assert not psutil.pid_exists(children[0].pid)  # killed and reaped
    assert _held() == before
