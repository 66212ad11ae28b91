"""Plane switching done by pykvmm for backends where each plane is its own KVM vCPU
(multivm, apic-groups): the VMM decides which one to run and produces the plane events.

When a run ends with a plane event
    Only when a plane of req_exit_planes has an interrupt its LAPIC would deliver now: the
    highest IRR vector's class (or an expired LAPIC timer's, see below) is above the PPR class
    (TPR and in-service vectors, read with KVM_GET_LAPIC; ``x86.apic.deliverable_irr``). A
    masked interrupt produces no event; it produces one as soon as a scan sees it deliverable
    (a higher vector arrived, or the TPR was lowered from outside). So an event is never spurious, and nothing remembered about an
    earlier event can hold a later one back: every run() decides from the LAPICs as they are.

When the LAPICs are read (a "scan", one KVM_GET_LAPIC per plane)
    * on entry to run(): the planes of ``_hint``, always; every requested plane when entering
      a different plane than last time or when ``scan_gap`` has passed since the last scan
      ended (a read of a plane that is not running can itself take longer than scan_gap).
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
    it is one kick. A tick that finds no run needing a kick (every requested plane has its
    LAPIC off, or no run has planes requested) parks the ticker; the next run that needs
    kicks wakes it on entry, so the bound holds from that entry.

LAPIC timers of planes that are not running
    KVM notices a vCPU's timer expiry (one-shot, periodic, TSC-deadline) only when that vCPU
    next runs: the expiry is not in the IRR a scan reads. So a scan also learns, the first time
    it reads a plane after that plane ran, when its armed timer (LVT timer unmasked, LAPIC
    enabled) expires next: from TMCCT and the divide configuration, which KVM_GET_LAPIC
    computes at the read, or, in TSC-deadline mode, from IA32_TSC_DEADLINE and the guest's TSC
    (one KVM_GET_MSRS) and KVM_GET_TSC_KHZ (once per plane). It sets the VM's host timer
    (hosttimer.py) for then; at that time the plane is noted as by note_pending() and, once the
    expiry has come, every scan of it counts the LVT vector as pending besides the IRR: an event
    if its class is above the PPR (a TPR that masks it: no event, counted as masked, taken when
    the plane runs). What it costs a switch: nothing when the plane being left is read anyway
    (its last exit with interrupts off) or its LVT timer is masked; one KVM_GET_LAPIC when it
    left with interrupts on (the "counts as scanned" rule above is skipped for a plane whose
    last read showed its LVT timer unmasked, or that was never read after running); one
    KVM_GET_MSRS more in TSC-deadline mode. Bounds: a plane that unmasks its LVT timer
    (having been seen masked) and leaves with interrupts on in the same run is learned at the
    next scan (one kick interval, or scan_gap when the running plane makes exits); a one-shot
    expiry between a plane's last exit and that read (the handling of that exit: tens of
    microseconds here, more when the host is loaded) is taken when the plane next runs: KVM's
    TMCCT reads 0 for it, as for one delivered while the plane ran. The host timer fires
    within TIMER_SLACK of the expiry plus the thread's wake-up. A timer changed from outside
    with set_lapic on a plane that is not running is not seen until the plane runs.

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
    ``_timer_lvt``, ``_timer_at`` (owner: this vCPU's thread; ``_timer_at`` is read by the host
    timer's thread): which planes to read when they stop running, and the expiry learned for a
    plane with the plane's exit_count then (a plane that ran since has none: learned again at
    its next read). ``_timer_set``: when the host timer was last set for a plane, so that a
    plane switching often does not set one per switch.
    Nothing else: a plane event is computed from the scan of that moment and not stored
    (``_masked_seen`` only keeps the masked_interrupts statistic from counting a vector twice).
"""

from __future__ import annotations

import threading
import time

from .. import exits as X
from ..kvm import Vcpu
from ..uapi import ffi
from ..x86 import apic, arch
from ..x86.xsave import copy_fpu_state
from .api import KVM_PLANE_EVENT_INTERRUPT, MAX_PLANES, PlanesVcpu
from .hosttimer import HostTimer

_ALL_PLANES = (1 << MAX_PLANES) - 1
SCAN_GAP = 50e-6        # seconds between rate-limited scans of one vCPU
KICK_INTERVAL = 1e-3    # seconds between the ticker's kicks of a vCPU with planes requested
TIMER_SLACK = 50e-6     # seconds a plane's LAPIC timer event may come after its expiry (see _expired_timer)


class SoftSwitchVm:
    """Mixin for the VMs of soft-switching backends: the ticker that kicks vCPUs whose run has
    planes requested, so that interrupts arriving in the kernel are found even while the
    running plane is halted. Started by the first such run, stopped by ``close()``."""

    scan_gap = SCAN_GAP
    kick_interval = KICK_INTERVAL
    _ticker: threading.Thread | None = None
    _ticker_stop: threading.Event | None = None
    _ticker_wake: threading.Event | None = None
    _ticker_lock = threading.Lock()
    _host_timer: HostTimer | None = None

    def host_timer(self) -> HostTimer:
        """The VM's host timer (hosttimer.py) for LAPIC timer expiries of planes not running."""
        with self._ticker_lock:
            if self._host_timer is None:
                self._host_timer = HostTimer()
            return self._host_timer

    def start_ticker(self) -> None:
        with self._ticker_lock:
            if self._ticker is not None:
                return
            self._ticker_stop = threading.Event()
            self._ticker_wake = threading.Event()
            self._ticker = threading.Thread(target=self._tick, args=(self._ticker_stop, self._ticker_wake),
                                            name="plane-ticker", daemon=True)
            self._ticker.start()

    def _tick(self, stop: threading.Event, wake: threading.Event) -> None:
        # A tick that finds no run to kick parks the ticker until run_kvm() enters a run that
        # needs one (PlanesVm.wake_ticker). A ticker polling for nothing cost half of every
        # vCPU's time on mainline KVM under emulation (a Python wake-up there takes about as
        # long as 1 ms of guest exits), e.g. all the time a VTL1 was never enabled.
        while not stop.wait(self.kick_interval):
            if self._kick_due():
                continue
            wake.clear()
            if stop.is_set():           # stop_ticker() sets stop, then wake
                break
            self.ticker_parked = True
            # Published before this second look; run_kvm() publishes its run before reading
            # ticker_parked: one of the two sees the other (both under the GIL).
            if not self._kick_due():
                wake.wait()
            self.ticker_parked = False

    def _kick_due(self) -> bool:
        """Kick every vCPU whose run needs it; whether there was one."""
        due = False
        for cpu in list(self.vcpus.values()):
            if cpu.needs_scan_kick():
                cpu.kick()
                due = True
        return due

    def wake_ticker(self) -> None:
        self.ticker_parked = False
        wake = self._ticker_wake
        if wake is not None:
            wake.set()

    def stop_ticker(self) -> None:
        with self._ticker_lock:
            ticker, self._ticker = self._ticker, None
            if ticker is not None:
                self._ticker_stop.set()
                self._ticker_wake.set()
        if ticker is not None and ticker is not threading.current_thread():
            ticker.join()
        timer, self._host_timer = self._host_timer, None
        if timer is not None:
            timer.close()


class SoftSwitchVcpu(PlanesVcpu):
    """A vCPU whose planes are separate KVM vCPUs; pykvmm produces the plane events."""

    def __init__(self, vm, vcpu_id: int, v0: Vcpu):
        super().__init__(vm, vcpu_id)
        self._v0 = v0
        self._vcpu_of: dict[int, Vcpu] = {0: v0}   # plane id -> this vCPU's KVM vCPU in it
        self._apic_off = 0          # see the module docstring
        self._entered = 0           # planes entered since the last scan (vCPU thread only)
        self._last_scan = 0.0
        self.scan_gap = vm.scan_gap
        self.irr_scans = 0          # KVM_GET_LAPIC reads of planes that were not running
        self.plane_events = 0
        self.masked_interrupts = 0  # scans that found a new highest vector masked by PPR
        self._masked_seen: dict[int, int] = {}
        self._timer_lvt = _ALL_PLANES   # planes whose last read showed an unmasked LVT timer (or
                                        # never read): read when they stop running (module docstring)
        self._timer_at: dict[int, tuple] = {}   # plane -> (its exit_count, expiry or None) learned
        self._timer_set: dict[int, float] = {}  # plane -> when the host timer was last set for it
        self._tsc_khz: dict[int, int] = {}
        self.timer_events = 0       # plane events for a LAPIC timer expiry KVM held back
        self.timer_reads = 0        # KVM_GET_MSRS of IA32_TSC_DEADLINE for that
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
        for p, v in self._vcpu_of.items():
            if planes_mask >> p & 1:
                bit = 1 << p
                self.irr_scans += 1
                v.get_lapic(into=self._lapic)
                seen = apic.pending(self._lapic_regs)   # None: software-disabled
                lvt = None if seen is None else seen[2]
                if lvt is not None:
                    timer = self._expired_timer(p, v, lvt)
                else:                       # no armed timer (before its first run a plane shows
                    timer = None            # only the reset state: nothing learned then)
                    if v.exit_count:
                        self._timer_lvt &= ~bit
                if seen is None:
                    off |= bit
                    continue
                irr, ppr, _ = seen
                vector = irr if timer is None or irr is not None and irr > timer else timer
                if vector is not None and vector >> 4 > ppr:     # deliverable now
                    found |= bit
                    self._masked_seen.pop(p, None)
                    if timer is not None and (irr is None or irr >> 4 <= ppr):
                        self.timer_events += 1
                elif vector is None:
                    self._masked_seen.pop(p, None)
                elif self._masked_seen.get(p) != vector:    # a new highest vector, masked by the PPR
                    self._masked_seen[p] = vector
                    self.masked_interrupts += 1
        # after the reads: a read of a plane that is not running can take longer than scan_gap
        # here, and the next exit would then read it again at once
        self._last_scan = time.monotonic()
        if off:
            with self._lock:
                self._apic_off |= off & ~self._hint     # unless note_pending() came meanwhile
        return found

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
        # Without a call besides run_kvm(): the same plane again with no plane requested, a
        # switch with none requested, and the look after an exit when nothing is due.
        v = self._vcpu_of.get(plane)
        if v is None:
            v = self.plane_vcpu(plane)          # raises: no instance of this vCPU there
        req = req_exit_planes & ~(1 << plane) & _ALL_PLANES
        left = self.last_plane
        if req:
            # the look due on entry (module docstring)
            if self.vm._ticker is None:
                self.vm.start_ticker()
            # (not fresh with its LVT timer unmasked: the read learns when the timer expires)
            fresh = 1 << left if plane != left and self._vcpu_of[left].if_flag and \
                not self._timer_lvt >> left & 1 else 0
            found = self._look(req, force=plane != left, fresh=fresh)
            if found:
                return self._event(found, req)
        if plane != left:
            if self.vm.shared_fpu:
                copy_fpu_state(self._vcpu_of[left], v, self.vm.pkru_offset)
            self.last_plane = plane
            self._entered |= 1 << plane     # it may enable its LAPIC while it runs (see _scan)
        ex = self.run_kvm(v, req)
        if type(ex) in self.checked_exits:
            ex = self.check_exit(v, ex)
        if req:
            kicked = type(ex) is X.Interrupted
            # The look after an exit. _look decides; this only leaves it out when it would read
            # nothing: no kick, no requested plane hinted, and every requested plane either
            # scanned less than scan_gap ago or with its LAPIC off (_apic_off, read without the
            # lock: note_pending() sets _hint too, which the next entry's look then sees).
            if kicked or self._hint & req or req & ~(self._apic_off & ~self._entered) and \
                    time.monotonic() - self._last_scan >= self.scan_gap:
                found = self._look(req, force=kicked)
                if found:
                    if kicked:
                        return self._event(found, req)
                    with self._lock:
                        self._hint |= found     # the next entry looks again and returns the event
        return ex

    def run_switching(self, plane: int, switch):
        """run(plane) with no plane requested, where ``switch`` (fastexit.FastSwitch) may switch
        planes in C; the exit is of plane ``switch.plane``. Not with a shared FPU (copied at
        each plane change here)."""
        ex = self.run_kvm(self._vcpu_of[plane], 0, switch)
        self.last_plane = switch.plane
        self._entered |= switch.entered     # (see _scan)
        if type(ex) in self.checked_exits:
            ex = self.check_exit(switch.vcpus[switch.plane], ex)
        return ex

    # -- LAPIC timers of planes that are not running (module docstring) --------------------
    def _expired_timer(self, p: int, v: Vcpu, lvt: int) -> int | None:
        """The LVT timer vector if plane ``p``'s armed timer (``lvt``, its unmasked LVT entry,
        in the LAPIC _scan just read) expired since the plane stopped running (KVM holds such an
        expiry back until the plane runs, and it is not in the IRR), else None.
        The first read since the plane ran learns when its timer expires and sets the VM's host
        timer for then; a TSC-deadline timer costs one KVM_GET_MSRS for that."""
        self._timer_lvt |= 1 << p
        known = self._timer_at.get(p)
        if known is None or known[0] != v.exit_count:      # it ran since
            at = self._timer_expiry(p, v, self._lapic_regs, lvt)
            known = self._timer_at[p] = (v.exit_count, at)
            if at is not None:
                # Set the host timer only when it is not set already for about then: a plane
                # that switches often would otherwise queue one timer per switch. One set
                # earlier sets itself again when it fires; one set later by up to TIMER_SLACK
                # is kept (far less than what a switch costs).
                was = self._timer_set.get(p)
                if was is None or was > at + TIMER_SLACK or was <= time.monotonic():
                    self._set_timer(p, at)
        at = known[1]
        return lvt & 0xFF if at is not None and time.monotonic() >= at else None

    def _timer_expiry(self, p: int, v: Vcpu, regs, lvt: int) -> float | None:
        """When (time.monotonic) plane ``p``'s armed timer expires next, None if it is not counting.
        A one-shot timer that expired in the moment between the plane's last exit and this read
        (TMCCT reads 0 then, as after a delivered one) is taken when the plane next runs."""
        if lvt & apic.LVT_TIMER_MODE != arch.LVT_TIMER_TSC_DEADLINE:
            ns = apic.timer_remaining_ns(regs)
            return None if ns is None else time.monotonic() + ns * 1e-9
        khz = self._tsc_khz.get(p)
        if khz is None:
            khz = self._tsc_khz[p] = v.get_tsc_khz()
        self.timer_reads += 1
        msrs = v.get_msrs([arch.MSR_IA32_TSC_DEADLINE, arch.MSR_IA32_TSC])   # the guest's TSC of now too
        now = time.monotonic()
        deadline = msrs.get(arch.MSR_IA32_TSC_DEADLINE, 0)
        if not deadline or not khz:
            return None
        return now + max(0, deadline - msrs[arch.MSR_IA32_TSC]) / (khz * 1e3)

    def _set_timer(self, p: int, at: float) -> None:
        self._timer_set[p] = at
        self.vm.host_timer().call_at(at, self._timer_fired, p)

    def _timer_fired(self, p: int) -> None:
        """On the host timer's thread: if plane ``p``'s learned expiry has come, look at the
        plane as note_pending() would (the scan decides, from its TPR and ISR then); if it is
        still to come (learned again since), set the timer for it. Nothing if the plane ran."""
        known = self._timer_at.get(p)
        if known is None or known[1] is None or self._vcpu_of[p].exit_count != known[0]:
            return
        if known[1] > time.monotonic():
            self._set_timer(p, known[1])
            return
        with self._lock:
            self._hint |= 1 << p
            kick = self._in_run is not None and self._running_req & (1 << p)
        if kick:
            self.kick()

    def _event(self, found: int, req: int):
        self.plane_events += 1
        return X.PlaneEvent(KVM_PLANE_EVENT_INTERRUPT, found, found & req, 0, [0] * 8)
