"""The tracer owns the probes for their whole life: build, load, attach, target maps, statistics, close.

BCC compiles and loads the programs in a short-lived child process (kernel/loader.py: why); the tracer
holds their file descriptors and the maps', attaches each program to its raw tracepoint itself (one
link fd per attachment) and reads the maps through kernel/maps.py, so the agent's process never loads
LLVM. Attachment is per probe: a tracepoint the kernel lacks, or one that refuses the program, disables
only that probe and the segments that need it, and is reported. Programs are never pinned, so whatever
way the agent ends (even SIGKILL), the kernel frees them with its file descriptors.
"""

from __future__ import annotations

import ctypes as ct
import logging
import os
import time
from dataclasses import dataclass, field

from . import lookup, program, segments
from .kernel import bpfsys, features as kfeatures, headers, libbpf, loader, maps, offsets, progload
from .kernel.btf import VMLINUX, KernelBTF
from .probes import PROBES, Probe, needed
from .probestats import ProbeStats, StatsPolicy

log = logging.getLogger(__name__)

ALL_SEGMENTS = segments.mask(None)


class TracerError(RuntimeError):
    pass


@dataclass(frozen=True)
class TargetSettings:
    """Per-target tunables as the kernel reads them (struct lt_target)."""


    slow_ns: int = 1_000_000
    sample_one_in: int = 0  # spans: also 1 in N of the timed packets that are not slow; 0: none
    time_one_in: int = 1  # time 1 packet in N (chosen at its first boundary); every packet is counted
    seg_mask: int = ALL_SEGMENTS
    dir_mask: int = 0b11
    events_per_sec: int = 10

    def wanted_segments(self) -> int:
        """The segments this target measures: those asked for, of the directions asked for."""
        return self.seg_mask & segments.of_directions(self.dir_mask)


@dataclass
class ProbeStatus:
    attached: list[Probe] = field(default_factory=list)
    unavailable: list[tuple[Probe, str]] = field(default_factory=list)

    def disabled_segments(self) -> set[str]:
        return {s for p, _ in self.unavailable for s in p.feeds}


MAX_TIME_ONE_IN = 1_000_000
# How the probes attach: "typed" tracepoints read kernel memory with plain loads, "raw" ones with helper
# calls (kernels without typed tracepoints); "auto" takes typed where the kernel loads them.
TRACEPOINT_KINDS = ("auto", "typed", "raw")


def time_threshold(one_in: int) -> int:
    """struct lt_target's time_below: the probes time a packet when a random u32 is below it, so with
    probability floor(2^32 / N) / 2^32 (1/N within 2^-32), without a divide; 2^32 (N = 1) times every
    packet without drawing a random number."""
    if not 1 <= one_in <= MAX_TIME_ONE_IN:
        raise ValueError(f"time 1 packet in N: N must be 1 to {MAX_TIME_ONE_IN}, not {one_in}")
    return (1 << 32) // one_in


def check_privileges() -> None:
    if os.geteuid() != 0:
        raise TracerError("latencytrace-agent must run as root (or with CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN)")


class Tracer:
    def __init__(self, sizes: program.Sizes = program.Sizes(), btf: KernelBTF | None = None,
                 probes: tuple[Probe, ...] = PROBES, btf_path: str | os.PathLike = VMLINUX,
                 stats_policy: StatsPolicy = StatsPolicy(), tracepoints: str = "auto"):
        if tracepoints not in TRACEPOINT_KINDS:
            raise ValueError(f"tracepoints: one of {', '.join(TRACEPOINT_KINDS)}, not {tracepoints!r}")
        self.tracepoints = tracepoints  # asked for; after build_source(), what the probes use
        self._fallback = False  # auto chose typed: fall back to raw if the verifier refuses a typed program
        self.sizes = sizes
        self.btf = btf
        self.btf_path = btf_path
        self.probes = probes
        self.loaded: loader.Loaded | None = None  # the programs' and maps' file descriptors
        self._tables: dict[str, maps.Map] = {}
        self._links: dict[Probe, int] = {}  # attached probe -> its raw tracepoint link fd
        self.status = ProbeStatus()
        self.attach_seconds: float | None = None
        self.stats = ProbeStats(stats_policy)
        self._prog_info: bpfsys.ProgInfoReader | None = None
        self.macros: dict[str, int | str] = {}
        self._lookup_written: dict[int, tuple[int, tuple[str, ...]]] = {}  # what the lookup tables hold
        self._gen = 0  # the generation of the lookup tables, in each CPU's lt_cpu entry
        self._quiet_runs = False  # and its flag: NET_RX runs may be quiet (program.GEN_QUIET_RUNS)
        self._usable: list[Probe] = []
        self._wanted = 0  # the segments want() was last asked for
        self._nic_irqs: set[int] = set()  # what lt_nic_irq holds
        self._hostdevs: dict[str, set[int]] = {}  # kind -> the ifindexes lt_hostdev marks

    # -- lifecycle ---------------------------------------------------------------------------
    def build_source(self) -> tuple[str, list[str], kfeatures.Features]:
        """Resolve offsets and features for this kernel; return (source, cflags, features)."""
        if self.btf is None:
            self.btf = KernelBTF.load(self.btf_path)
        feats = kfeatures.probe(self.btf, self.probes)
        if self.tracepoints == "auto":
            why = progload.probe(self.btf.tracepoint_type_id("netif_receive_skb") or 0)
            self.tracepoints = "raw" if why else "typed"
            self._fallback = not why  # a typed program refused later: every program goes raw (start())
            if why:
                log.info("typed tracepoints not available (%s): probes read kernel memory with helper calls", why)
        not_specified = next((v for v, n in self.btf.drop_reasons.items() if n == "NOT_SPECIFIED"), None)
        self.macros = program.macros(offsets.resolve(self.btf), self.sizes, feats.kfree_skb_reason_arg,
                                     typed=self.tracepoints == "typed", not_specified_reason=not_specified)
        return program.source(), program.cflags(self.macros), feats

    def start(self) -> ProbeStatus:
        started = time.monotonic()
        check_privileges()
        headers.ensure()
        src, cflags, feats = self.build_source()
        self.loaded = self._load(src, cflags, feats)
        if self.tracepoints == "typed" and self.loaded.failed and self._fallback:
            # The kernel has typed tracepoints but its verifier refused some of ours (an older verifier
            # lacks what they use): all as raw tracepoint programs then, one source, one set of maps.
            log.warning("typed tracepoint programs refused (%s): loading raw tracepoint programs instead",
                        "; ".join(self.loaded.failed.values()))
            self.loaded.close()
            self.tracepoints = "raw"
            src, cflags, feats = self.build_source()
            self.loaded = self._load(src, cflags, feats)
        log.debug("probes compiled by process %d (peak %d MiB)", self.loaded.compiler_pid,
                  self.loaded.compiler_peak_rss >> 20)
        log.info("probes load as %s tracepoint programs", self.tracepoints)
        try:
            self._prog_info = bpfsys.ProgInfoReader(self.btf)
            self.stats.start()
            self.status = ProbeStatus(unavailable=[(u.probe, u.reason) for u in feats.unavailable])
            self._usable = list(feats.usable)
            # Everything at first (every program loaded and verified in the child, so that problems show
            # at start); want() narrows it to what the targets ask for.
            self.want(ALL_SEGMENTS)
        except BaseException:
            self.close()
            raise
        self.attach_seconds = time.monotonic() - started
        for p, why in self.status.unavailable:
            log.warning("probe %s on %s disabled: %s (segments affected: %s)", p.program, p.tracepoint, why,
                        ", ".join(p.feeds) or "none")
        return self.status

    def _load(self, src: str, cflags: list[str], feats: kfeatures.Features) -> loader.Loaded:
        names = sorted({p.program for p in feats.usable})
        tails = program.tail_calls(names)
        try:
            if self.tracepoints == "typed":
                # A typed program is loaded for its tracepoint: once per attachment (as loaded, named by
                # _key), the programs as the raw loads name them.
                typed = {self._key(p): (p.program, self.btf.tracepoint_type_id(p.name)) for p in feats.usable}
                return loader.load(src, cflags, [], tails, typed=typed)
            return loader.load(src, cflags, names, tails)
        except loader.LoadError as e:
            raise TracerError(f"{e} (run with --dump-bpf to see the source)") from e

    def want(self, seg_mask: int) -> None:
        """Attach the probes that the segments in `seg_mask` need and detach the others, so that what
        nobody asks for costs nothing. Programs stay loaded: attaching again is cheap."""
        self._wanted = seg_mask
        # Quiet NET_RX runs only while the hook that ends each run is attached: off before it goes, on
        # once it is there (program.GEN_QUIET_RUNS).
        self._set_quiet_runs(self._quiet_runs and any(p.program == program.QUIET_RUNS_END and needed(p, seg_mask)
                                                      for p in self._usable))
        for p in list(self._usable):
            on = p in self.status.attached
            if needed(p, seg_mask) and not on:
                self._attach(p)
            elif not needed(p, seg_mask) and on:
                os.close(self._links.pop(p))
                self.status.attached.remove(p)
        self._set_quiet_runs(any(p.program == program.QUIET_RUNS_END for p in self.status.attached))

    def _set_quiet_runs(self, on: bool) -> None:
        if on != self._quiet_runs:
            self._quiet_runs = on
            self.forget_devices()  # the flag travels in the generation word

    def pending(self) -> list[Probe]:
        """Probes the wanted segments need that are neither attached nor known to be unavailable."""
        return [p for p in self._usable if needed(p, self._wanted) and p not in self.status.attached]

    def _key(self, p: Probe) -> str:
        """The loaded program probe `p` attaches: its function's, or in typed mode, when the function
        also serves an earlier row of the probe table, one loaded for this tracepoint alone."""
        first = next(q for q in self.probes if q.program == p.program)
        return p.program if self.tracepoints != "typed" or first == p else f"{p.program}@{p.name}"

    def _attach(self, p: Probe) -> None:
        try:
            why = self.loaded.failed.get(self._key(p))
            if why is not None:
                raise OSError(why)
            self._links[p] = libbpf.raw_tracepoint_open(p.name, self.loaded.programs[self._key(p)],
                                                        typed=self.tracepoints == "typed")
            self.status.attached.append(p)
        except OSError as e:
            self._usable.remove(p)
            self.status.unavailable.append((p, f"attach failed: {e}"))

    def close(self) -> None:
        """Detach and unload everything: no program, link or map of this tracer stays in the kernel."""
        for t in self._tables.values():
            t.close()
        self._tables = {}
        for fd in self._links.values():
            os.close(fd)
        self._links = {}
        self.status.attached = []
        if self.loaded is not None:
            self.loaded.close()
            self.loaded = None
        self._lookup_written = {}  # the maps went with the programs
        self._gen = 0
        self._quiet_runs = False
        self._nic_irqs = set()
        self._hostdevs = {}
        self.stats.close()

    @property
    def running(self) -> bool:
        return self.loaded is not None

    def __enter__(self) -> Tracer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- maps ----------------------------------------------------------------------------------
    def table(self, name: str) -> maps.Map:
        """The probes' map `name`, with the item access of a BCC table (kernel/maps.py)."""
        t = self._tables.get(name)
        if t is None:
            if self.loaded is None:
                raise TracerError("the tracer is not running")
            spec = self.loaded.maps.get(name)
            if spec is None:
                raise KeyError(name)
            t = self._tables[name] = maps.open_map(spec.name, spec.fd, spec.key, spec.value, spec.event)
        return t

    def set_target(self, slot: int, settings: TargetSettings) -> None:
        t = self.table("lt_targets")
        v = t.Leaf()
        v.slow_ns, v.sample_one_in = settings.slow_ns, settings.sample_one_in
        v.time_below = time_threshold(settings.time_one_in)
        v.seg_mask, v.dir_mask, v.events_per_sec = settings.seg_mask, settings.dir_mask, settings.events_per_sec
        t[ct.c_int(slot)] = v

    def clear_target(self, slot: int) -> None:
        t = self.table("lt_targets")
        t[ct.c_int(slot)] = t.Leaf()  # dir_mask 0: every probe ignores the slot

    def write_lookup(self, entries: dict[int, tuple[int, tuple[str, ...]]]) -> None:
        """Make the probes' lookup tables map each netns inode (and its pod IPs) to its slot, then
        invalidate their per-CPU caches; nothing is written when the tables already hold `entries`."""
        if entries == self._lookup_written:
            return
        netns, ip4, ip6 = lookup.tables(entries)
        bits = self.sizes.lookup_bits
        lookup.LookupTable(self.table("lt_netns"), 1, bits).write(netns)
        lookup.LookupTable(self.table("lt_ip4"), 1, bits).write(ip4)
        lookup.LookupTable(self.table("lt_ip6"), 4, bits).write(ip6)
        self.forget_devices()  # written last
        self._lookup_written = dict(entries)

    def forget_devices(self) -> None:
        """Make every CPU drop the answers its caches hold (lt_filter_dev, lt_filter_net: a device's or a
        namespace's target slot, kept until its entry's generation changes): after the lookup tables
        change, and when the host has a device it did not have, which may sit at a freed device's address
        and would inherit its answer. One store into each CPU's entry."""
        self._gen = (self._gen + 1) % program.GEN_QUIET_RUNS
        word = self._gen | (program.GEN_QUIET_RUNS if self._quiet_runs else 0)
        cpus = self.table("lt_cpu")
        for cpu in range(cpus.max_entries):
            cpus.store(cpu, "want_gen", word)

    def set_nic_irqs(self, irqs: list[int]) -> None:
        t = self.table("lt_nic_irq")  # an array indexed by IRQ number: 1 for a NIC queue's
        wanted = {irq for irq in irqs if 0 <= irq < program.MAX_IRQ}
        for irq in self._nic_irqs - wanted:
            t[ct.c_uint32(irq)] = ct.c_uint8(0)
        for irq in wanted - self._nic_irqs:
            t[ct.c_uint32(irq)] = ct.c_uint8(1)
        self._nic_irqs = wanted

    def set_uplinks(self, ifindexes: list[int]) -> None:
        """Mark the host's uplinks (ifindexes in the host's namespace): a packet forwarded from one into a
        traced pod gets its host-side boundary where the host queues it toward the pod (bpf/tx.bpf.c)."""
        self._set_hostdevs("UPLINK", ifindexes)

    def set_pod_links(self, ifindexes: list[int]) -> None:
        """Mark the host sides of the traced pods' veths: a packet forwarded onto one that was not addressed
        to the pod when the host received it (a Service's virtual IP, DNATed on this node) gets its
        host-side boundary there (bpf/tx.bpf.c)."""
        self._set_hostdevs("POD", ifindexes)

    def _set_hostdevs(self, kind: str, ifindexes: list[int]) -> None:
        wanted = {i for i in ifindexes if 0 < i < program.MAX_HOSTDEV_IFINDEX}
        held = self._hostdevs.get(kind, set())
        if wanted == held:
            return
        t = self.table("lt_hostdev")  # one bitmap per kind: bit i % 64 of word i // 64 of the kind's words
        base = program.HOSTDEV_KINDS.index(kind) * (program.MAX_HOSTDEV_IFINDEX // 64)
        for w in {i // 64 for i in wanted | held}:
            bits = sum(1 << (i % 64) for i in wanted if i // 64 == w)
            t[ct.c_uint32(base + w)] = ct.c_uint64(bits)
        self._hostdevs[kind] = wanted

    # -- statistics ----------------------------------------------------------------------------
    def probe_stats(self) -> dict[str, bpfsys.ProgStats]:
        """Kernel-measured run count and run time of each loaded program (summed over attachments)."""
        if self.loaded is None or self._prog_info is None:
            return {}
        return {name: self._prog_info.read(fd) for name, fd in self.loaded.programs.items()}

    def program_fds(self) -> dict[str, int]:
        """Function name -> file descriptor of every loaded program."""
        return dict(self.loaded.programs) if self.loaded is not None else {}

    def program_ids(self) -> list[int]:
        return [bpfsys.prog_id(fd) for fd in self.program_fds().values()]
