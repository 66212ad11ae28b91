#!/usr/bin/env python3
"""kvm-unit-tests' vmexit rows (cycles per exit) under pykvmm and under QEMU/KVM, in one run.

Each row of x86/unittests.cfg's `vmexit` group is booted with pykvmm (`pykvmm run`, the
options `pykvmm kut` would use) and with QEMU (kvm-unit-tests' own x86/run command line),
alternately, and every row is printed as pykvmm/QEMU cycles (a ratio below 1 is faster).
Rows whose exits pykvmm handles in userspace (inl_from_pmtimer: the ACPI PM timer port) are
the VMM comparison proper; the others (cpuid, IPIs, CR accesses) are handled by KVM alone in
both and show noise and start-up differences only. Results also go to bench-kut-results.json.

    python3 scripts/bench_kut.py [--suite DIR] [--rows cpuid,ipi] [--repeat N] [--qemu PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pykvmm.kut import build, config, runner  # noqa: E402

USERSPACE_ROWS = {"inl_from_pmtimer"}     # exits that reach the VMM process in both
ROW_LINE = re.compile(r"^(\w+) (\d+)\r?$")


def rows_of(output: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in map(ROW_LINE.match, output.splitlines()) if m}


def run_pykvmm(entry, suite, env_file, timeout) -> str:
    argv, unsupported = runner.pykvmm_command(entry, suite, env_file, planes=1)
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return res.stdout


def run_qemu(qemu, entry, suite, env_file, timeout) -> str:
    plan = config.plan_run(entry)
    argv = [qemu, "--no-reboot", "-nodefaults", "-device", "pc-testdev", "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x4", "-vnc", "none", "-serial", "stdio", "-device", "pci-testdev",
            "-machine", "accel=kvm", "-kernel", str(suite / "x86" / entry.file), "-smp", str(entry.smp),
            "-initrd", str(env_file), "-m", str(plan.mem_mib), "-cpu", plan.cpu]
    if plan.cmdline:
        argv += ["-append", plan.cmdline]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return res.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default=None)
    ap.add_argument("--rows", default="", help="comma-separated row names (default: every vmexit row)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--qemu", default=shutil.which("qemu-system-x86_64"))
    ap.add_argument("--json", default=str(ROOT / "bench-kut-results.json"))
    args = ap.parse_args()

    scratch = tempfile.TemporaryDirectory(prefix="bench-kut-")
    try:
        suite = build.suite_build(args.suite, Path(scratch.name))
    except build.SuiteError as e:
        print(f"bench_kut: {e}", file=sys.stderr)
        return 2
    entries = [e for e in config.load_config(suite) if "vmexit" in e.groups and e.name != "vmexit_vmcall"]
    wanted = {r for r in args.rows.split(",") if r}
    if wanted:
        entries = [e for e in entries if config.plan_run(e).cmdline in wanted]
    if not args.qemu:
        print("bench_kut: qemu-system-x86_64 is not installed (Debian: apt-get install qemu-system-x86); "
              "only pykvmm's rows are measured", file=sys.stderr)
    env_file = runner.environment_file(suite, Path(scratch.name))
    results = []
    print(f"{'row':<20} {'pykvmm':>10} {'QEMU':>10} {'ratio':>7}  (cycles per exit, median of {args.repeat})")
    for entry in entries:
        row = config.plan_run(entry).cmdline
        timeout = (entry.timeout or config.DEFAULT_TIMEOUT) + 30
        ours, theirs = [], []
        for _ in range(args.repeat):          # alternate, so both see the same machine load
            got = rows_of(run_pykvmm(entry, suite, env_file, timeout)).get(row)
            if got is not None:
                ours.append(got)
            if args.qemu:
                got = rows_of(run_qemu(args.qemu, entry, suite, env_file, timeout)).get(row)
                if got is not None:
                    theirs.append(got)
        p = statistics.median(ours) if ours else None
        q = statistics.median(theirs) if theirs else None
        ratio = p / q if p and q else None
        results.append({"row": row, "pykvmm": p, "qemu": q, "ratio": ratio, "userspace": row in USERSPACE_ROWS})
        mark = "  userspace exit: target <= 1.00" if row in USERSPACE_ROWS else ""
        print(f"{row:<20} {p if p is not None else '-':>10} {q if q is not None else '-':>10} "
              f"{f'{ratio:.2f}' if ratio else '-':>7}{mark}", flush=True)
    Path(args.json).write_text(json.dumps({"rows": results, "repeat": args.repeat}, indent=2) + "\n")
    scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
