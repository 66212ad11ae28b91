"""Row 9, kvm-unit-tests' vmexit test under pykvmm and under QEMU/KVM in the same run: cycles
per exit for every row, each as a pykvmm/QEMU ratio (below 1: pykvmm is faster).

The rows are x86/unittests.cfg's `vmexit` group (vmcall aside: it never returns on this host)
plus the test's rows that exit to the VMM and the cfg does not list: inl_from_qemu (an unowned
port), pci-mem and pci-io (pci-testdev). Rows that share a configuration (CPUs, -cpu) run in
one boot, the two VMMs alternately in each repeat (the same load hits both); a ratio is the
median of the per-repeat ratios. Userspace rows (the exit reaches the VMM process) are the
VMM comparison proper, with the target <= 1.0 for inl_from_pmtimer (issue 12); the others are
handled by KVM alone in both (the "eventfd" pci rows by KVM ioeventfds in QEMU, by pykvmm in
userspace) and show start-up and noise differences. pykvmm runs twice per repeat, with the exit
fast path (pykvmm/fastexit.py, the default) and without it (PYKVMM_FASTPATH=0, the Python
exit path): ``ratio`` is the default's, ``ratio_python_path`` the other's. With --quick only
pykvmm runs (fast path on), one row.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tempfile
from collections import defaultdict
from pathlib import Path

from pykvmm import fastexit
from pykvmm.kut import build, config, runner

from .common import QUICK, REPO, env, fmt, log, median

KEYS = ("9_kut_vmexit",)
TARGET_RATIO = 1.0                 # pykvmm / QEMU on the userspace-exit rows
EXTRA_ROWS = ("inl_from_qemu", "pci-mem", "pci-io")      # vmexit rows the cfg does not list
USERSPACE_ROWS = {"inl_from_pmtimer", "inl_from_qemu", "mmio-no-eventfd:pci-mem", "portio-no-eventfd:pci-io"}
MAX_REPEATS = 3                    # a boot of QEMU (SeaBIOS, emulated here) takes 10-30 s
ROW_LINE = re.compile(r"^([\w:-]+) (\d+)\r?$")
BOOT_TIMEOUT = 600.0


def rows_of(output: str) -> dict[str, int]:
    """vmexit's "name cycles" lines."""
    return {m.group(1): int(m.group(2)) for m in map(ROW_LINE.match, output.splitlines()) if m}


def groups(entries: list[config.TestEntry], extra: tuple[str, ...]) -> list[config.TestEntry]:
    """One vmexit boot per configuration: the rows that share CPUs and -cpu in one -append."""
    by_conf: dict[tuple, list[str]] = defaultdict(list)
    for e in entries:
        plan = config.plan_run(e)
        by_conf[(e.smp, plan.cpu, plan.mem_mib)].append(plan.cmdline)
    if extra:
        by_conf[(1, config.RunPlan().cpu, config.DEFAULT_MEM_MIB)].extend(extra)
    return [config.TestEntry(f"vmexit[{' '.join(rows)}]", file="vmexit.flat", smp=smp,
                             extra_params=f"-cpu {cpu} -m {mem} -append {shlex.quote(' '.join(rows))}")
            for (smp, cpu, mem), rows in by_conf.items()]


def run_pykvmm(entry, suite: Path, env_file: Path, fast_path: bool = True) -> str:
    argv, _ = runner.pykvmm_command(entry, suite, env_file, planes=1)
    child_env = env()
    if not fast_path:
        child_env[fastexit.ENV_SWITCH] = "0"
    res = subprocess.run(argv, capture_output=True, text=True, timeout=BOOT_TIMEOUT, cwd=REPO, env=child_env,
                         stdin=subprocess.DEVNULL)
    return res.stdout


def qemu_command(qemu: str, entry, suite: Path, env_file: Path) -> list[str]:
    """kvm-unit-tests' own x86/run command line for the test (pc-testdev, isa-debug-exit, pci-testdev)."""
    plan = config.plan_run(entry)
    argv = [qemu, "--no-reboot", "-nodefaults", "-device", "pc-testdev", "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x4", "-vnc", "none", "-serial", "stdio", "-device", "pci-testdev",
            "-machine", "accel=kvm", "-kernel", str(suite / "x86" / entry.file), "-smp", str(entry.smp),
            "-initrd", str(env_file), "-m", str(plan.mem_mib), "-cpu", plan.cpu]
    return argv + (["-append", plan.cmdline] if plan.cmdline else [])


def run_qemu(qemu: str, entry, suite: Path, env_file: Path) -> str:
    res = subprocess.run(qemu_command(qemu, entry, suite, env_file), capture_output=True, text=True,
                         timeout=BOOT_TIMEOUT, stdin=subprocess.DEVNULL)
    return res.stdout


def run(ctx) -> dict:
    quick = all(ctx.P.get(k) == v for k, v in QUICK.items() if k != "repeats")    # --quick
    log("row 9: kvm-unit-tests vmexit under pykvmm and QEMU/KVM")
    qemu = None if quick else shutil.which("qemu-system-x86_64")
    with tempfile.TemporaryDirectory(prefix="bench-kut-") as tmp:
        try:
            suite = build.suite_build(None, Path(tmp))
        except build.SuiteError as e:
            return {KEYS[0]: {"error": str(e)}}
        entries = [e for e in config.load_config(suite) if "vmexit" in e.groups and e.name != "vmexit_vmcall"]
        if quick:
            entries, extra = [e for e in entries if e.name == "vmexit_cpuid"], ()
        else:
            extra = EXTRA_ROWS
        boots = groups(entries, extra)
        env_file = runner.environment_file(suite, Path(tmp))
        repeats = 1 if quick else min(ctx.P["repeats"], MAX_REPEATS)
        ours, slow, theirs = defaultdict(list), defaultdict(list), defaultdict(list)
        ratios, slow_ratios = defaultdict(list), defaultdict(list)
        fast_on, fast_why = fastexit.status()
        for rep in range(repeats):
            for boot in boots:
                p = rows_of(run_pykvmm(boot, suite, env_file))
                q = rows_of(run_qemu(qemu, boot, suite, env_file)) if qemu else {}
                s = rows_of(run_pykvmm(boot, suite, env_file, fast_path=False)) if qemu and fast_on else {}
                for mine, samples, paired in ((p, ours, ratios), (s, slow, slow_ratios)):
                    for name, cycles in mine.items():
                        samples[name].append(cycles)
                        if q.get(name):
                            paired[name].append(cycles / q[name])
                for name, cycles in q.items():
                    theirs[name].append(cycles)
    names = list(dict.fromkeys([*ours, *theirs]))
    rows = {name: {"pykvmm_cycles": median(ours.get(name)), "qemu_cycles": median(theirs.get(name)),
                   "ratio": median(ratios.get(name)), "userspace": name in USERSPACE_ROWS,
                   "python_path_cycles": median(slow.get(name)), "ratio_python_path": median(slow_ratios.get(name)),
                   "samples": {"pykvmm": ours.get(name, []), "pykvmm_python_path": slow.get(name, []),
                               "qemu": theirs.get(name, [])}}
            for name in names}
    return {KEYS[0]: {"rows": rows, "repeats": repeats, "boots": [b.extra_params for b in boots],
                      "fast_path": "on" if fast_on else f"off: {fast_why}",
                      "qemu": qemu or ("not run in --quick" if quick else "qemu-system-x86_64 not found"),
                      "note": "cycles per exit (the guest's rdtsc); ratio = median of per-repeat pykvmm/QEMU"}}


def verdicts(rows: dict, add) -> None:
    r = rows.get(KEYS[0])
    if r and "rows" in r and "inl_from_pmtimer" in r["rows"]:
        add(9, f"vmexit inl_from_pmtimer (userspace PIO exit), pykvmm / QEMU (exit fast path {r.get('fast_path', 'on')})",
            r["rows"]["inl_from_pmtimer"]["ratio"], TARGET_RATIO, "x")


def table(rows: dict, L) -> None:
    r = rows.get(KEYS[0])
    if not r:
        return
    if "error" in r:
        L("9", "kvm-unit-tests vmexit", "-", r["error"])
        return
    qemu_ran = r["qemu"].startswith("/")
    for name, d in r["rows"].items():
        if d["ratio"] is not None:
            note = f"{fmt(d['ratio'], 2)}x QEMU"
            if d.get("ratio_python_path") is not None:
                note += f", Python exit path {fmt(d['ratio_python_path'], 2)}x"
        else:
            note = "QEMU printed no such row" if qemu_ran else f"QEMU {r['qemu']}"
        if d["userspace"]:
            note += "  (exit to the VMM)"
        L("9", f"vmexit {name}, cycles per exit pykvmm / QEMU",
          f"{fmt(d['pykvmm_cycles'])} / {fmt(d['qemu_cycles'])}", note)
