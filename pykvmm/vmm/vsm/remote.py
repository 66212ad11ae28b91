"""Reaching another VP: HvCallGetVpRegisters, HvCallSetVpRegisters and
HvCallTranslateVirtualAddress with a VpIndex other than the caller's.

Each VP's vCPU thread owns the KVM vCPUs of all its VTLs (vcpu_thread.py), so the access is
carried out by that thread: the caller posts it, kicks the target VP and waits (with the
Hyper-V lock released) until the target ran it at its next exit, between two KVM_RUNs, where
it cannot switch VTLs under the access. A caller that is itself waited for serves its own
requests while it waits, so two VPs reaching each other do not deadlock. A VP whose thread
has ended is accessed directly.

What a VTL may reach on another VP follows the rules for its own VP (registers.py: its own
and lower VTLs, enabled ones), plus one: the target VP must not be executing with the
registers reached. A private register of the VTL the target VP runs now, or a shared one
(RAX..R15 but RSP, CR2, DR0-3, XCR0: the running VTL's), answers HV_STATUS_INVALID_VP_STATE;
the private registers of a VTL the VP is not in (suspended below a higher VTL, or above the
running one) are reachable. A VpIndex that does not exist is HV_STATUS_INVALID_VP_INDEX.
"""

from __future__ import annotations

import threading
import time

from ..hyperv.hypercall import HvError
from . import hvdef as H

WAIT_LIMIT = 10.0         # a target that never reaches an exit (e.g. held by a debugger)
REKICK = 0.01


class _Request:
    __slots__ = ("fn", "done", "result", "error")

    def __init__(self, fn):
        self.fn, self.done, self.result, self.error = fn, False, None, None


def vp_thread(vsm, cpu, vp: int):
    """The vCPU thread of VP ``vp`` (HV_VP_INDEX_SELF: the caller's)."""
    if vp == H.HV_VP_INDEX_SELF or vp == cpu.index:
        return cpu
    threads = vsm.machine.threads
    if vp >= len(threads):
        raise HvError(H.INVALID_VP_INDEX, f"VP {vp} does not exist ({len(threads)} VPs)")
    return threads[vp]


def executing(thread) -> bool:
    """Whether this VP still runs guest code (its thread is alive and the guest not done)."""
    t = thread.thread
    return t is not None and t.is_alive() and not thread.done


def check_idle(thread, vtl: int, shared: bool, what: str) -> None:
    """On the target's own thread: INVALID_VP_STATE if it is executing with these registers."""
    if executing(thread) and (shared or thread.plane == vtl):
        which = "shared registers" if shared else f"VTL{vtl}'s registers"
        raise HvError(H.INVALID_VP_STATE, f"VP {thread.index} runs VTL{thread.plane}: {what} its {which} "
                                          f"would race with it")


class RemoteVps:
    """Accesses posted to other VPs' threads (the caller holds hv.lock)."""

    def __init__(self, vsm):
        self.vsm = vsm
        self.pending: dict[int, list[_Request]] = {}
        self.cond: threading.Condition | None = None
        self.count = 0

    def run(self, caller, target, fn):
        """``fn(target)`` on the target VP's own thread; its result, or the HvError it raised."""
        if target is caller or not (target.thread is not None and target.thread.is_alive()):
            return fn(target)
        hv = self.vsm.machine.hyperv
        if self.cond is None:
            self.cond = threading.Condition(hv.lock)
        req = _Request(fn)
        queue = self.pending.setdefault(target.index, [])
        queue.append(req)
        self.count += 1
        deadline = time.monotonic() + WAIT_LIMIT
        flusher = getattr(hv, "flusher", None)
        while not req.done:
            self.service(caller)                      # others may be waiting for this VP too
            if flusher is not None and flusher.pending:
                flusher.service(caller)
            if req.done:
                break
            alive = target.thread.is_alive()
            if not alive or self.vsm.machine.stopping or time.monotonic() > deadline:
                if req in self.pending.get(target.index, ()):
                    self.pending[target.index].remove(req)
                if not alive:
                    return fn(target)
                raise HvError(H.INVALID_VP_STATE, f"VP {target.index} did not stop to let VP {caller.index} "
                                                  f"reach its registers")
            target.planes_vcpu.kick()
            self.cond.wait(REKICK)
        if req.error is not None:
            raise req.error
        return req.result

    def service(self, thread) -> None:
        """On ``thread``'s own thread, between two KVM_RUNs (hv.lock held): run what others posted."""
        reqs = self.pending.pop(thread.index, None)
        if not reqs:
            return
        for req in reqs:
            try:
                req.result = req.fn(thread)
            except Exception as e:         # the caller's hypercall answers it (or fails) as if local
                req.error = e
            req.done = True
        self.cond.notify_all()
