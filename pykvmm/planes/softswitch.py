"""Plane switching done by pykvmm for backends where each plane is its own KVM vCPU
(multivm, apic-groups): the VMM decides which one to run and produces the plane events.

Pending interrupts come from two places: the ones pykvmm itself delivers (``note_pending``,
immediate) and in-kernel IPIs into a plane that is not running, found by reading that
plane's LAPIC IRR (KVM_GET_LAPIC): on entry to run(), after exits of the running plane (at
most once per ``scan_gap`` seconds), and when the thread is kicked.
"""

from __future__ import annotations

import threading
import time

from .. import exits as X
from ..kvm import Vcpu
from ..uapi import ffi
from ..x86 import apic
from ..x86.xsave import copy_fpu_state
from .api import KVM_PLANE_EVENT_INTERRUPT, MAX_PLANES, PlanesVcpu


class SoftSwitchVcpu(PlanesVcpu):
    """A vCPU whose planes are separate KVM vCPUs; pykvmm produces the plane events."""

    def __init__(self, vm, vcpu_id: int, v0: Vcpu):
        super().__init__(vm, vcpu_id)
        self._v0 = v0
        self.cpuid = None
        self._pending = 0           # planes with an interrupt pykvmm knows is pending
        self._lock = threading.Lock()
        self._running_req = 0       # requested planes of the run in progress (for kicks)
        self._in_run = None         # the KVM vCPU inside KVM_RUN, if any
        self._last_scan = 0.0
        self.scan_gap = vm.scan_gap
        self.irr_scans = 0
        self.plane_events = 0
        self._kicked = False

    @property
    def plane0(self) -> Vcpu:
        return self._v0

    def set_cpuid2(self, cpuid) -> None:
        self.cpuid = cpuid
        for p in self.planes:
            self.plane_vcpu(p).set_cpuid2(cpuid)

    # -- pending interrupts --------------------------------------------------------------
    def note_pending(self, plane_id: int) -> None:
        with self._lock:
            self._pending |= 1 << plane_id
            kick = self._in_run is not None and self._running_req & (1 << plane_id)
        if kick:
            self.kick()

    def needs_scan_kick(self) -> bool:
        """In KVM_RUN with planes requested: only a kick lets it look at their IRRs."""
        return bool(self._running_req) and self._in_run is not None

    def scan(self, planes_mask: int) -> int:
        """Planes of ``planes_mask`` whose LAPIC has an interrupt in IRR (one ioctl each)."""
        found = 0
        self._last_scan = time.monotonic()
        for p, plane in self.vm.planes.items():
            if planes_mask >> p & 1 and self.id in plane.vcpus:
                self.irr_scans += 1
                regs = bytes(ffi.buffer(plane.vcpus[self.id].get_lapic().regs))
                if apic.irr_pending(regs):
                    found |= 1 << p
        return found

    def pending_planes(self, req: int, force_scan: bool = False) -> int:
        pending = self._pending
        if req & ~pending and (force_scan or time.monotonic() - self._last_scan >= self.scan_gap):
            pending |= self.scan(req & ~pending)
        return pending

    # -- running -------------------------------------------------------------------------
    def run(self, plane: int = 0, req_exit_planes: int = 0):
        v = self.plane_vcpu(plane)
        req = req_exit_planes & ~(1 << plane) & ((1 << MAX_PLANES) - 1)
        switching = plane != self.last_plane
        # Interrupts that arrived while outside KVM_RUN are re-checked on entry (an IRR scan
        # is forced when entering a different plane, rate-limited otherwise).
        if req:
            pending = self.pending_planes(req, force_scan=switching) & ~(1 << plane)
            if pending & req:
                return self._event(pending, req)
        if switching and self.vm.shared_fpu:
            copy_fpu_state(self.plane_vcpu(self.last_plane), v, self.vm.pkru_offset)
        self.last_plane = plane
        with self._lock:
            self._pending &= ~(1 << plane)      # entering a plane clears its pending bit
            if self._kicked:
                self._kicked = False
                return X.Interrupted()
            self._running_req = req
            self._in_run = v
        try:
            ex = v.run()
        finally:
            with self._lock:
                self._in_run = None
                self._running_req = 0
                self._kicked = False
                v.request_immediate_exit(False)
        if req:
            kicked = type(ex) is X.Interrupted
            found = self.pending_planes(req, force_scan=kicked) & req
            if found:
                with self._lock:
                    self._pending |= found      # remembered: the next entry exits at once
                if kicked:
                    return self._event(self._pending, req)
        return ex

    def _event(self, pending: int, req: int):
        self.plane_events += 1
        return X.PlaneEvent(KVM_PLANE_EVENT_INTERRUPT, pending, pending & req, 0, [0] * 8)

    def kick(self) -> None:
        """Signal + immediate_exit, under the lock that run() takes before entering KVM_RUN,
        so a kick can never fall between the check and the ioctl."""
        with self._lock:
            self._kicked = True
            v = self._in_run
            if v is not None:
                v.request_immediate_exit()
                if self.vm.kicker is not None and self.thread_id is not None:
                    self.vm.kicker(self.thread_id)
