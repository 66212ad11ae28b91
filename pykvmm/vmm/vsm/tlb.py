"""TLFS "Virtual Secure Mode" > "Configuring Lower VTLs" > TlbLocked: a higher VTL locks a
lower VTL's TLB on a VP, so that the lower VTL cannot cause TLB invalidations that would
interfere with it.

HvRegisterVsmVpSecureVtlConfig (0xD0010 + n) exists once per VP for each pair (VTL q > 0, VTL
n < q); bit 1 TlbLocked of q's instance for n locks VTL n's TLB on that VP. The lock is lifted
when q clears the bit, and every lock q holds on a VP is released when that VP returns from q
to a lower VTL (VtlReturn): the bit then reads 0.

While VTL n's TLB on VP v is locked, an address-space flush from VTL n on any VP that targets
v (HvCallFlushVirtualAddressSpace/List and their Ex forms, hyperv/vmmu.py) does not complete:
the TLFS suspends the calling VP and re-issues the call when it is unsuspended. pykvmm holds
the call for up to SUSPEND_SLICE, waking at once when a lock is lifted; if the lock is still
held it returns to the guest without completing (RAX all-ones: the hypercall page's stub
re-issues the call, hypercall.py), so the caller's higher VTLs can still take interrupts and
a stopping machine is never held up. A flush of the caller's own VP never waits: its lower
VTL runs, so no higher VTL of it holds a lock.
"""

from __future__ import annotations

import threading
import time

from ..hyperv.hypercall import HvSuspend

SUSPEND_SLICE = 0.02


class TlbLocks:
    def __init__(self, vsm):
        self.vsm = vsm
        self.held: dict[tuple[int, int], int] = {}      # (vp, lower VTL) -> bitmask of holding VTLs
        self.cond: threading.Condition | None = None    # on the Hyper-V lock, made when first needed
        self.held_calls = 0                             # flush attempts a lock held back
        self.suspended = 0                              # ... that returned to the guest to re-issue

    def _notify(self) -> None:
        if self.cond is not None:
            self.cond.notify_all()

    def set(self, vp: int, holder: int, lower: int, locked: bool) -> None:
        """``holder``'s VsmVpSecureVtlConfig for ``lower`` on ``vp`` changed (caller holds hv.lock)."""
        key = (vp, lower)
        mask = self.held.get(key, 0)
        mask = mask | 1 << holder if locked else mask & ~(1 << holder)
        if mask:
            self.held[key] = mask
        else:
            self.held.pop(key, None)
            self._notify()

    def locked(self, vp: int, vtl: int) -> bool:
        return (vp, vtl) in self.held

    def released_by_return(self, vp: int, holder: int) -> list[int]:
        """VP ``vp`` returned from VTL ``holder``: release every lock it holds there; the
        lower VTLs that were locked (their TlbLocked bits now read 0)."""
        freed = [lower for (v, lower), mask in self.held.items() if v == vp and mask >> holder & 1]
        for lower in freed:
            self.set(vp, holder, lower, False)
        return freed

    def wait_unlocked(self, hv, call, vps) -> None:
        """Before a flush from ``call.plane`` of the TLBs of ``vps``: hold the call while any of
        them is locked (the caller holds hv.lock); HvSuspend if still locked after the slice."""
        plane, me = call.plane, call.thread.index
        if not any(self.locked(v, plane) for v in vps if v != me):
            return
        self.held_calls += 1
        if self.cond is None:
            self.cond = threading.Condition(hv.lock)
        deadline = time.monotonic() + SUSPEND_SLICE
        machine = hv.machine
        while any(self.locked(v, plane) for v in vps if v != me):
            self.vsm.remote.service(call.thread)      # a lock holder may be waiting for this VP
            left = deadline - time.monotonic()
            if left <= 0 or machine.stopping:
                self.suspended += 1
                raise HvSuspend(f"VTL{plane} TLB of VP {[v for v in vps if self.locked(v, plane)]} is locked")
            self.cond.wait(left)
