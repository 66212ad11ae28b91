"""x86/unittests.cfg: the suite's list of tests, and their QEMU options turned into pykvmm's.

Each section names a test: ``file`` (the .flat), ``smp``, ``extra_params`` (QEMU options),
``timeout``, ``arch``, ``groups``, ``accel`` and ``check`` lines, as run_tests.sh reads them.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_TIMEOUT = 90.0          # run_tests.sh's TIMEOUT default (90s)
DEFAULT_MEM_MIB = 128           # QEMU's default -m for the pc machine
ARCH = "x86_64"


class ConfigError(ValueError):
    pass


@dataclass
class TestEntry:
    name: str
    file: str = ""
    smp: int = 1
    extra_params: str = ""
    timeout: float | None = None
    timeout_text: str = ""
    arch: str = ""
    groups: list[str] = field(default_factory=list)
    accel: str = ""
    check: list[str] = field(default_factory=list)


def _seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if not m:
        raise ConfigError(f"timeout {text!r} is not a duration")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def parse_config(text: str) -> list[TestEntry]:
    tests: list[TestEntry] = []
    cur: TestEntry | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            cur = TestEntry(line[1:-1].strip())
            tests.append(cur)
            continue
        if cur is None or "=" not in line:
            raise ConfigError(f"line {lineno}: {raw!r} is neither a [section] nor key = value in a section")
        key, value = (p.strip() for p in line.split("=", 1))
        if key == "file":
            cur.file = value
        elif key == "smp":
            cur.smp = int(value) if value.isdigit() else 1   # `$MAX_SMP`-style values: one CPU
        elif key == "extra_params":
            cur.extra_params = value
        elif key == "timeout":
            cur.timeout, cur.timeout_text = _seconds(value), value
        elif key == "arch":
            cur.arch = value
        elif key == "groups":
            cur.groups = value.split()
        elif key == "accel":
            cur.accel = value
        elif key == "check":
            cur.check.append(value)
    return tests


def load_config(suite: Path) -> list[TestEntry]:
    path = Path(suite) / "x86" / "unittests.cfg"
    try:
        return parse_config(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None


def _expand_backticks(text: str) -> str:
    # run_tests.sh evaluates extra_params in a shell; the only use is `date +%s`-style stamps.
    return re.sub(r"`([^`]*)`", lambda m: subprocess.run(["/bin/sh", "-c", m.group(1)], capture_output=True,
                                                          text=True).stdout.strip(), text)


@dataclass
class RunPlan:
    """The pykvmm equivalent of one test's QEMU command line, or why there is none."""
    cpu: str = "qemu64"
    cmdline: str = ""
    mem_mib: int = DEFAULT_MEM_MIB
    pit: bool = True
    unsupported: list[str] = field(default_factory=list)

    def args(self) -> list[str]:
        out = ["--cpu", self.cpu, "--mem", str(self.mem_mib)]
        if self.cmdline:
            out += ["--append", self.cmdline]
        if not self.pit:
            out += ["--no-pit"]
        return out


# QEMU -device values pykvmm always provides (kvm-unit-tests' x86/run adds them itself).
BUILTIN_DEVICES = {"pc-testdev", "pci-testdev", "isa-debug-exit",
                   "hyperv-testdev"}   # the Hyper-V personality's (vmm/hyperv/testdev.py)


def _mem_mib(text: str) -> int:
    m = re.fullmatch(r"(\d+)([mMgG]?)[bB]?", text)
    if not m:
        raise ConfigError(f"-m {text}: not a memory size")
    return int(m.group(1)) * (1024 if m.group(2) in "gG" and m.group(2) else 1)


def plan_run(entry: TestEntry) -> RunPlan:
    """Translate extra_params (QEMU options) into pykvmm run options."""
    plan = RunPlan()
    words = shlex.split(_expand_backticks(entry.extra_params))
    i = 0
    while i < len(words):
        opt = words[i]
        arg = words[i + 1] if i + 1 < len(words) else ""
        i += 2
        if opt == "-cpu":
            plan.cpu = arg
        elif opt in ("-append", "--append"):
            plan.cmdline = arg
        elif opt == "-m":
            plan.mem_mib = _mem_mib(arg)
        elif opt in ("-machine", "-M"):
            for prop in arg.split(","):
                if prop == "pit=off":
                    plan.pit = False
                elif prop in ("accel=kvm", "pc"):
                    continue
                else:
                    plan.unsupported.append(f"-machine {prop}")
        elif opt == "-device":
            dev = arg.split(",")[0]
            if dev not in BUILTIN_DEVICES:
                plan.unsupported.append(f"-device {dev}")
        elif opt == "-enable-kvm":
            i -= 1
        else:
            plan.unsupported.append(f"{opt} {arg}".strip())
    return plan
