"""What every benchmark row shares: the parameters, the C reference, the raw-exit and raw-plane
drivers (the floors), running a machine timed, and small statistics."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pykvmm import exits as X, kvm as K  # noqa: E402
from pykvmm.uapi import ffi  # noqa: E402
from pykvmm.debug.summary import percentile  # noqa: E402
from pykvmm.vmm import abi, loader  # noqa: E402
from pykvmm.vmm.machine import Machine, MachineConfig  # noqa: E402

PIO_REF_SRC = REPO / "scripts" / "pio_ref.c"

FULL = dict(repeats=11, pio_n=20000, switch_n=2500, vtl_n=1500, c_switch_n=12000,
            ipi_rounds=500, pingpong_n=500, startup_runs=7, build_runs=10, wide_runs=3, wide_vcpus=64,
            scale_n=1500, scale_vcpus=(1, 2, 4, 8), scale_planes=(2, 4, 8), rss_planes=(1, 2, 4, 8), rss_copies=4,
            small_kick=1e-4, trace_events=100_000)
QUICK = dict(repeats=2, pio_n=300, switch_n=30, vtl_n=30, c_switch_n=300,
             ipi_rounds=8, pingpong_n=8, startup_runs=1, build_runs=2, wide_runs=1, wide_vcpus=8,
             scale_n=5, scale_vcpus=(1, 2, 4, 8), scale_planes=(2, 4, 8), rss_planes=(1, 2), rss_copies=1,
             small_kick=1e-4, trace_events=4000)

# ---- small helpers -----------------------------------------------------------------------------

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def median(xs):
    return statistics.median(xs) if xs else None


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


@contextlib.contextmanager
def counting_python_calls(calls: collections.Counter):
    """Count the Python and builtin function calls of each thread started while the block runs
    (the vCPU threads), by thread id: the load-independent measure of per-exit work."""
    def hook(frame, event, arg):
        if event == "call" or event == "c_call":
            calls[threading.get_ident()] += 1
    threading.setprofile(hook)
    try:
        yield calls
    finally:
        threading.setprofile(None)


def run_machine(img: bytes, timeout: float = 120.0, setup=None, counts=None, calls=None, **config):
    """Build (untimed), run (timed with perf_counter around Machine.run), close.
    ``counts``: a Counter that receives the ioctls made during the run (not the build);
    ``calls``: one that receives the function calls of the threads the run starts, by thread
    (counting them slows the run down: time such a run for nothing else).
    Returns (seconds, RunResult, machine)."""
    config.setdefault("quiet", True)
    with Machine(img, MachineConfig(**config)) as m:
        if setup is not None:
            setup(m)
        with K.counting_ioctls(counts) if counts is not None else contextlib.nullcontext(), \
                counting_python_calls(calls) if calls is not None else contextlib.nullcontext():
            t0 = time.perf_counter()
            r = m.run(timeout)
            dt = time.perf_counter() - t0
    if not r.ok:
        detail = r.failure.describe() if r.failure else (r.crash.reason if r.crash else "")
        raise RuntimeError(f"benchmark guest did not finish: {r.status.name} {detail}")
    return dt, r, m


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

    def kick(self, n: int, max_wait_us: int, halted: bool = False) -> dict:
        """The kick floor: a thread spinning in one VM's guest (``halted``: halted in it, so the
        kick wakes a sleeping thread) kicked, then the other VM run to its first exit."""
        res = subprocess.run([str(self.path), "-i", "-s", "1", "-k", "-K", str(max_wait_us), *(["-H"] if halted else []),
                              str(n)], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"pio_ref -k failed: {res.stderr.strip()}")
        return json.loads(res.stdout)


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
        self.v = self.m.threads[0].planes_vcpu.plane0
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
    sync regs, nothing else (no IRR scans, no dispatcher, no state copy, no locks).
    ``state_reads``: plus the reads the vtl personality cannot leave out on this host (the
    source's DR0-3 and XSAVE image at each switch, the higher plane's LAPIC on the return),
    into buffers allocated once: the floor of a switch that copies the TLFS shared state."""

    def __init__(self, guest: str, personality: str, state_reads: bool = False):
        self.m = Machine(image(guest), MachineConfig(planes=2, personality=personality, arg=1 << 40, quiet=True))
        thread = self.m.threads[0]
        self.v = [thread.plane_vcpu(0), thread.plane_vcpu(1)]
        for p in (0, 1):      # VTL guests read why they were entered: always a VtlCall here
            self.m.memory.write_u32(abi.control_page(0, p) + abi.VTL_ENTRY_REASON, abi.VTL_ENTRY_VTL_CALL)
        self.state_reads = state_reads
        self.dr = ffi.new("struct kvm_debugregs *")
        self.xsave = ffi.new("struct kvm_xsave *")
        self.cur = 0
        self.batch(100)

    def batch(self, n: int) -> float:
        """us per round trip over n round trips."""
        v, cur, hc, reads = self.v, self.cur, abi.PORT_HYPERCALL, self.state_reads
        switches = 0
        t0 = time.perf_counter()
        while switches < 2 * n:
            ex = v[cur].run()
            if type(ex) is X.IoOut:
                if ex.port == hc:
                    regs = v[cur].regs
                    regs.rax = 0
                    v[cur].mark_dirty("regs")
                    if reads:
                        v[cur].get_debugregs(into=self.dr)
                        v[cur].get_xsave(into=self.xsave)
                        if cur:
                            v[1].get_lapic()
                    cur ^= 1
                    switches += 1
            else:
                raise RuntimeError(f"raw plane driver: unexpected {ex.describe()}")
        self.cur = cur
        return (time.perf_counter() - t0) / n * 1e6

    def close(self):
        self.m.close()




def env() -> dict:
    """The environment for a child Python that imports this checkout's pykvmm."""
    out = dict(os.environ)
    out["PYTHONPATH"] = str(REPO) + (os.pathsep + out["PYTHONPATH"] if out.get("PYTHONPATH") else "")
    return out


def fmt(v, nd=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)
