"""Plane switching done by pykvmm for backends where each plane is its own KVM vCPU
(multivm, apic-groups): the VMM decides which one to run and produces the plane events.

When a run ends with a plane event
    Only when a plane of req_exit_planes has an interrupt its LAPIC would deliver now: the
    highest IRR vector's class is above the PPR class (TPR and in-service vectors, read with
    KVM_GET_LAPIC; ``x86.apic.deliverable_irr``). A masked interrupt produces no event; it
    produces one as soon as a scan sees it deliverable (a higher vector arrived, or the TPR
    was lowered from outside). So an event is never spurious, and nothing remembered about an
    earlier event can hold a later one back: every run() decides from the LAPICs as they are.

When the LAPICs are read (a "scan", one KVM_GET_LAPIC per plane)
    * on entry to run(): the planes of ``_hint``, always; every requested plane when entering
      a different plane than last time or when ``scan_gap`` has passed since the last scan.
      Entering another plane, the plane just left is not read when its last exit was the
      guest's own with interrupts enabled (kvm_run.if_flag): an interrupt its LAPIC would
      deliver was delivered to it at its last entry, and one that came after that arrived
      while it was not running, the case the bound below covers. It counts as scanned then.
    * after every exit of the running plane: the same rule (rate-limited by ``scan_gap``);
    * after a kick (KVM_RUN ended by the signal): every requested plane.
    A vCPU whose run has planes requested is kicked by the VM's ticker every
    ``kick_interval`` seconds, whatever the running plane does (spins, makes exits or is
    halted in KVM_RUN), and at once by note_pending() for an interrupt pykvmm itself delivers
    (``Plane.signal_msi``). The bound for an in-kernel IPI into a plane that is not running is
    therefore one kick interval plus one scan (``make bench``: wake-up delay); for signal_msi
    it is one kick.

The pending state kept, its one owner and the one place each is cleared
    ``_hint`` (planes to scan at the next look, whatever the rate limit; owner: this vCPU,
    under ``_lock``): set by note_pending(), and by run() when a scan after an exit found a
    deliverable interrupt (so the next entry returns the event without waiting for scan_gap);
    cleared only by ``_scan``, for each plane it reads, before reading, so a note_pending()
    racing with the read is seen by the read or sets the bit again. A stale bit costs one scan,
    never an event: the bit of the running plane is left alone (it is not in req_exit_planes)
    and goes at the next scan that includes that plane.
    ``_kicked``/``_in_run``/``_running_req``/``_entries_held`` (PlanesVcpu; owner: kick(),
    run_kvm() and hold_entries()): see planes/api.py. ``_kicked`` is cleared only by run_kvm().
    ``_apic_off`` (planes not to scan; owner: this vCPU, under ``_lock``): a plane whose scan
    found its LAPIC software-disabled (SVR bit 8 clear) and that has not run since: KVM drops
    fixed interrupts to such a LAPIC, so nothing can become deliverable there until the plane
    runs (and may enable it) or note_pending() says otherwise; both clear the bit (an entry
    only notes the plane in ``_entered``, which the vCPU thread alone touches, and the next
    scan folds it in under the lock: no lock taken per switch). Planes a
    guest never enters cost one scan, not one per exit and kick (a KVM_GET_LAPIC of a plane
    VM's vCPU that is not running costs ~150 us on kvm_pvm: 64 vCPUs x 16 planes took minutes).
    Nothing else: a plane event is computed from the scan of that moment and not stored
    (``_masked_seen`` only keeps the masked_interrupts statistic from counting a vector twice).
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

_ALL_PLANES = (1 << MAX_PLANES) - 1
SCAN_GAP = 50e-6        # seconds between rate-limited scans of one vCPU
KICK_INTERVAL = 1e-3    # seconds between the ticker's kicks of a vCPU with planes requested


class SoftSwitchVm:
    """Mixin for the VMs of soft-switching backends: the ticker that kicks vCPUs whose run has
    planes requested, so that interrupts arriving in the kernel are found even while the
    running plane is halted. Started by the first such run, stopped by ``close()``."""

    scan_gap = SCAN_GAP
    kick_interval = KICK_INTERVAL
    _ticker: threading.Thread | None = None
    _ticker_stop: threading.Event | None = None
    _ticker_lock = threading.Lock()

    def start_ticker(self) -> None:
        with self._ticker_lock:
            if self._ticker is not None:
                return
            self._ticker_stop = threading.Event()
            self._ticker = threading.Thread(target=self._tick, args=(self._ticker_stop,),
                                            name="plane-ticker", daemon=True)
            self._ticker.start()

    def _tick(self, stop: threading.Event) -> None:
        while not stop.wait(self.kick_interval):
            for cpu in list(self.vcpus.values()):
                if cpu.needs_scan_kick():
                    cpu.kick()

    def stop_ticker(self) -> None:
        with self._ticker_lock:
            ticker, self._ticker = self._ticker, None
            if ticker is not None:
                self._ticker_stop.set()
        if ticker is not None and ticker is not threading.current_thread():
            ticker.join()


class SoftSwitchVcpu(PlanesVcpu):
    """A vCPU whose planes are separate KVM vCPUs; pykvmm produces the plane events."""

    def __init__(self, vm, vcpu_id: int, v0: Vcpu):
        super().__init__(vm, vcpu_id)
        self._v0 = v0
        self._vcpu_of: dict[int, Vcpu] = {}   # plane id -> this vCPU's KVM vCPU in it
        self._apic_off = 0          # see the module docstring
        self._entered = 0           # planes entered since the last scan (vCPU thread only)
        self._last_scan = 0.0
        self.scan_gap = vm.scan_gap
        self.irr_scans = 0          # KVM_GET_LAPIC reads of planes that were not running
        self.plane_events = 0
        self.masked_interrupts = 0  # scans that found a new highest vector masked by PPR
        self._masked_seen: dict[int, int] = {}
        self._lapic = ffi.new("struct kvm_lapic_state *")    # every scan reads into it
        self._lapic_regs = ffi.buffer(self._lapic.regs)

    @property
    def plane0(self) -> Vcpu:
        return self._v0

    def add_plane_vcpu(self, plane_id: int, v: Vcpu) -> None:
        """The backend made this vCPU's instance in ``plane_id``."""
        self._vcpu_of[plane_id] = v

    def plane_vcpu(self, plane_id: int) -> Vcpu:
        v = self._vcpu_of.get(plane_id)
        return v if v is not None else super().plane_vcpu(plane_id)    # (which raises)

    def set_cpuid2(self, cpuid) -> None:
        self.cpuid = cpuid
        for p in self.planes:
            self.plane_vcpu(p).set_cpuid2(cpuid)

    # -- pending interrupts --------------------------------------------------------------
    def note_pending(self, plane_id: int) -> None:
        with self._lock:
            self._hint |= 1 << plane_id
            self._apic_off &= ~(1 << plane_id)
            kick = self._in_run is not None and self._running_req & (1 << plane_id)
        if kick:
            self.kick()

    def needs_scan_kick(self) -> bool:
        """In KVM_RUN with planes requested: only a kick lets it look at their LAPICs."""
        return bool(self._running_req & ~(self._apic_off & ~self._entered)) and self._in_run is not None

    def _scan(self, planes_mask: int) -> int:
        """Planes of ``planes_mask`` whose LAPIC would deliver an interrupt now."""
        with self._lock:
            self._hint &= ~planes_mask
            self._apic_off &= ~self._entered    # they may have enabled their LAPIC meanwhile
            self._entered = 0
            planes_mask &= ~self._apic_off
        found = off = 0
        self._last_scan = time.monotonic()
        for p, v in self._vcpu_of.items():
            if planes_mask >> p & 1:
                self.irr_scans += 1
                v.get_lapic(into=self._lapic)
                regs = self._lapic_regs
                if not apic.software_enabled(regs):
                    off |= 1 << p
                elif apic.deliverable_irr(regs) is not None:
                    found |= 1 << p
                    self._masked_seen.pop(p, None)
                else:
                    self._note_masked(p, apic.highest_irr(regs))
        if off:
            with self._lock:
                self._apic_off |= off & ~self._hint     # unless note_pending() came meanwhile
        return found

    def _note_masked(self, plane: int, vector: int | None) -> None:
        if vector is None:
            self._masked_seen.pop(plane, None)
        elif self._masked_seen.get(plane) != vector:
            self._masked_seen[plane] = vector
            self.masked_interrupts += 1

    def _look(self, req: int, force: bool, fresh: int = 0) -> int:
        """Scan what is due (see the module docstring); the planes of ``req`` found deliverable.
        ``fresh``: planes known to have nothing deliverable now without reading them."""
        if force or time.monotonic() - self._last_scan >= self.scan_gap:
            due = req & ~fresh | self._hint & req
            if not due:
                self._last_scan = time.monotonic()
                return 0
        else:
            due = self._hint & req
        return self._scan(due) if due else 0

    # -- running -------------------------------------------------------------------------
    checked_exits: frozenset = frozenset()   # exit types the backend's check_exit() looks at

    def check_exit(self, v: Vcpu, ex):
        """An exit of ``checked_exits`` as the backend sees it (multivm: memory views)."""
        return ex

    def run(self, plane: int = 0, req_exit_planes: int = 0):
        # The common case (the same plane again, no plane requested) costs the two lookups
        # and the two tests before run_kvm(), nothing more.
        v = self._vcpu_of.get(plane)
        if v is None:
            v = self.plane_vcpu(plane)          # raises: no instance of this vCPU there
        req = req_exit_planes & ~(1 << plane) & _ALL_PLANES
        if req or plane != self.last_plane:
            found = self._before_entry(v, plane, req)
            if found:
                return self._event(found, req)
        ex = self.run_kvm(v, req)
        if type(ex) in self.checked_exits:
            ex = self.check_exit(v, ex)
        if req:
            kicked = type(ex) is X.Interrupted
            found = self._look(req, force=kicked)
            if found:
                if kicked:
                    return self._event(found, req)
                with self._lock:
                    self._hint |= found     # the next entry looks again and returns the event
        return ex

    def _before_entry(self, v: Vcpu, plane: int, req: int) -> int:
        """Entering another plane than last time, or with planes requested: the look due on
        entry (module docstring) and, on a switch, the shared FPU. Returns the planes found."""
        switching = plane != self.last_plane
        if req:
            if self.vm._ticker is None:
                self.vm.start_ticker()
            left = self.last_plane
            fresh = 1 << left if switching and self._vcpu_of[left].if_flag else 0
            found = self._look(req, force=switching, fresh=fresh)
            if found:
                return found
        if switching:
            if self.vm.shared_fpu:
                copy_fpu_state(self.plane_vcpu(self.last_plane), v, self.vm.pkru_offset)
            self.last_plane = plane
            self._entered |= 1 << plane     # it may enable its LAPIC while it runs (see _scan)
        return 0

    def _event(self, found: int, req: int):
        self.plane_events += 1
        return X.PlaneEvent(KVM_PLANE_EVENT_INTERRUPT, found, found & req, 0, [0] * 8)
