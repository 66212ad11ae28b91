"""Run kvm-unit-tests on pykvmm the way run_tests.sh runs them on QEMU, and report.

Each test is one `pykvmm run` process (so a pykvmm crash or hang is contained and shown as a
pykvmm failure), with the test's QEMU options translated by config.plan_run. The guest's
isa-debug-exit code becomes QEMU's exit status ((code << 1) | 1) and that, as in
scripts/runtime.bash, becomes PASS (1), SKIP (77) or FAIL.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..vmm.devices.debug_exit import qemu_status
from .config import ARCH, DEFAULT_TIMEOUT, TestEntry, plan_run

EXIT_LINE = re.compile(r"guest wrote (0x[0-9a-f]+) to isa-debug-exit")
STATUS_TIMEOUT, STATUS_USAGE, STATUS_CRASHED = 4, 2, 3
GRACE = 30.0                       # beyond the test's timeout before pykvmm itself counts as hung
RESULT_LINE = re.compile(r"^(?:\x1b\[\d+m)?(PASS|FAIL|SKIP)(?:\x1b\[0m)? (\S+)(?: (.*))?$")


@dataclass
class TestResult:
    name: str
    status: str                    # PASS, FAIL, SKIP
    detail: str = ""               # "(SUMMARY text)" or the reason
    pykvmm_failure: bool = False   # pykvmm itself crashed or hung
    log: str = ""

    def line(self, color: bool = False) -> str:
        word = self.status
        if color:
            word = {"PASS": "\x1b[32mPASS\x1b[0m", "FAIL": "\x1b[31mFAIL\x1b[0m",
                    "SKIP": "\x1b[33mSKIP\x1b[0m"}[self.status]
        return f"{word} {self.name}" + (f" {self.detail}" if self.detail else "")


def pre_run_skip(entry: TestEntry, run_all: bool, chosen: bool) -> str | None:
    """run_tests.sh's reasons not to run a test, checked in its order."""
    if "nodefault" in entry.groups and not (run_all or chosen):
        return "(test marked as manual run only)"
    if entry.arch and entry.arch != ARCH:
        return f"({entry.arch} only)"
    if entry.accel and entry.accel != "kvm":
        return f"({entry.accel} only, but ACCEL=kvm)"
    for check in entry.check:
        for param in check.split():
            path, _, value = param.partition("=")
            try:
                ok = Path(path).read_text().strip() == value
            except OSError:
                ok = False
            if not ok:
                return f"({path} not equal to {value})"
    return None


def environment_file(suite: Path, directory: Path) -> Path:
    """The environment module QEMU's -initrd carries (scripts/arch-run.bash env_params and
    errata): the host kernel's version and an ERRATA_<commit>=y|n per line of errata.txt."""
    release = platform.release()
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    kver = tuple(int(x or 0) for x in m.groups()) if m else (0, 0, 0)
    lines = [f"KERNEL_VERSION_STRING={release}", f"KERNEL_VERSION={kver[0]}", f"KERNEL_PATCHLEVEL={kver[1]}",
             f"KERNEL_SUBLEVEL={kver[2]}", "QEMU_ACCEL=kvm"]
    errata = suite / "errata.txt"
    if errata.exists():
        for raw in errata.read_text().splitlines():
            if raw.startswith("#") or ":" not in raw:
                continue
            commit, minver = (p.strip() for p in raw.split(":")[:2])
            nums = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", minver)
            if commit and nums:
                need = tuple(int(x or 0) for x in nums.groups())
                lines.append(f"ERRATA_{commit}={'y' if kver >= need else 'n'}")
    path = directory / "environ"
    path.write_text("\n".join(lines) + "\n")
    return path


def pykvmm_command(entry: TestEntry, suite: Path, env_file: Path, planes: int,
                   timeout_scale: float = 1.0, hv_flags: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """(argv, unsupported QEMU options) for one test. ``hv_flags`` (e.g. ``("vsm",)``) are added,
    with the flags they need, to the -cpu of the tests that use Hyper-V flags."""
    plan = plan_run(entry)
    plan.cpu = add_hv_flags(plan.cpu, hv_flags)
    timeout = (entry.timeout or DEFAULT_TIMEOUT) * timeout_scale
    argv = [sys.executable, "-m", "pykvmm", "run", str(suite / "x86" / entry.file), "--vcpus", str(entry.smp),
            "--timeout", str(timeout), "--initrd", str(env_file), *plan.args()]
    if planes > 1:
        argv += ["--planes", str(planes)]
    return argv, plan.unsupported


def add_hv_flags(cpu: str, hv_flags: tuple[str, ...]) -> str:
    """``cpu`` (QEMU -cpu text) with ``hv_flags`` and their needs appended, if it has hv_* flags."""
    from ..vmm.hyperv.features import normalize, with_needs
    words = cpu.split(",")
    present = {normalize(w.lstrip("+")) for w in words[1:]} - {None}
    if not hv_flags or not present:
        return cpu
    return ",".join(words + ["hv_" + f for f in with_needs(hv_flags) if f not in present])


def classify(entry: TestEntry, returncode: int, stdout: str, stderr: str, timeout_scale: float = 1.0) -> TestResult:
    """A finished `pykvmm run` as run_tests.sh would show the same QEMU outcome."""
    timeout_text = entry.timeout_text or f"{int(DEFAULT_TIMEOUT)}s"
    if timeout_scale != 1.0:
        timeout_text = f"{(entry.timeout or DEFAULT_TIMEOUT) * timeout_scale:g}s"
    tail = [ln.rstrip("\r") for ln in stdout.splitlines()[-3:]]
    summary = next((f"({ln[len('SUMMARY: '):]})" for ln in tail if ln.startswith("SUMMARY: ")), "")
    m = EXIT_LINE.search(stderr)
    if "Traceback (most recent call last)" in stderr or "pykvmm internal error" in stderr:
        last = [ln for ln in stderr.strip().splitlines() if ln.strip()][-1:]
        return TestResult(entry.name, "FAIL", f"(pykvmm failure: {last[0].strip() if last else 'traceback'})",
                          pykvmm_failure=True)
    if m:
        status = qemu_status(int(m.group(1), 16))
        if status == 1:
            return TestResult(entry.name, "PASS", summary)
        if status == 77:
            return TestResult(entry.name, "SKIP", summary)
        return TestResult(entry.name, "FAIL", summary)
    if returncode == STATUS_TIMEOUT:
        return TestResult(entry.name, "FAIL", f"(timeout; duration={timeout_text})")
    if returncode == STATUS_CRASHED:
        why = next((ln for ln in stderr.splitlines() if "guest crashed" in ln), "guest crashed")
        return TestResult(entry.name, "FAIL", f"({why.replace('pykvmm: ', '')})")
    if returncode == STATUS_USAGE:
        why = next((ln for ln in stderr.splitlines() if ln.startswith("pykvmm: ")), "refused")
        return TestResult(entry.name, "SKIP", f"({why.replace('pykvmm: ', 'pykvmm cannot run it: ')})")
    if returncode < 0:
        return TestResult(entry.name, "FAIL", f"(pykvmm failure: terminated on signal {-returncode})",
                          pykvmm_failure=True)
    return TestResult(entry.name, "FAIL", f"(pykvmm failure: exit status {returncode} without a guest exit)",
                      pykvmm_failure=True)


def run_one(entry: TestEntry, suite: Path, env_file: Path, planes: int, log_dir: Path | None,
            timeout_scale: float = 1.0, hv_flags: tuple[str, ...] = ()) -> TestResult:
    argv, unsupported = pykvmm_command(entry, suite, env_file, planes, timeout_scale, hv_flags)
    if unsupported:
        return TestResult(entry.name, "SKIP", f"(pykvmm does not model {', '.join(unsupported)})")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    limit = (entry.timeout or DEFAULT_TIMEOUT) * timeout_scale + GRACE
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=limit, env=env,
                              stdin=subprocess.DEVNULL, errors="replace")
    except subprocess.TimeoutExpired as e:
        res = TestResult(entry.name, "FAIL", f"(pykvmm failure: hung {limit:.0f} s, past the test's timeout)",
                         pykvmm_failure=True)
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        res.log = out
        return res
    res = classify(entry, proc.returncode, proc.stdout, proc.stderr, timeout_scale)
    res.log = f"$ {' '.join(argv)}\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    if log_dir is not None:
        (log_dir / f"{entry.name}.log").write_text(res.log)
    return res


def select(tests: list[TestEntry], names: list[str]) -> list[TestEntry]:
    if not names:
        return tests
    known = {t.name for t in tests}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"no such test in x86/unittests.cfg: {', '.join(unknown)}")
    return [t for t in tests if t.name in names]


def run_suite(tests: list[TestEntry], suite: Path, *, names: list[str], planes: int = 1, jobs: int = 1,
              log_dir: Path | None = None, on_result=None, timeout_scale: float = 1.0,
              hv_flags: tuple[str, ...] = ()) -> list[TestResult]:
    """Run the chosen tests (all when ``names`` is empty); results in unittests.cfg order."""
    chosen = select(tests, names)
    results: dict[str, TestResult] = {}
    lock = threading.Lock()

    def report(res: TestResult) -> None:
        with lock:
            results[res.name] = res
            if on_result:
                on_result(res)

    with tempfile.TemporaryDirectory(prefix="pykvmm-kut-") as tmp:
        env_file = environment_file(suite, Path(tmp))
        runnable = []
        for t in chosen:
            why = pre_run_skip(t, run_all=False, chosen=bool(names))
            if why:
                report(TestResult(t.name, "SKIP", why))
            else:
                runnable.append(t)
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for fut in [pool.submit(run_one, t, suite, env_file, planes, log_dir, timeout_scale, hv_flags) for t in runnable]:
                report(fut.result())
    return [results[t.name] for t in chosen]


# ---- reference runs and the table --------------------------------------------------------------
def parse_reference(text: str) -> dict[str, tuple[str, str]]:
    """name -> (status, detail) from run_tests.sh output (colour codes allowed, '#' comments)."""
    out = {}
    for raw in text.splitlines():
        m = RESULT_LINE.match(raw.strip())
        if m and not raw.startswith("#"):
            out[m.group(2)] = (m.group(1), (m.group(3) or "").strip())
    return out


def counts(statuses) -> dict[str, int]:
    c = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    for s in statuses:
        c[s] += 1
    return c


def summary_line(results: list[TestResult]) -> str:
    c = counts(r.status for r in results)
    failures = sum(r.pykvmm_failure for r in results)
    extra = f" ({failures} pykvmm failures)" if failures else ""
    return f"SUMMARY: {c['PASS']} PASS, {c['FAIL']} FAIL, {c['SKIP']} SKIP{extra}"


def table(results: list[TestResult], reference: dict[str, tuple[str, str]] | None = None,
          ref_name: str = "reference") -> str:
    rows = []
    width = max([len(r.name) for r in results] + [4])
    head = f"{'test':<{width}}  pykvmm"
    if reference is not None:
        head += f"  {ref_name:<9}  differs"
    rows.append(head)
    for r in results:
        row = f"{r.name:<{width}}  {r.status:<6}"
        if reference is not None:
            ref = reference.get(r.name, ("-", ""))[0]
            mark = "" if ref == r.status else "*"
            row += f"  {ref:<9}  {mark}"
        rows.append(row.rstrip())
    if reference is not None:
        ours = counts(r.status for r in results)
        theirs = counts(reference[r.name][0] for r in results if r.name in reference)
        differ = sum(1 for r in results if reference.get(r.name, ("-",))[0] != r.status)
        rows.append(f"totals: pykvmm {ours['PASS']} PASS {ours['FAIL']} FAIL {ours['SKIP']} SKIP; "
                    f"{ref_name} {theirs['PASS']} PASS {theirs['FAIL']} FAIL {theirs['SKIP']} SKIP; "
                    f"{differ} differ")
    return "\n".join(rows)


def tap(results: list[TestResult]) -> str:
    lines = ["TAP version 13", f"1..{len(results)}"]
    for i, r in enumerate(results, 1):
        detail = r.detail.strip("()")
        if r.status == "PASS":
            lines.append(f"ok {i} - {r.name}" + (f" ({detail})" if detail else ""))
        elif r.status == "SKIP":
            lines.append(f"ok {i} - {r.name} # SKIP {detail}")
        else:
            lines.append(f"not ok {i} - {r.name}: {detail}")
    return "\n".join(lines)
