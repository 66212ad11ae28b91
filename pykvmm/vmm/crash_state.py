"""The guest's state at a triple fault, on hosts whose KVM resets the vCPU first.

kvm_amd answers a SHUTDOWN intercept by INITing the vCPU (the VMCB is undefined after it), so
at KVM_EXIT_SHUTDOWN the vCPU holds RIP=fff0, CS=f000. The uAPI offers no exception intercept
that would stop before the #DF (KVM_SET_GUEST_DEBUG only traps #DB and #BP), so the state is
re-created: every KVM_RUN keeps the state it enters the guest with (Vcpu.keep_entry_state);
at the shutdown that state is put back and the guest re-executed one instruction at a time
until it faults again. The last single-step stop is the state just before the faulting
instruction. Re-execution repeats the guest's stores since its last exit, and port I/O in
that stretch is not handed to devices, so the note says how far it went; if it does not
fault again the state kept at the last entry is shown and said to be that.
"""

from __future__ import annotations

import threading
import time

from .. import exits as X, kvm as K
from ..kvm import KvmError
from ..uapi import constants as C, ffi
from .host import looks_reset

MAX_STEPS = 100_000
TIME_LIMIT = 5.0          # seconds; the emulated hosts are slow
_SYNC_SIZE = ffi.sizeof("struct kvm_sync_regs")


def _apply(v: K.Vcpu, state) -> None:
    v.set_sregs(ffi.addressof(state.sregs))
    v.set_regs(ffi.addressof(state.regs))


def _step_to_shutdown(v: K.Vcpu, start, kick) -> tuple[object, int, str]:
    """Single-step from ``start``; returns (the state before the faulting instruction, steps, why)."""
    last = ffi.new("struct kvm_sync_regs *")
    ffi.memmove(last, start, _SYNC_SIZE)
    control = C.KVM_GUESTDBG_ENABLE | C.KVM_GUESTDBG_SINGLESTEP
    try:
        v.set_guest_debug(control | C.KVM_GUESTDBG_BLOCKIRQ)   # no interrupt handlers in the replay
        control |= C.KVM_GUESTDBG_BLOCKIRQ
    except KvmError:
        pass
    timer = threading.Timer(TIME_LIMIT, kick)
    timer.daemon = True
    timer.start()
    deadline = time.monotonic() + TIME_LIMIT
    steps, why = 0, ""
    try:
        while steps < MAX_STEPS:
            # Armed again before every step, as QEMU's gdbstub does: KVM sets TF only while RIP
            # is where single-step was asked for, and an instruction KVM emulates (string I/O)
            # writes RFLAGS back without it, after which the guest would run on unstepped.
            v.set_guest_debug(control)
            ex = v.run()
            if isinstance(ex, X.Shutdown):
                return last, steps, ""
            if isinstance(ex, X.Debug):
                steps += 1
                ffi.memmove(last, ffi.addressof(v.run_struct.s.regs), _SYNC_SIZE)
            elif isinstance(ex, X.IoIn):
                v.complete_io_in(ex, b"\xFF" * (ex.size * ex.count))
            elif isinstance(ex, X.Interrupted) and time.monotonic() >= deadline:
                why = f"it did not fault again within {TIME_LIMIT:.0f} s"
                break
            elif not isinstance(ex, (X.IoOut, X.Mmio, X.Interrupted)):
                why = f"it ended in {ex.describe()} instead"
                break
        else:
            why = f"it did not fault again within {MAX_STEPS} instructions"
    finally:
        timer.cancel()
        v.set_guest_debug(0)
    return None, steps, why


def recover_after_shutdown(v: K.Vcpu, kick) -> str:
    """At KVM_EXIT_SHUTDOWN: leave the guest's own state in ``v`` and say what it is.

    ``kick`` gets this thread out of KVM_RUN (the re-execution's time limit)."""
    regs, sregs = v.get_regs(), v.get_sregs()
    if not looks_reset(regs, sregs):
        return ""                              # KVM left the registers as they were
    kept = v.entry_state()
    v.keep_entry_state(False)
    if kept is None:
        return ("KVM reset the vCPU at the triple fault and no earlier state was kept: "
                "the registers shown are the reset state, not the guest's")
    start, exit_no = kept
    age = f"its last entry into KVM_RUN (after exit #{exit_no})"
    _apply(v, start)
    found, steps, why = _step_to_shutdown(v, start, kick)
    if found is not None:
        _apply(v, found)
        return (f"KVM reset the vCPU at the triple fault; this state was re-created by re-executing "
                f"the guest one instruction at a time from {age}: {steps} instruction(s) later it "
                f"faulted again at the RIP shown")
    _apply(v, start)
    return (f"KVM reset the vCPU at the triple fault; re-executing from {age} did not reproduce it "
            f"({why}), so the registers shown are those of that entry, {steps} instruction(s) before")
