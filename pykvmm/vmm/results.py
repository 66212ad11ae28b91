"""What a run gives back: the exit status, the guest's reports, a crash with every plane's
state, and the counters."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from . import abi
from .devices import Ucall


class ExitStatus(enum.IntEnum):
    """pykvmm run's exit status (documented in the README)."""
    DONE = 0
    ASSERT_FAILED = 1
    USAGE = 2
    CRASHED = 3
    TIMEOUT = 4
    HOST = 5
    OUTPUT_FAILED = 6              # the trace could not be written fully
    INTERRUPTED = 130
    STDOUT_CLOSED = 141            # 128 + SIGPIPE, as a shell reports a writer whose reader left


@dataclass
class PlaneState:
    """One plane of one vCPU, captured for a crash or state dump."""
    plane: int
    regs: dict
    sregs: dict
    events: dict
    code: bytes = b""
    code_addr: int = 0
    started: bool = True
    system: dict = field(default_factory=dict)   # x86.sysstate.read_system_state: DRs, MSRs, LAPIC


@dataclass
class CpuReport:
    vcpu: int
    plane: int                     # the plane that was running
    suspended: list
    planes: dict                   # plane -> PlaneState


@dataclass
class Crash:
    vcpu: int
    plane: int
    reason: str
    report: CpuReport | None = None
    detail: str = ""
    state: str = ""                # what the registers shown are, when not the state at the crash


@dataclass
class RunResult:
    status: ExitStatus
    ucalls: list = field(default_factory=list)        # the newest UCALL_HISTORY
    console: list = field(default_factory=list)       # the newest CONSOLE_HISTORY_LINES lines
    ucall_counts: dict = field(default_factory=dict)  # verb name -> count, all of them
    failure: Ucall | None = None
    crash: Crash | None = None
    timeout_reports: list = field(default_factory=list)
    elapsed: float = 0.0
    exits: int = 0
    hypercalls: dict = field(default_factory=dict)
    switches: dict = field(default_factory=dict)      # (from, to) -> count
    entry_reasons: dict = field(default_factory=dict)  # reason -> count
    stats: dict = field(default_factory=dict)
    message: str = ""

    def syncs(self, vcpu: int | None = None, plane: int | None = None) -> list[tuple[int, int]]:
        return [(u.args[0], u.args[1]) for u in self.ucalls
                if u.verb == abi.UCALL_SYNC and (vcpu is None or u.vcpu == vcpu)
                and (plane is None or u.plane == plane)]

    def prints(self) -> list[str]:
        return [u.message for u in self.ucalls if u.verb == abi.UCALL_PRINT]

    @property
    def ok(self) -> bool:
        return self.status == ExitStatus.DONE
