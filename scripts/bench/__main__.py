"""pykvmm benchmarks: ``make bench`` or ``python scripts/bench [--quick]``.

Prints a table and writes every number to bench-results.json (``--out``). One module per row
(each has KEYS, run(ctx) -> {key: row}, verdicts(rows, add) and table(rows, L)); variants
inside a row are interleaved repeat by repeat, so that the noise of a shared machine hits them
alike, and the figure given is the median over the repeats. Ratios are medians of per-repeat
ratios (both sides measured back to back), always against a reference measured in the same run.

 1. pio.py         PIO exit round trip vs C and raw cffi (and 6, tracing on/off)
 2. round_trip.py  plane round trip vs the bare 2-KVM_RUN driver on the same guest
 3. ipi.py         cross-plane IPI latency vs the C kick floor
 4. startup.py     process start to the guest's first exit
 5. scaling.py     switch rate by vCPUs x planes, memory per plane
 7. trace_export.py  Chrome export of a 100k-event trace vs JSON lines
 8. vsm.py         VSM on the TLFS path: VtlCall+VtlReturn and an intercepted write (issue 14)
 9. kut.py         kvm-unit-tests' vmexit rows, pykvmm / QEMU/KVM cycles per exit (issue 12)
10. hyperv.py      Hyper-V personality: hypercall page, synthetic MSR, SynIC message vs a PIO exit

Everything runs on the real /dev/kvm. ``--quick`` uses tiny counts (the smoke test runs it);
its numbers mean nothing. Internal modes (``--_rss-probe``) are used by the script itself.
To add a row: a module with the four names above, listed in ROWS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):       # `python scripts/bench`: make this directory the package `bench`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from .common import FULL, QUICK, REPO, CRef, RawExit, fmt, image, log, median, rnd  # noqa: E402
from . import hyperv, ipi, kut, pio, round_trip, scaling, startup, trace_export, vsm  # noqa: E402

from pykvmm.vmm.machine import Machine, MachineConfig  # noqa: E402

ROWS = {1: pio, 2: round_trip, 3: ipi, 4: startup, 5: scaling, 6: pio, 7: trace_export, 8: vsm, 9: kut, 10: hyperv}


@dataclass
class Context:
    """What the rows share in one run: parameters, the C reference, the raw-exit driver, and
    the raw exit and pykvmm PIO exit times once a row measured them."""
    P: dict
    cref: CRef
    raw: RawExit
    raw_exit_us: float | None = None
    pio_us: float | None = None


def verdicts(rows: dict) -> list[dict]:
    out = []

    def add(row, what, value, target, unit, lower_is_better=True):
        if value is None:
            out.append({"row": row, "what": what, "value": None, "target": target, "met": None,
                        "note": "not measured"})
            return
        met = value <= target if lower_is_better else value >= target
        miss = None if met else abs(value / target - 1) * 100
        out.append({"row": row, "what": what, "value": value, "target": target, "unit": unit, "met": met,
                    "miss_pct": miss, "lower_is_better": lower_is_better})

    for module in dict.fromkeys(ROWS.values()):
        module.verdicts(rows, add)
    return out


def print_table(res: dict) -> None:
    rows = res["rows"]
    lines = []

    def L(row, what, value, note=""):
        lines.append((row, what, value, note))

    for module in dict.fromkeys(ROWS.values()):
        module.table(rows, L)
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
        cmp = "<=" if v.get("lower_is_better", True) else ">="
        if v["met"] is None:
            print(f"target row {v['row']}: {v['what']}: not measured")
        elif v["met"]:
            print(f"target row {v['row']}: {v['what']} = {fmt(v['value'], 2)} {v['unit']} {cmp} {v['target']}: met")
        else:
            print(f"target row {v['row']}: {v['what']} = {fmt(v['value'], 2)} {v['unit']}, target {cmp} "
                  f"{v['target']}: MISSED by {fmt(v['miss_pct'], 0)}%")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny counts (smoke test); numbers mean nothing")
    ap.add_argument("--out", default="bench-results.json", help="JSON results file (default %(default)s)")
    ap.add_argument("--rows", default="1,2,3,4,5,6,7,8,9,10", help="rows to run (comma-separated; 6 comes with 1)")
    ap.add_argument("--repeats", type=int, help="override the number of interleaved repeats")
    ap.add_argument("--_rss-probe", nargs=3, type=int, metavar=("PLANES", "VCPUS", "COPIES"), help=argparse.SUPPRESS)
    ap.add_argument("--switch-interval", type=float, help="sys.setswitchinterval() for the run (experiments)")
    a = ap.parse_args(argv)
    if a.switch_interval:
        sys.setswitchinterval(a.switch_interval)
    if a._rss_probe:
        scaling.rss_probe(*a._rss_probe)
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
            "backend": backend}
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
        ctx = Context(P, cref, RawExit())
        try:
            for number in (1, 2):             # these use the raw-exit driver
                if number in want:
                    rows.update(ROWS[number].run(ctx))
            if ctx.raw_exit_us is None:
                ctx.raw_exit_us = median([ctx.raw.batch(2000) for _ in range(3)])
            for number in (8, 10):            # these use the raw-exit driver too
                if number in want:
                    rows.update(ROWS[number].run(ctx))
            ctx.pio_us = ctx.pio_us or ctx.raw_exit_us * 1.3
        finally:
            ctx.raw.close()
        for number in (3, 4, 5, 7, 9):
            if number in want:
                rows.update(ROWS[number].run(ctx))
    if 6 not in want:
        rows.pop("6_tracing", None)
    meta["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    meta["duration_s"] = round(time.monotonic() - started, 1)
    res = {"meta": meta, "rows": rnd(rows, 3), "targets": rnd(verdicts(rows), 3)}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1, sort_keys=False)
        f.write("\n")
    print_table(res)
    print(f"\nwrote {a.out} in {meta['duration_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
