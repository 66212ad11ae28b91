#!/usr/bin/env python3
"""pykvmm benchmarks (issue 6): ``make bench`` or ``python scripts/bench.py [--quick]``.

Prints a table and writes every number to bench-results.json (``--out``). Rows, each measured
side by side in one run (variants are interleaved repeat by repeat, so that the noise of a
shared machine hits them alike; the figure given is the median over the repeats):

 1. PIO exit round trip: pykvmm's run loop on guest/pio_loop vs a C loop (scripts/pio_ref.c,
    compiled here with ``cc -O2``: the same `out; dec; jnz` long-mode loop, irqchip and sync
    regs) vs the bare cffi ``Vcpu.raw_run()`` loop; and what one guest instruction costs (the
    C loop with 64 nops more). Target: pykvmm <= 1.15x C.
 2. Plane round trip: VtlCall + VtlReturn (guest/vtl_roundtrip, personalities vtl and vmpl)
    and the bare policy's switch hypercall (guest/bench_switch), in us and ioctls per round trip
    (counted by wrapping pykvmm.kvm's ioctl function), against two raw exits of row 1, against
    the same guest driven by a bare two-KVM_RUN Python loop, and against C loops doing the
    same KVM_RUNs alternating between two VMs (plus pykvmm's extra ioctls). Target: <= 3 raw exits.
 3. Cross-plane IPI latency (p50/p90/p99, host timestamps from a trace sink):
    cross-VTL SendSyntheticClusterIpi in guest/vtl_pingpong (sender's hypercall exit to the
    receiver's handler's first exit, its steps, and round trip / 2); the host-delivered MSI
    into an inactive plane (guest/bench_ipi mode 1); an in-kernel x2APIC IPI into an inactive
    plane on multivm (guest/bench_ipi mode 0: only found by the IRR scan on a kick), for
    kick_interval 1 ms and a smaller one; and the C floor of the same kick pattern (pio_ref -k).
    The wake-up delay of a halted VTL0 for an interrupt into its VTL1 (guest/vtl_wake_bench), per
    source: in-kernel x2APIC IPI, host MSI, SendSyntheticClusterIpi (issue 10).
    Target: cross-VTL p99 < 10 raw exits.
 4. Start-up: ``python -m pykvmm run`` (the demo) from process start to the guest's first exit,
    to DONE and to exit, and Machine(...) construction alone. Target: < 0.5 s to the first
    instruction.
 5. Scaling: plane switches per second for 1/2/4/8 vCPUs x 2/4/8 planes (guest/bench_switch),
    ioctls per round trip by plane count; memory per added plane (fresh processes: VmRSS, and
    the kernel's share from /proc/meminfo).
 6. Tracing: the PIO loop with trace=None vs a list-append sink.
 7. Trace export (scripts/bench_trace.py): Chrome export of a 100k-event trace vs JSON lines of
    the same events, and the time growth from 25k to 100k events (linear: 4x). Target: < 5 s.

Ratios are medians of per-repeat ratios (both sides measured back to back). "raw exit" is
the raw cffi KVM_RUN round trip of row 1 (or of row 2's own repeats there).
Everything runs on the real /dev/kvm. ``--quick`` uses tiny counts (the smoke test runs it);
its numbers mean nothing. Internal modes (``--_rss-probe``) are used by the script itself.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pykvmm import kvm as K  # noqa: E402
from pykvmm.uapi import IOCTLS, constants as C  # noqa: E402
from pykvmm.vmm import abi, events as ev, loader  # noqa: E402
from pykvmm.vmm.machine import Machine, MachineConfig  # noqa: E402
from pykvmm.x86 import apic  # noqa: E402

BENCH_SEND_IPI = 0x80B0          # guest/bench_ipi's host-delivered IPI hypercall (registered here)
BENCH_IPI_VECTOR = 0x50
PIO_REF_SRC = REPO / "scripts" / "pio_ref.c"

FULL = dict(repeats=11, pio_n=20000, switch_n=2500, vtl_n=1500, c_switch_n=12000,
            ipi_rounds=500, pingpong_n=500, startup_runs=7, build_runs=10, wide_runs=3, wide_vcpus=64,
            scale_n=1500, scale_vcpus=(1, 2, 4, 8), scale_planes=(2, 4, 8), rss_planes=(1, 2, 4, 8), rss_copies=4,
            small_kick=1e-4, trace_events=100_000)
QUICK = dict(repeats=2, pio_n=300, switch_n=30, vtl_n=30, c_switch_n=300,
             ipi_rounds=8, pingpong_n=8, startup_runs=1, build_runs=2, wide_runs=1, wide_vcpus=8,
             scale_n=5, scale_vcpus=(1, 2, 4, 8), scale_planes=(2, 4, 8), rss_planes=(1, 2), rss_copies=1,
             small_kick=1e-4, trace_events=4000)

TARGETS = {
    "wide_hello_s": 5.0,            # `pykvmm run hello --vcpus 64 --planes 16`, process start to exit
    "pio_ratio": 1.15,              # pykvmm / C per PIO exit
    "round_trip_raw_exits": 3.0,    # plane round trip in raw exits
    "ipi_p99_raw_exits": 10.0,      # cross-VTL IPI p99 in raw exits
    "first_instruction_s": 0.5,     # process start to the guest's first exit
    "trace_export_100k_s": 5.0,     # Chrome export of 100k trace events (CPU s)
}


# ---- small helpers -----------------------------------------------------------------------------

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def median(xs):
    return statistics.median(xs) if xs else None


def percentile(xs, q: float):
    """Nearest-rank percentile (q in 0..100) of a non-empty list; None if empty."""
    if not xs:
        return None
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def pcts(xs_s) -> dict:
    """Percentiles of a list of seconds, in microseconds."""
    us = [x * 1e6 for x in xs_s]
    return {"n": len(us), "p50_us": percentile(us, 50), "p90_us": percentile(us, 90),
            "p99_us": percentile(us, 99), "min_us": min(us) if us else None,
            "max_us": max(us) if us else None}


def rnd(x, nd=2):
    if isinstance(x, float):
        return round(x, nd)
    if isinstance(x, dict):
        return {k: rnd(v, nd) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [rnd(v, nd) for v in x]
    return x


def image(name: str) -> bytes:
    return loader.load_image(loader.bundled_guest(name))


def have_vtl() -> bool:
    from pykvmm.vmm.policy import POLICIES
    return "vtl" in POLICIES


def run_machine(img: bytes, timeout: float = 120.0, setup=None, counts=None, **config):
    """Build (untimed), run (timed with perf_counter around Machine.run), close.
    ``counts``: a Counter that receives the ioctls made during the run (not the build).
    Returns (seconds, RunResult, machine)."""
    config.setdefault("quiet", True)
    with Machine(img, MachineConfig(**config)) as m:
        if setup is not None:
            setup(m)
        with count_ioctls(counts) if counts is not None else contextlib.nullcontext():
            t0 = time.perf_counter()
            r = m.run(timeout)
            dt = time.perf_counter() - t0
    if not r.ok:
        detail = r.failure.describe() if r.failure else (r.crash.reason if r.crash else "")
        raise RuntimeError(f"benchmark guest did not finish: {r.status.name} {detail}")
    return dt, r, m


IOCTL_NAMES = {e.code: name for name, e in IOCTLS.items()}


@contextlib.contextmanager
def count_ioctls(counts: collections.Counter):
    """Count every ioctl pykvmm makes (by request name) by wrapping the ioctl function that
    pykvmm.kvm calls: ``_ioctl`` (libc's ioctl through a fixed prototype) or ``libc.ioctl``."""
    def counted(real):
        def ioctl(fd, code, arg):
            counts[IOCTL_NAMES.get(code, hex(code))] += 1
            return real(fd, code, arg)
        return ioctl

    if hasattr(K, "_ioctl"):
        real = K._ioctl
        K._ioctl = counted(real)
        try:
            yield counts
        finally:
            K._ioctl = real
        return
    real_libc = K.libc

    class Counting:
        def __getattr__(self, name):
            return getattr(real_libc, name)
        ioctl = staticmethod(counted(real_libc.ioctl))

    K.libc = Counting()
    try:
        yield counts
    finally:
        K.libc = real_libc


def per(counts: collections.Counter, n: int) -> dict:
    return {k: round(v / n, 3) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}


# ---- the C reference -------------------------------------------------------------------------------

class CRef:
    def __init__(self, workdir: Path):
        self.path = None
        self.error = None
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            self.error = "no C compiler (cc) on PATH"
            return
        out = workdir / "pio_ref"
        res = subprocess.run([cc, "-O2", "-Wall", "-o", str(out), str(PIO_REF_SRC), "-lpthread"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            self.error = f"cc failed: {res.stderr.strip()[:500]}"
            return
        self.path = out

    def batch(self, n: int, *opts: str, repeats: int = 1) -> list[float]:
        """us per exit of each batch."""
        res = subprocess.run([str(self.path), *opts, "-r", str(repeats), str(n)], capture_output=True, text=True,
                             timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"pio_ref {' '.join(opts)} failed: {res.stderr.strip()}")
        return json.loads(res.stdout)["batches_us_per_exit"]

    def kick(self, n: int, max_wait_us: int) -> dict:
        res = subprocess.run([str(self.path), "-i", "-s", "1", "-k", "-K", str(max_wait_us), str(n)],
                             capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"pio_ref -k failed: {res.stderr.strip()}")
        return json.loads(res.stdout)


# ---- row 1 and row 6: PIO exits, tracing --------------------------------------------------------

def paired(samples: dict, a: str, b: str, op) -> float | None:
    """Median over the repeats of op(a[r], b[r]): both measured in the same repeat, so the
    load of the moment (this machine is shared) affects both alike."""
    xs, ys = samples.get(a) or [], samples.get(b) or []
    vals = [op(x, y) for x, y in zip(xs, ys)]
    return median(vals) if vals else None


def spread(xs) -> dict:
    """Median and quartiles of the repeats."""
    if not xs:
        return {}
    return {"median": median(xs), "p25": percentile(xs, 25), "p75": percentile(xs, 75), "n": len(xs)}


class RawExit:
    """A pio_loop vCPU kept around for raw cffi KVM_RUN batches (us per exit)."""

    def __init__(self):
        self.m = Machine(image("pio_loop"), MachineConfig(arg=1 << 40, quiet=True))
        self.v = self.m.threads[0].cpu.plane0
        self.batch(2000)

    def batch(self, n: int) -> float:
        rr = self.v.raw_run
        t0 = time.perf_counter()
        for _ in range(n):
            rr()
        return (time.perf_counter() - t0) / n * 1e6

    def close(self):
        self.m.close()


class RawPlanes:
    """The floor of a plane round trip for the same guest: its two plane vCPUs driven straight
    from Python, two KVM_RUNs (Vcpu.run) per round trip and the status written through the
    sync regs, nothing else (no IRR scans, no dispatcher, no state copy, no locks)."""

    def __init__(self, guest: str, personality: str):
        self.m = Machine(image(guest), MachineConfig(planes=2, personality=personality, arg=1 << 40, quiet=True))
        cpu = self.m.threads[0].cpu
        self.v = [cpu.plane_vcpu(0), cpu.plane_vcpu(1)]
        for p in (0, 1):      # VTL guests read why they were entered: always a VtlCall here
            self.m.memory.write_u32(abi.control_page(0, p) + abi.VTL_ENTRY_REASON, abi.VTL_ENTRY_VTL_CALL)
        self.cur = 0
        self.batch(100)

    def batch(self, n: int) -> float:
        """us per round trip over n round trips."""
        v, cur, hc = self.v, self.cur, abi.PORT_HYPERCALL
        switches = 0
        t0 = time.perf_counter()
        while switches < 2 * n:
            ex = v[cur].run()
            if type(ex) is K.IoOut:
                if ex.port == hc:
                    regs = v[cur].regs
                    regs.rax = 0
                    v[cur].mark_dirty("regs")
                    cur ^= 1
                    switches += 1
            else:
                raise RuntimeError(f"raw plane driver: unexpected {ex.describe()}")
        self.cur = cur
        return (time.perf_counter() - t0) / n * 1e6

    def close(self):
        self.m.close()


def row_pio(P, cref: CRef, raw: RawExit) -> tuple[dict, dict]:
    log("row 1/6: PIO exit round trip, tracing on/off")
    img = image("pio_loop")
    n = P["pio_n"]
    sync = C.KVM_SYNC_X86_REGS      # what pykvmm asks for with one plane (personality none)
    c_opts = ["-m", "long", "-i", "-s", str(sync)]

    def pykvmm_time(trace: bool, arg: int) -> float:
        sink = [] if trace else None
        dt, r, _ = run_machine(img, arg=arg, trace=sink.append if trace else None)
        return dt

    # Fixed cost of a run (thread start, DONE, stop) measured with 1 exit, subtracted below.
    fixed = {t: median([pykvmm_time(t, 1) for _ in range(3)]) for t in (False, True)}
    samples = collections.defaultdict(list)
    for rep in range(P["repeats"]):
        if cref.path:
            samples["c"] += cref.batch(n, *c_opts)
            samples["c_real_mode"] += cref.batch(n, "-m", "real")
            # what one guest instruction costs here (kvm_pvm emulates them): 64 nops more per exit
            nn = max(50, n // 16)
            samples["c_guest_insn"].append((cref.batch(nn, *c_opts, "-n", "64")[0] - cref.batch(nn, *c_opts)[0]) / 64)
        samples["raw_cffi"].append(raw.batch(n))
        samples["pykvmm"].append((pykvmm_time(False, n) - fixed[False]) / (n - 1) * 1e6)
        samples["pykvmm_traced"].append((pykvmm_time(True, n) - fixed[True]) / (n - 1) * 1e6)
    counts = collections.Counter()
    _, r, _ = run_machine(img, arg=n, counts=counts)
    med = {k: median(v) for k, v in samples.items()}
    div = lambda x, y: x / y  # noqa: E731
    row1 = {
        "n_exits": n, "repeats": P["repeats"],
        "c_us": med.get("c"), "c_config": "long mode, in-kernel irqchip, sync regs " + str(sync),
        "c_real_mode_us": med.get("c_real_mode"),
        "guest_instruction_us": med.get("c_guest_insn"),
        "raw_cffi_us": med["raw_cffi"], "pykvmm_us": med["pykvmm"],
        "pykvmm_over_c": paired(samples, "pykvmm", "c", div),
        "raw_cffi_over_c": paired(samples, "raw_cffi", "c", div),
        "pykvmm_over_raw_cffi": paired(samples, "pykvmm", "raw_cffi", div),
        "python_overhead_us": paired(samples, "pykvmm", "c", lambda x, y: x - y),
        "spread_us": {k: spread(v) for k, v in samples.items()},
        "pykvmm_fixed_run_cost_ms": fixed[False] * 1e3,
        "ioctls_per_exit": per(counts, r.exits),
        "samples_us": samples, "c_error": cref.error,
        "note": "ratios are medians of per-repeat ratios (C, raw and pykvmm measured back to back)",
    }
    row6 = {
        "n_exits": n, "trace_off_us": med["pykvmm"], "trace_on_us": med["pykvmm_traced"],
        "overhead_us": paired(samples, "pykvmm_traced", "pykvmm", lambda x, y: x - y),
        "overhead_pct": paired(samples, "pykvmm_traced", "pykvmm", lambda x, y: (x / y - 1) * 100),
        "sink": "list.append (one TraceEvent per exit plus hypercalls/ucalls)",
    }
    return row1, row6


# ---- row 2: plane round trip ----------------------------------------------------------------------

def row_round_trip(P, cref: CRef, raw: RawExit) -> dict:
    log("row 2: plane round trip")
    kinds = {"bare_switch": ("bench_switch", "none", P["switch_n"])}
    if have_vtl() and (loader.GUEST_DIR / "vtl_roundtrip.S").exists():
        kinds["vtl_call_return"] = ("vtl_roundtrip", "vtl", P["vtl_n"])
        kinds["vmpl_call_return"] = ("vtl_roundtrip", "vmpl", P["vtl_n"])
    fixed = {}
    for k, (g, pers, _) in kinds.items():
        fixed[k] = median([run_machine(image(g), vcpus=1, planes=2, personality=pers, arg=1)[0] for _ in range(3)])
    samples = collections.defaultdict(list)
    # C: the same exits alternating between two VMs (the kernel part of a multivm switch), with
    # the guest's exits from a called stub as pykvmm's hypercall page; and with the extra ioctls
    # pykvmm makes per round trip (an IRR scan per exit, plus GET_DEBUGREGS/GET_XSAVE for vtl).
    base = ["-m", "long", "-i", "-s", "1"]
    c_variants = {"c_two_vms": ["-v", "2"], "c_two_vms_scan": ["-v", "2", "-g", "lD"],
                  "c_two_vms_vtl_ioctls": ["-v", "2", "-g", "ldxD", "-s", "3"]}
    drivers = {k: RawPlanes(g, pers) for k, (g, pers, _) in kinds.items()}
    try:
        for rep in range(P["repeats"]):
            samples["raw_exit"].append(raw.batch(P["c_switch_n"] // 4))
            if cref.path:
                samples["c_exit"] += cref.batch(P["c_switch_n"] // 2, *base)
            for k, (g, pers, n) in kinds.items():
                samples[k + "_raw_driver"].append(drivers[k].batch(n))
                dt = run_machine(image(g), vcpus=1, planes=2, personality=pers, arg=n)[0]
                samples[k].append((dt - fixed[k]) / (n - 1) * 1e6)
            if cref.path:
                for k, opts in c_variants.items():
                    samples[k].append(2 * cref.batch(P["c_switch_n"], *base, *opts)[0])   # two exits per round trip
    finally:
        for d in drivers.values():
            d.close()
    raw_exit_us, c_exit_us = median(samples["raw_exit"]), median(samples["c_exit"])
    out = {"repeats": P["repeats"], "raw_exit_us": raw_exit_us, "c_exit_us": c_exit_us,
           "floor_two_raw_exits_us": 2 * raw_exit_us,
           "floor_two_c_exits_us": 2 * c_exit_us if c_exit_us else None,
           "vtl_available": have_vtl(),
           "note": "raw_exits / c_exits: medians of per-repeat ratios to a raw cffi / C PIO exit measured in "
                   "the same repeat",
           "spread_us": {k: spread(v) for k, v in samples.items()}, "samples_us": samples}
    div = lambda x, y: x / y  # noqa: E731
    for k, (g, pers, n) in kinds.items():
        counts = collections.Counter()
        _, r, _ = run_machine(image(g), vcpus=1, planes=2, personality=pers, arg=n, counts=counts)
        out[k] = {"guest": g, "personality": pers, "round_trips": n, "us": median(samples[k]),
                  "raw_driver_us": median(samples[k + "_raw_driver"]),
                  "over_raw_driver_us": paired(samples, k, k + "_raw_driver", lambda x, y: x - y),
                  "raw_exits": paired(samples, k, "raw_exit", div),
                  "c_exits": paired(samples, k, "c_exit", div),
                  "ioctls_per_round_trip": round(sum(counts.values()) / n, 3),
                  "ioctls_by_name": per(counts, n), "exits_per_round_trip": round(r.exits / n, 3),
                  "stats": {key: r.stats.get(key) for key in ("state_ioctls", "shared_state_copies")
                            if key in r.stats}}
    for k in c_variants:
        if samples.get(k):
            out[k + "_us"] = median(samples[k])
    out["c_variants"] = {k: " ".join(base + v) for k, v in c_variants.items()}
    return out


# ---- row 3: cross-plane IPI latency ---------------------------------------------------------------

def _streams(events):
    by_vcpu = collections.defaultdict(list)
    for e in events:
        if e.vcpu >= 0:
            by_vcpu[e.vcpu].append(e)
    return by_vcpu


def _marker_exits(stream, plane: int, codes: set[int]) -> list[float]:
    """Times of the exits that were hypercalls with one of ``codes`` made by ``plane``: the EXIT
    event just before each such HYPERCALL event in the vCPU's own (ordered) stream."""
    out, last_exit = [], None
    for e in stream:
        if e.kind == ev.EXIT:
            last_exit = e
        elif e.kind == ev.HYPERCALL and e.plane == plane and e.details.get("code") in codes:
            if last_exit is not None and last_exit.plane == plane:
                out.append(last_exit.t)
            last_exit = None
    return out


def _interrupt_entries(stream, plane: int) -> tuple[list[float], list[float]]:
    """(switch times, handler times): every switch into ``plane`` for an interrupt, and the
    first exit of ``plane`` after it (the handler's first exit)."""
    switches, handlers, waiting = [], [], False
    for e in stream:
        if e.kind == ev.SWITCH and e.details.get("to") == plane and e.details.get("why") == "interrupt":
            switches.append(e.t)
            waiting = True
        elif waiting and e.kind == ev.EXIT and e.plane == plane and "Interrupted" not in str(e.details.get("exit")):
            handlers.append(e.t)
            waiting = False
    return switches, handlers


def _pair(starts: list[float], ends: list[float], limits: list[float] | None = None) -> list[float]:
    """For each start, the delay to the first end at or after it (and before the matching
    limit, if given: e.g. the next start, or the receiver's answer); starts with none are left out."""
    import bisect
    out = []
    ends = sorted(ends)
    for k, a in enumerate(starts):
        i = bisect.bisect_left(ends, a)
        if i < len(ends) and (limits is None or k >= len(limits) or ends[i] <= limits[k]):
            out.append(ends[i] - a)
    return out


def bench_ipi(P, mode: int, kick_interval: float, delay_max: int) -> dict:
    rounds = P["ipi_rounds"]
    events: list = []
    arg = rounds | mode << 32 | delay_max << 40

    def setup(m):
        def send(cpu, plane, control, regs):
            m.pvm.planes[1].signal_msi(*apic.msi_message(regs.rdx, regs.r8))
            return abi.HV_STATUS_SUCCESS
        m.dispatcher.register(BENCH_SEND_IPI, send)

    dt, r, m = run_machine(image("bench_ipi"), vcpus=2, planes=2, personality="none", arg=arg,
                           kick_interval=kick_interval, trace=events.append, setup=setup)
    s = _streams(events)
    if mode & 3 == 0:
        sends = _marker_exits(s[0], 1, {abi.HVCALL_PYKVMM_NOP})
    else:
        sends = _marker_exits(s[0], 0, {BENCH_SEND_IPI})
    switches, handlers = _interrupt_entries(s[1], 1)
    nxt = sends[1:] + [float("inf")]
    return {"rounds": rounds, "kick_interval_us": kick_interval * 1e6, "delay_max_exits": delay_max,
            "sends_seen": len(sends), "deliveries_seen": len(switches),
            "to_switch": pcts(_pair(sends, switches, nxt)), "to_handler": pcts(_pair(sends, handlers, nxt)),
            "irr_scans": m.threads[1].cpu.irr_scans, "elapsed_s": dt}


def bench_pingpong(P) -> dict:
    n = P["pingpong_n"]
    events: list = []
    dt, r, m = run_machine(image("vtl_pingpong"), vcpus=2, planes=2, personality="vtl", arg=n,
                           trace=events.append)
    s = _streams(events)
    one_way, to_switch, rtt_half = [], [], []
    ipi = {abi.HVCALL_SEND_SYNTHETIC_CLUSTER_IPI}
    steps = collections.defaultdict(list)
    for v in (0, 1):
        other = 1 - v
        pings = _marker_exits(s[v], 0, ipi)              # VTL0 of v sends PING to VTL1 of other
        pongs = _marker_exits(s[other], 1, ipi)          # VTL1 of other answers: its handler's first exit
        switches, _ = _interrupt_entries(s[other], 1)
        one_way += [b - a for a, b in zip(pings, pongs)]     # one pong per ping, in order
        to_switch += _pair(pings, switches, pongs)         # a ping taken while VTL1 still ran has no switch
        # where the time goes: ping exit -> the receiver's VTL0 back from KVM_RUN (the kick) ->
        # switch decided and state copied -> the handler's first exit
        back = [e.t for e in s[other] if e.kind == ev.EXIT and e.plane == 0]
        for a, h in zip(pings, pongs):
            sw = _pair([a], switches, [h])
            kb = _pair([a], back, [h])
            if sw and kb and kb[0] <= sw[0]:
                steps["kick_to_receiver_exit"].append(kb[0])
                steps["receiver_exit_to_switch"].append(sw[0] - kb[0])
                steps["switch_to_handler_exit"].append(h - a - sw[0])
        rtt_half += [(b - a) / 2 for a, b in zip(pings, pings[1:])]
    return {"round_trips_per_vcpu": n, "sync_errors": [u[1] for u in r.syncs() if u[0] == 3],
            "one_way": pcts(one_way), "to_switch": pcts(to_switch), "round_trip_half": pcts(rtt_half),
            "breakdown_p50_us": {k: percentile(v, 50) * 1e6 for k, v in steps.items() if v},
            "breakdown_n": len(steps.get("kick_to_receiver_exit", [])),
            "stats": {k: r.stats.get(k) for k in ("preemptions", "ipis", "state_ioctls", "shared_state_copies")},
            "elapsed_s": dt}


WAKE_HOST_MSI = 0x80B1           # guest/vtl_wake_bench's host-MSI hypercall (registered here)
WAKE_SOURCES = {"x2apic": 0, "host_msi": 1, "synthetic": 2}


def bench_halted_wake(P, source: str, delay_max: int) -> dict:
    """Wake-up delay of a halted VTL0 for an interrupt into its VTL1 (guest/vtl_wake_bench):
    the sender's mark to the VTL1 handler's first exit, kick_interval 1 ms."""
    rounds = P["ipi_rounds"]
    events: list = []
    arg = rounds | WAKE_SOURCES[source] << 32 | delay_max << 40

    def setup(m):
        def host_msi(cpu, plane, control, regs):
            m.pvm.planes[regs.r8 >> 8 & 0xF].signal_msi(*apic.msi_message(regs.rdx, regs.r8 & 0xFF))
            return abi.HV_STATUS_SUCCESS
        m.dispatcher.register(WAKE_HOST_MSI, host_msi)

    dt, r, m = run_machine(image("vtl_wake_bench"), vcpus=2, planes=2, personality="vtl", arg=arg,
                           trace=events.append, setup=setup)
    s = _streams(events)
    if source == "x2apic":
        sends = _marker_exits(s[0], 1, {abi.HVCALL_PYKVMM_NOP})
    elif source == "host_msi":
        sends = _marker_exits(s[0], 0, {WAKE_HOST_MSI})
    else:
        sends = _marker_exits(s[0], 0, {abi.HVCALL_SEND_SYNTHETIC_CLUSTER_IPI})
    switches, handlers = _interrupt_entries(s[1], 1)
    nxt = sends[1:] + [float("inf")]
    return {"rounds": rounds, "delay_max_exits": delay_max, "sends_seen": len(sends),
            "preemptions": r.stats.get("preemptions"), "to_switch": pcts(_pair(sends, switches, nxt)),
            "to_handler": pcts(_pair(sends, handlers, nxt)), "irr_scans": m.threads[1].cpu.irr_scans,
            "elapsed_s": dt}


def row_ipi(P, cref: CRef, raw_exit_us: float, pio_us: float) -> dict:
    log("row 3: cross-plane IPI latency")
    out = {"raw_exit_us": raw_exit_us, "method": "host timestamps (time.monotonic) of TraceEvents from a "
           "list-append trace sink; the sender's mark is the exit of its hypercall (mode 0: a PykvmmNop "
           "made just before the ICR write, so it over-states by up to one entry)",
           "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    if cref.path:
        # The same pattern in C (kick a thread spinning in one VM, run the other VM to its first
        # exit): what the host's scheduler allows any userspace plane switch right now.
        d = cref.kick(P["ipi_rounds"], 300)
        out["c_kick_floor"] = {"n": d["n"], "p50_us": d["kick_latency_us"]["p50"],
                               "p90_us": d["kick_latency_us"]["p90"], "p99_us": d["kick_latency_us"]["p99"],
                               "min_us": d["kick_latency_us"]["min"], "max_us": d["kick_latency_us"]["max"]}
    if have_vtl() and (loader.GUEST_DIR / "vtl_pingpong.S").exists():
        out["vtl_pingpong"] = pp = bench_pingpong(P)
        p99 = pp["one_way"]["p99_us"]
        out["cross_vtl_p99_raw_exits"] = p99 / raw_exit_us if p99 else None
    # Random delays between sends (0..delay_max-1 PORT_NULL exits) spread the sends over the
    # kick period; the spread covers ~1.5 kick intervals.
    kicks = (1e-3, P["small_kick"])
    out["host_msi_inactive_plane"] = bench_ipi(P, 1, 1e-3, max(2, int(300 / pio_us)))
    out["in_kernel_ipi_inactive_plane"] = {}
    for k in kicks:
        d = max(2, int(1.5 * k * 1e6 / pio_us))
        out["in_kernel_ipi_inactive_plane"][f"kick_{k * 1e6:g}us"] = bench_ipi(P, 0, k, d)
    # The receiver's plane 0 making exits (so its IRR is also scanned after them, at most once
    # per scan_gap) instead of spinning without any.
    out["in_kernel_ipi_busy_receiver"] = bench_ipi(P, 4, 1e-3, max(2, int(1.5e3 / pio_us)))
    if have_vtl() and (loader.GUEST_DIR / "vtl_wake_bench.S").exists():
        out["halted_vtl0_wake"] = {src: bench_halted_wake(P, src, max(2, int(1.5e3 / pio_us)))
                                   for src in WAKE_SOURCES}
    return out


# ---- row 4: start-up --------------------------------------------------------------------------------

STARTUP_PROBE = r"""
import json, os, sys, time
t_main = time.monotonic()
import pykvmm.cli as cli
t_import = time.monotonic()
marks = {}
def sink(e):
    if e.kind not in marks:
        marks[e.kind] = e.t
    if e.kind == "lifecycle":
        marks["lifecycle_" + e.details.get("what", "")] = e.t
real = cli.MachineConfig
cli.MachineConfig = lambda **kw: real(trace=sink, **kw)
import atexit
atexit.register(lambda: os.write(2, ("BENCH-STARTUP " + json.dumps(
    {"main": t_main, "imported": t_import, "marks": marks, "end": time.monotonic()}) + "\n").encode()))
sys.argv = ["pykvmm"] + sys.argv[1:]
cli.main()
"""


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def row_startup(P) -> dict:
    log("row 4: start-up")
    demo = (loader.GUEST_DIR / f"{loader.DEMO_GUEST}.S").exists()
    args = ["run", "--quiet"] if demo else ["run", "hello", "--vcpus", "2", "--planes", "2", "--quiet"]
    label = "demo (2 vCPUs x 2 planes)" if demo else "hello --vcpus 2 --planes 2 (no demo guest yet)"
    loader.bundled_guest(loader.DEMO_GUEST if demo else "hello")      # built before timing
    probe, cli_runs = [], []
    for _ in range(P["startup_runs"]):
        t_spawn = time.monotonic()
        res = subprocess.run([sys.executable, "-c", STARTUP_PROBE, *args], capture_output=True, text=True,
                             env=_env(), timeout=60)
        t_exit = time.monotonic()
        line = next((ln for ln in res.stderr.splitlines() if ln.startswith("BENCH-STARTUP ")), None)
        if res.returncode != 0 or line is None:
            raise RuntimeError(f"start-up probe failed ({res.returncode}): {res.stderr[-800:]}")
        d = json.loads(line.split(" ", 1)[1])
        mk = d["marks"]
        probe.append({"interpreter_s": d["main"] - t_spawn, "imports_s": d["imported"] - d["main"],
                      "machine_built_s": mk.get("lifecycle_start", 0) - t_spawn,
                      "first_exit_s": mk.get("exit", 0) - t_spawn,
                      "done_s": mk.get("lifecycle_end", 0) - t_spawn, "process_exit_s": t_exit - t_spawn})
        # the same run through the unmodified entry point
        t_spawn = time.monotonic()
        res = subprocess.run([sys.executable, "-m", "pykvmm", *args], capture_output=True, text=True,
                             env=_env(), timeout=60)
        cli_runs.append({"process_exit_s": time.monotonic() - t_spawn, "status": res.returncode})
    t_py = time.monotonic()
    subprocess.run([sys.executable, "-c", "pass"], env=_env(), check=True)
    bare_python = time.monotonic() - t_py

    builds = {}
    img = image("hello")
    for vcpus, planes in ((1, 1), (2, 2)):
        ts = []
        for _ in range(P["build_runs"]):
            t0 = time.perf_counter()
            m = Machine(img, MachineConfig(vcpus=vcpus, planes=planes, quiet=True))
            ts.append(time.perf_counter() - t0)
            m.close()
        builds[f"{vcpus}x{planes}"] = median(ts) * 1e3
    wide = {}
    for planes in (2, 16):          # 64 vCPUs x 16 planes against x 2 planes, interleaved
        wide[planes] = []
    for _ in range(P["wide_runs"]):
        for planes in wide:
            t_spawn = time.monotonic()
            res = subprocess.run([sys.executable, "-m", "pykvmm", "run", "hello", "--vcpus", str(P["wide_vcpus"]),
                                  "--planes", str(planes), "--quiet"], capture_output=True, text=True,
                                 env=_env(), timeout=600)
            if res.returncode != 0:
                raise RuntimeError(f"wide hello failed ({res.returncode}): {res.stderr[-800:]}")
            wide[planes].append(time.monotonic() - t_spawn)
    keys = probe[0].keys()
    med = {k: median([p[k] for p in probe]) for k in keys}
    return {"command": "python -m pykvmm " + " ".join(args), "guest": label,
            "probe_median_s": med, "probe_runs": probe,
            "cli_process_exit_median_s": median([c["process_exit_s"] for c in cli_runs]),
            "cli_statuses": [c["status"] for c in cli_runs], "bare_python_start_s": bare_python,
            "machine_build_ms": builds,
            "wide_hello": {"vcpus": P["wide_vcpus"], "process_exit_s": {str(p): median(ts) for p, ts in wide.items()},
                           "ratio_16_over_2": median(wide[16]) / median(wide[2])},
            "method": "parent time.monotonic() before spawning vs the child's TraceEvent times (same clock): "
                      "the child is `python -c <probe>` that imports pykvmm.cli, installs a trace sink and calls "
                      "the CLI's main with the same arguments; 'first_exit' is the guest's first exit (its "
                      "first instruction ran just before)"}


# ---- row 5: scaling and memory -------------------------------------------------------------------

def vm_rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def meminfo_kb() -> dict:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0])
    return out


KERNEL_KEYS = ("Slab", "VmallocUsed", "KernelStack", "PageTables")


def rss_probe(planes: int, vcpus: int, copies: int) -> None:
    """Run in a fresh process: RSS (and the system's kernel memory) before and after building
    and running ``copies`` machines; per machine."""
    name = "bench_switch" if planes > 1 else "pio_loop"
    img = image(name)
    Machine(image("pio_loop"), MachineConfig(quiet=True)).close()    # warm imports/caches
    before, k0 = vm_rss_kb(), meminfo_kb()
    ms = [Machine(img, MachineConfig(vcpus=vcpus, planes=planes, personality="none", arg=100, quiet=True))
          for _ in range(copies)]
    built = vm_rss_kb()
    ok = all(m.run(60).ok for m in ms)
    ran, k1 = vm_rss_kb(), meminfo_kb()
    for m in ms:
        m.close()
    print(json.dumps({"planes": planes, "vcpus": vcpus, "copies": copies,
                      "built_kb": (built - before) / copies, "ran_kb": (ran - before) / copies,
                      "kernel_kb": sum(k1[k] - k0[k] for k in KERNEL_KEYS if k in k0) / copies,
                      "mem_available_drop_kb": (k0["MemAvailable"] - k1["MemAvailable"]) / copies, "ok": ok}))


def _slope(xs, ys):
    mx, my = statistics.mean(xs), statistics.mean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else None


def row_scaling(P) -> dict:
    log("row 5: scaling and memory per plane")
    img = image("bench_switch")
    grid = {}
    for planes in P["scale_planes"]:
        for vcpus in P["scale_vcpus"]:
            n = P["scale_n"]
            dt, r, _ = run_machine(img, vcpus=vcpus, planes=planes, personality="none", arg=n)
            sw = sum(r.switches.values())
            grid[f"{vcpus}x{planes}"] = {"vcpus": vcpus, "planes": planes, "switches": sw,
                                         "switches_per_s": sw / dt, "per_vcpu_switches_per_s": sw / dt / vcpus,
                                         "elapsed_s": dt}
        counts, n = collections.Counter(), max(10, P["scale_n"] // 5)
        run_machine(img, vcpus=1, planes=planes, personality="none", arg=n, counts=counts)
        grid[f"1x{planes}"]["ioctls_per_round_trip"] = per(counts, n)
    mem = []
    for planes in P["rss_planes"]:
        for vcpus in (1, 2):
            res = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_rss-probe", str(planes), str(vcpus),
                                  str(P["rss_copies"])], capture_output=True, text=True, env=_env(), timeout=120)
            if res.returncode != 0:
                raise RuntimeError(f"rss probe failed: {res.stderr[-800:]}")
            mem.append(json.loads(res.stdout.strip().splitlines()[-1]))
    per_plane = {}
    for vcpus in (1, 2):
        pts = [m for m in mem if m["vcpus"] == vcpus]
        xs = [m["planes"] for m in pts]
        per_plane[f"{vcpus}_vcpu"] = {key + "_per_plane": _slope(xs, [m[key] for m in pts])
                                     for key in ("built_kb", "ran_kb", "kernel_kb", "mem_available_drop_kb")}
    return {"switch_rate": grid, "round_trips_per_vcpu": P["scale_n"], "host_cpus": os.cpu_count(),
            "rss": mem, "rss_per_plane": per_plane,
            "rss_note": "ran_kb/built_kb: VmRSS of the pykvmm process (user space). kernel_kb: system-wide "
                        "/proc/meminfo delta of " + "+".join(KERNEL_KEYS) + " (KVM's allocations; approximate: "
                        "the machine is shared), mem_available_drop_kb likewise; all per machine, slope over planes"}


# ---- report ------------------------------------------------------------------------------------------

def verdicts(rows: dict) -> list[dict]:
    out = []

    def add(row, what, value, target, unit, lower_is_better=True):
        if value is None:
            out.append({"row": row, "what": what, "value": None, "target": target, "met": None,
                        "note": "not measured"})
            return
        met = value <= target if lower_is_better else value >= target
        miss = None if met else (value / target - 1) * 100
        out.append({"row": row, "what": what, "value": value, "target": target, "unit": unit, "met": met,
                    "miss_pct": miss})

    r7 = rows.get("7_trace_export")
    if r7:
        add(7, f"Chrome export of {r7['events']} events", r7["chrome_s"], TARGETS["trace_export_100k_s"], "s")
    r1 = rows.get("1_pio_exit")
    if r1:
        add(1, "pykvmm / C per PIO exit", r1["pykvmm_over_c"], TARGETS["pio_ratio"], "x")
    r2 = rows.get("2_plane_round_trip")
    if r2:
        key = "vtl_call_return" if "vtl_call_return" in r2 else "bare_switch"
        add(2, f"plane round trip ({key}) in raw exits", r2[key]["raw_exits"], TARGETS["round_trip_raw_exits"],
            "raw exits")
        if key != "bare_switch":
            add(2, "plane round trip (bare_switch) in raw exits", r2["bare_switch"]["raw_exits"],
                TARGETS["round_trip_raw_exits"], "raw exits")
    r3 = rows.get("3_cross_plane_ipi")
    if r3:
        if "cross_vtl_p99_raw_exits" in r3:
            add(3, "cross-VTL IPI p99 in raw exits", r3["cross_vtl_p99_raw_exits"], TARGETS["ipi_p99_raw_exits"],
                "raw exits")
        hm = r3["host_msi_inactive_plane"]["to_handler"]["p99_us"]
        add(3, "host-delivered IPI into inactive plane p99 in raw exits",
            hm / r3["raw_exit_us"] if hm else None, TARGETS["ipi_p99_raw_exits"], "raw exits")
    r4 = rows.get("4_startup")
    if r4:
        add(4, "process start to first guest exit", r4["probe_median_s"]["first_exit_s"],
            TARGETS["first_instruction_s"], "s")
        w = r4["wide_hello"]
        add(4, f"hello {w['vcpus']} vCPUs x 16 planes, process start to exit", w["process_exit_s"]["16"],
            TARGETS["wide_hello_s"], "s")
    return out


def fmt(v, nd=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def print_table(res: dict) -> None:
    rows = res["rows"]
    lines = []

    def L(row, what, value, note=""):
        lines.append((row, what, value, note))

    r1 = rows.get("1_pio_exit")
    if r1:
        L("1", "PIO exit, C reference (long mode, irqchip, sync regs)", f"{fmt(r1['c_us'], 2)} us",
          f"real mode, no irqchip: {fmt(r1['c_real_mode_us'], 2)} us; one guest instruction: "
          f"{fmt(r1['guest_instruction_us'], 2)} us")
        L("1", "PIO exit, raw cffi Vcpu.raw_run() loop", f"{fmt(r1['raw_cffi_us'], 2)} us",
          f"{fmt(r1['raw_cffi_over_c'], 2)}x C")
        L("1", "PIO exit, pykvmm run loop", f"{fmt(r1['pykvmm_us'], 2)} us",
          f"{fmt(r1['pykvmm_over_c'], 2)}x C, {fmt(r1['pykvmm_over_raw_cffi'], 2)}x raw; ioctls/exit "
          f"{fmt(sum(r1['ioctls_per_exit'].values()), 2)}")
    r2 = rows.get("2_plane_round_trip")
    if r2:
        for key, label in (("vtl_call_return", "VtlCall+VtlReturn (vtl)"), ("vmpl_call_return", "VtlCall+VtlReturn (vmpl)"),
                           ("bare_switch", "bare switch hypercall pair")):
            if key in r2:
                d = r2[key]
                L("2", f"plane round trip, {label}", f"{fmt(d['us'])} us",
                  f"{fmt(d['raw_exits'], 2)} raw exits ({fmt(d['c_exits'], 2)} C exits); "
                  f"{fmt(d['ioctls_per_round_trip'], 2)} ioctls: " + ", ".join(f"{k} {v}" for k, v in d["ioctls_by_name"].items()))
                L("2", f"  same guest, bare 2-KVM_RUN Python driver ({d['guest']})", f"{fmt(d['raw_driver_us'])} us",
                  f"pykvmm adds {fmt(d['over_raw_driver_us'])} us")
        L("2", "floor: two raw cffi exits / two C exits", f"{fmt(r2['floor_two_raw_exits_us'])} us",
          f"{fmt(r2['floor_two_c_exits_us'])} us")
        for key, label in (("c_two_vms_us", "C: 2 KVM_RUNs alternating 2 VMs"),
                           ("c_two_vms_scan_us", "C: same + GET_LAPIC per exit (pykvmm bare ioctls)"),
                           ("c_two_vms_vtl_ioctls_us", "C: same + GET_LAPIC/DEBUGREGS/XSAVE per exit")):
            if key in r2:
                L("2", label, f"{fmt(r2[key])} us", "per round trip")
    r3 = rows.get("3_cross_plane_ipi")
    if r3:
        def p(d):
            return (f"p50 {fmt(d['p50_us'])} / p90 {fmt(d['p90_us'])} / p99 {fmt(d['p99_us'])} us "
                    f"(min {fmt(d['min_us'])}, n={d['n']})")
        if "c_kick_floor" in r3:
            L("3", "C floor: kick thread spinning in VM1, run VM2 to 1st exit", p(r3["c_kick_floor"]),
              "same host, same moment")
        if "vtl_pingpong" in r3:
            pp = r3["vtl_pingpong"]
            L("3", "cross-VTL IPI (vtl_pingpong), hypercall -> handler's 1st exit", p(pp["one_way"]),
              f"p99 = {fmt(r3['cross_vtl_p99_raw_exits'], 1)} raw exits")
            L("3", "cross-VTL IPI, hypercall -> target switched to VTL1", p(pp["to_switch"]), "")
            L("3", "cross-VTL IPI, round trip / 2", p(pp["round_trip_half"]), "")
            if pp.get("breakdown_p50_us"):
                L("3", "cross-VTL IPI p50 steps (preempting a running/halted VTL0)",
                  " + ".join(f"{fmt(v)}" for v in pp["breakdown_p50_us"].values()) + " us",
                  "kick->receiver exit + ->switch (policy, state copy) + ->handler's exit")
        hm = r3["host_msi_inactive_plane"]
        L("3", "bare: hypercall->host MSI into inactive plane, to handler", p(hm["to_handler"]),
          "target spins in plane 0")
        for k, d in r3["in_kernel_ipi_inactive_plane"].items():
            L("3", f"multivm in-kernel IPI into inactive plane ({k}), to switch", p(d["to_switch"]),
              f"to handler p99 {fmt(d['to_handler']['p99_us'])} us; IRR scans/IPI {fmt(d['irr_scans'] / d['rounds'])}")
        d = r3.get("in_kernel_ipi_busy_receiver")
        if d:
            L("3", "  same, kick_1000us, receiver's plane 0 making exits", p(d["to_switch"]),
              f"IRR scans/IPI {fmt(d['irr_scans'] / d['rounds'])}")
        for src, d in r3.get("halted_vtl0_wake", {}).items():
            L("3", f"wake-up of a halted VTL0 for its VTL1 ({src}), to handler", p(d["to_handler"]),
              f"to switch p99 {fmt(d['to_switch']['p99_us'])} us; preemptions {d['preemptions']}/{d['rounds']}")
    r4 = rows.get("4_startup")
    if r4:
        m = r4["probe_median_s"]
        L("4", f"start-up {r4['guest']}: to first guest exit", f"{fmt(m['first_exit_s'], 3)} s",
          f"interpreter {fmt(m['interpreter_s'], 3)} + imports {fmt(m['imports_s'], 3)}; machine built at "
          f"{fmt(m['machine_built_s'], 3)} s")
        L("4", "start-up: to DONE / process exit", f"{fmt(m['done_s'], 3)} s",
          f"exit {fmt(m['process_exit_s'], 3)} s; plain `python -m pykvmm` exit "
          f"{fmt(r4['cli_process_exit_median_s'], 3)} s; bare python {fmt(r4['bare_python_start_s'], 3)} s")
        L("4", "Machine(...) construction", ", ".join(f"{k} {fmt(v)} ms" for k, v in r4["machine_build_ms"].items()), "")
        w = r4["wide_hello"]
        L("4", f"hello {w['vcpus']} vCPUs x 16 planes, process exit", f"{fmt(w['process_exit_s']['16'], 2)} s",
          f"x 2 planes {fmt(w['process_exit_s']['2'], 2)} s: ratio {fmt(w['ratio_16_over_2'], 2)}x")
    r5 = rows.get("5_scaling")
    if r5:
        g = r5["switch_rate"]
        for planes in sorted({d["planes"] for d in g.values()}):
            cells = [f"{d['vcpus']}v {d['switches_per_s'] / 1000:.1f}k" for d in g.values() if d["planes"] == planes]
            io = next((d.get("ioctls_per_round_trip") for d in g.values() if d["planes"] == planes and d["vcpus"] == 1), {})
            L("5", f"switches/s, {planes} planes", ", ".join(cells),
              "1 vCPU, per round trip: " + ", ".join(f"{k} {v}" for k, v in (io or {}).items()))
        pp = r5["rss_per_plane"]
        L("5", "memory per added plane: pykvmm RSS", ", ".join(f"{k.replace('_', ' ')} {fmt(v['ran_kb_per_plane'])} KiB"
                                                        for k, v in pp.items()), "VmRSS slope, after a run")
        L("5", "memory per added plane: kernel (approx.)", ", ".join(f"{k.replace('_', ' ')} {fmt(v['kernel_kb_per_plane'])} KiB"
                                                           for k, v in pp.items()),
          "Slab+Vmalloc+KernelStack+PageTables; MemAvailable drop " + ", ".join(
              f"{fmt(v['mem_available_drop_kb_per_plane'])}" for v in pp.values()) + " KiB")
    r7 = rows.get("7_trace_export")
    if r7:
        L("7", f"trace export, {r7['events']} events: Chrome / JSON lines",
          f"{fmt(r7['chrome_s'], 2)} / {fmt(r7['jsonl_s'], 2)} s",
          f"{fmt(r7['chrome_vs_jsonl'], 1)}x JSON lines; {r7['events'] // 4} -> {r7['events']} events "
          f"{fmt(r7['growth_n_over_n4'], 1)}x time (linear 4x); CPU time")
    r6 = rows.get("6_tracing")
    if r6:
        L("6", "PIO exit, trace off / list-append sink", f"{fmt(r6['trace_off_us'], 2)} / {fmt(r6['trace_on_us'], 2)} us",
          f"+{fmt(r6['overhead_us'], 2)} us ({fmt(r6['overhead_pct'], 1)}%)")
    w1 = max(len(x[1]) for x in lines) if lines else 10
    w2 = max(len(x[2]) for x in lines) if lines else 10
    print(f"pykvmm bench ({'quick: numbers mean nothing' if res['meta']['quick'] else 'full'}) -- "
          f"{res['meta']['backend']} backend, {res['meta']['host_cpus']} CPUs, load {res['meta']['loadavg_before']}")
    for row, what, value, note in lines:
        print(f"{row:>2}  {what:<{w1}}  {value:<{w2}}  {note}")
    print()
    if res["meta"]["quick"]:
        print("targets: not judged in --quick mode (tiny counts)")
        return
    for v in res["targets"]:
        if v["met"] is None:
            print(f"target row {v['row']}: {v['what']}: not measured")
        elif v["met"]:
            print(f"target row {v['row']}: {v['what']} = {fmt(v['value'], 2)} {v['unit']} <= {v['target']}: met")
        else:
            print(f"target row {v['row']}: {v['what']} = {fmt(v['value'], 2)} {v['unit']}, target {v['target']}: "
                  f"MISSED by {fmt(v['miss_pct'], 0)}%")


# ---- main ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny counts (smoke test); numbers mean nothing")
    ap.add_argument("--out", default="bench-results.json", help="JSON results file (default %(default)s)")
    ap.add_argument("--rows", default="1,2,3,4,5,6,7", help="rows to run (comma-separated; 6 needs 1)")
    ap.add_argument("--repeats", type=int, help="override the number of interleaved repeats")
    ap.add_argument("--_rss-probe", nargs=3, type=int, metavar=("PLANES", "VCPUS", "COPIES"), help=argparse.SUPPRESS)
    ap.add_argument("--switch-interval", type=float, help="sys.setswitchinterval() for the run (experiments)")
    a = ap.parse_args(argv)
    if a.switch_interval:
        sys.setswitchinterval(a.switch_interval)
    if a._rss_probe:
        rss_probe(*a._rss_probe)
        return 0
    P = dict(QUICK if a.quick else FULL)
    if a.repeats:
        P["repeats"] = a.repeats
    want = {int(x) for x in a.rows.split(",") if x.strip()}
    if 6 in want:
        want.add(1)
    started = time.monotonic()
    probe = Machine(image("pio_loop"), MachineConfig(planes=2, personality="none", quiet=True))
    backend = probe.pvm.backend
    probe.close()
    meta = {"quick": a.quick, "params": P, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(), "kernel": platform.release(), "python": platform.python_version(),
            "host_cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in os.getloadavg()],
            "backend": backend, "vtl_personality": have_vtl()}
    try:
        meta["git"] = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                                     capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    rows = {}
    with tempfile.TemporaryDirectory(prefix="pykvmm-bench-") as tmp:
        cref = CRef(Path(tmp))
        if cref.error:
            log(f"warning: no C reference: {cref.error}")
        raw = RawExit()
        try:
            raw_exit_us = pio_us = None
            if 1 in want:
                r1, r6 = row_pio(P, cref, raw)
                rows["1_pio_exit"] = r1
                if 6 in want:
                    rows["6_tracing"] = r6
                raw_exit_us, pio_us = r1["raw_cffi_us"], r1["pykvmm_us"]
            if 2 in want:
                rows["2_plane_round_trip"] = r2 = row_round_trip(P, cref, raw)
                raw_exit_us = raw_exit_us or r2["raw_exit_us"]
            if raw_exit_us is None:
                raw_exit_us = median([raw.batch(2000) for _ in range(3)])
            pio_us = pio_us or raw_exit_us * 1.3
        finally:
            raw.close()
        if 3 in want:
            rows["3_cross_plane_ipi"] = row_ipi(P, cref, raw_exit_us, pio_us)
        if 4 in want:
            rows["4_startup"] = row_startup(P)
        if 5 in want:
            rows["5_scaling"] = row_scaling(P)
        if 7 in want:
            from bench_trace import bench_trace_export
            rows["7_trace_export"] = bench_trace_export(P["trace_events"], repeats=3 if not a.quick else 1)
    meta["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    meta["duration_s"] = round(time.monotonic() - started, 1)
    res = {"meta": meta, "rows": rnd(rows, 3), "targets": []}
    res["targets"] = rnd(verdicts(rows), 3)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1, sort_keys=False)
        f.write("\n")
    print_table(res)
    print(f"\nwrote {a.out} in {meta['duration_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
