"""The instruction-level profile (tests/bench/jitprofile.py) on a real BPF program: a raw tracepoint on
sys_enter that walks 64 entries of an array on every system call, while the command makes a few
million getppid() calls. The program's samples are found and shown with its disassembled code."""

from __future__ import annotations

import re
import sys

import pytest

from tests.bench import jitprofile

PROGRAM = r'''
import os, time
from bcc import BPF
b = BPF(text="""
BPF_ARRAY(lt_jp_arr, u64, 64);
int lt_jp_probe(struct bpf_raw_tracepoint_args *ctx) {
    u64 sum = 0;
    for (int i = 0; i < 64; i++) {
        u32 k = i;
        u64 *v = lt_jp_arr.lookup(&k);
        if (v)
            sum += *v + i;
    }
    u32 z = 0;
    u64 *v = lt_jp_arr.lookup(&z);
    if (v)
        *v = sum & 1;
    return 0;
}
""")
b.attach_raw_tracepoint(tp="sys_enter", fn_name="lt_jp_probe")
time.sleep(0.5)  # the profile's poll finds the program
end = time.monotonic() + 3
while time.monotonic() < end:
    for _ in range(10000):
        os.getppid()
'''


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_programs_samples_are_shown_on_its_disassembled_code(capsys):
    rc = jitprofile.main(["--prefix", "lt_jp_", "--top", "2", "--", sys.executable, "-c", PROGRAM])
    out = capsys.readouterr().out
    assert rc == 0, out
    m = re.search(r"^== lt_jp_probe \(tag [0-9a-f]{16}, (\d+) bytes of x86\): (\d+) samples", out, re.M)
    assert m, out
    assert int(m.group(1)) > 100 and int(m.group(2)) >= 50, out
    # Each hot offset comes with the instructions before it, the sampled one marked.
    assert re.search(r"^\s+[0-9a-f]+  > \S+", out, re.M), out
    inside = int(re.match(r"(\d+) samples inside", out).group(1))
    assert inside == int(m.group(2)), out  # no other program has the prefix
