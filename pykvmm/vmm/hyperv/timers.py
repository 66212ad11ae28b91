"""TLFS "Timers": the partition reference counter (TIME_REF_COUNT), the reference TSC page,
the TSC and APIC frequency MSRs, and the synthetic timers STIMER0-3 of every VP and VTL.

Reference time is one partition clock in 100 ns units. The guest reads it two ways that
must agree: the TSC page, ``((tsc * TscScale) >> 64) + TscOffset``, and the MSR, which
pykvmm computes from the same formula and the vCPU's TSC (KVM_GET_MSRS IA32_TSC on the
exiting vCPU), so the two never drift apart. TscScale comes from KVM_GET_TSC_KHZ; the
offset is calibrated per plane (each plane may be its own KVM VM with its own TSC offset)
against the host's monotonic clock, which drives the timers. Without a TSC frequency the
page says "invalid" (TscSequence 0) and the guest falls back to the MSR.

Synthetic timers (CONFIG: Enable 0, Periodic 1, Lazy 2, AutoEnable 3, ApicVector 11:4,
DirectMode 12, SINTx 19:16; bits 15:13 and 63:20 RsvdZ -> #GP; DirectMode without
hv_stimer_direct -> #GP). A write of COUNT = 0 disables the timer, a non-zero COUNT with
AutoEnable enables it; SINTx = 0 outside direct mode disables it. One-shot: COUNT is the
absolute expiration time (already past: expires at once); periodic: COUNT is the period.
On expiry a HVMSG_TIMER_EXPIRED message (TimerIndex, ExpirationTime, DeliveryTime) goes to
the SINTx slot; if the slot is busy the message-pending flag is set and the expiry waits for
the guest's EOM. Direct mode asserts ApicVector instead. A one-shot timer disables itself
after delivery. A periodic one keeps the schedule expiration + k * period (periods below
50 us are stretched to 50 us). When a delivery comes after the next expiration is already
due (the guest held the slot, or the host was slow), a lazy timer skips the periods it
missed and stays on that grid, as KVM does for every periodic timer; a timer that is not
lazy catches up by a shortened period: the missed expirations come half a period apart,
each with its own ExpirationTime, never back to back, so a guest whose handler cannot keep
up still runs between them. (Delivered at once, each at the EOM of the one before, they kept
a guest on a host slower than the period in its handler; with the auto-EOI kick rate this
made kvm-unit-tests' hyperv_stimer time out under nested KVM.) More than CATCH_UP_LIMIT periods behind, a timer that is
not lazy skips too. One thread runs every timer of the machine from
``time.monotonic_ns``.
"""

from __future__ import annotations

import heapq
import struct
import threading
import time

from ...kvm import KvmError
from ...x86 import arch
from . import tlfs as T
from .partition import MsrFault

APIC_FREQUENCY_HZ = 1_000_000_000   # KVM's LAPIC timer runs at 1 GHz (1 ns per bus cycle)
MIN_PERIOD = 500                    # 50 us: a floor on periodic timers, so a guest cannot make the
                                    # timer thread spin (a 100 ns period would be 10 M interrupts/s)
CATCH_UP_LIMIT = 100                # periods a timer that is not lazy catches up at the most


def _read_together(ref, other, tries: int = 8) -> tuple[int, int]:
    """(ref's value at the moment ``other`` was read, other's value), from the try whose two
    ref reads around it were closest together."""
    best = None
    for _ in range(tries):
        a = ref()
        o = other()
        b = ref()
        if best is None or b - a < best[0]:
            best = (b - a, (a + b) // 2, o)
    return best[1], best[2]


def next_expiration(expiration: int, period: int, now: int, lazy: bool) -> tuple[int, int]:
    """(the next ExpirationTime, when to fire it) of a periodic timer whose ``expiration`` was
    delivered at ``now`` (module docstring: skipping and catching up)."""
    due = expiration + period
    behind = now - due
    if behind < 0:
        return due, due
    if lazy or behind >= CATCH_UP_LIMIT * period:
        due = now + period - behind % period        # the next point of the grid
        return due, due
    return due, now + period // 2


class ReferenceClock:
    def __init__(self, hv):
        self.hv = hv
        self.mono0 = time.monotonic_ns()
        self.tsc_hz = 0
        self.scale = 0
        self.offsets: list[int] = [0] * hv.machine.plane_count
        self.sequence = 1

    def calibrate(self) -> None:
        """Before any vCPU runs: TSC frequency and each plane's TSC offset.

        Each pairing of two clocks is read as ref, other, ref and kept from the try with the
        narrowest bracket: a thread preempted between two reads would otherwise put one
        plane's time ahead of another's by the preemption, and a VTL could see the
        partition's time go backwards across a VtlCall."""
        t0 = self.hv.machine.threads[0].planes_vcpu
        try:
            self.tsc_hz = t0.plane0.get_tsc_khz() * 1000
        except KvmError:
            self.tsc_hz = 0
        if not self.tsc_hz:
            return
        self.scale = (T.REF_TICKS_PER_SECOND << 64) // self.tsc_hz
        tsc = [lambda v=t0.plane_vcpu(p): v.get_msrs([arch.MSR_IA32_TSC])[arch.MSR_IA32_TSC]
               for p in range(len(self.offsets))]
        now, tsc0 = _read_together(self.now, tsc[0])
        self.offsets[0] = now - self.ref_of(tsc0)
        for p in range(1, len(self.offsets)):
            tsc0, tscp = _read_together(tsc[0], tsc[p])
            self.offsets[p] = self.offsets[0] + self.ref_of(tsc0) - self.ref_of(tscp)

    def ref_of(self, tsc: int) -> int:
        return (tsc * self.scale) >> 64

    def now(self) -> int:
        return (time.monotonic_ns() - self.mono0) // 100

    def mono_ns(self, ref: int) -> int:
        return self.mono0 + ref * 100

    def read_msr(self, vp) -> int:
        if not self.tsc_hz:
            return self.now()
        v = self.hv.machine.threads[vp.index].planes_vcpu.plane_vcpu(vp.plane)
        tsc = v.get_msrs([arch.MSR_IA32_TSC])[arch.MSR_IA32_TSC]
        return (self.ref_of(tsc) + self.offsets[vp.plane]) & 0xFFFFFFFFFFFFFFFF

    def write_page(self, plane: int, gpa: int) -> None:
        mem = self.hv.memory
        if not self.tsc_hz:
            mem.write_u32(gpa + T.TSC_PAGE_SEQUENCE, 0)
            return
        mem.write_u32(gpa + T.TSC_PAGE_SEQUENCE, 0)
        mem.write_u64(gpa + T.TSC_PAGE_SCALE, self.scale)
        mem.write_u64(gpa + T.TSC_PAGE_OFFSET, self.offsets[plane])
        self.sequence = self.sequence % 0xFFFFFFFE + 1     # never 0 (invalid) or 0xFFFFFFFF
        mem.write_u32(gpa + T.TSC_PAGE_SEQUENCE, self.sequence)


class Stimer:
    __slots__ = ("vp", "index", "config", "count", "expiration", "pending", "armed_seq")

    def __init__(self, vp, index: int):
        self.vp, self.index = vp, index
        self.config = 0
        self.count = 0
        self.expiration: int | None = None   # reference time of the next expiry
        self.pending = False                 # expired, message not delivered yet
        self.armed_seq = 0

    @property
    def enabled(self) -> bool:
        return bool(self.config & T.STIMER_ENABLE)

    @property
    def sint(self) -> int:
        return (self.config >> 16) & 0xF

    @property
    def direct(self) -> bool:
        return bool(self.config & T.STIMER_DIRECT_MODE)


class Timers:
    """Every synthetic timer of the machine, run by one thread."""

    def __init__(self, hv, clock: ReferenceClock):
        self.hv, self.clock = hv, clock
        self.heap: list[tuple[int, int, Stimer]] = []
        self.cond = threading.Condition(hv.lock)
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.seq = 0
        self.counts = {"stimer_expirations": 0, "stimer_deferred": 0, "auto_eoi_kicks": 0}

    # -- arming -----------------------------------------------------------------------------
    def arm(self, st: Stimer) -> None:
        """(Re)start ``st`` from its CONFIG and COUNT (caller holds the lock)."""
        self.seq += 1
        st.armed_seq = self.seq
        st.pending = False
        st.expiration = None
        if not st.enabled:
            return
        now = self.clock.now()
        if st.config & T.STIMER_PERIODIC:
            if st.count == 0:
                return
            st.expiration = now + max(st.count, MIN_PERIOD)
        else:
            st.expiration = st.count
            if st.expiration <= now:
                self.expire(st, now)
                return
        heapq.heappush(self.heap, (st.expiration, st.armed_seq, st))
        self.cond.notify()

    def expire(self, st: Stimer, now: int) -> None:
        hv = self.hv
        vp = st.vp
        if st.direct:
            vector = (st.config >> 4) & 0xFF
            hv.assert_vector(vp.index, vp.plane, vector)
            delivered = True
        else:
            payload = struct.pack("<IIQQ", st.index, 0, st.expiration or now, now)
            delivered = hv.synic.deliver(vp, st.sint, T.HVMSG_TIMER_EXPIRED, payload, sender=0)
        if not delivered:
            st.pending = True
            self.counts["stimer_deferred"] += 1
            return
        self.counts["stimer_expirations"] += 1
        st.pending = False
        if st.config & T.STIMER_PERIODIC:
            st.expiration, fire = next_expiration(st.expiration or now, max(st.count, MIN_PERIOD), now,
                                                  bool(st.config & T.STIMER_LAZY))
            heapq.heappush(self.heap, (fire, st.armed_seq, st))
            self.cond.notify()
        else:
            st.config &= ~T.STIMER_ENABLE
            st.expiration = None

    def retry(self, vp) -> None:
        """After an EOM (or a SynIC change) of ``vp``: expiries waiting for a free slot."""
        now = self.clock.now()
        for st in vp.stimers:
            if st.pending and st.enabled:
                self.expire(st, now)

    # -- the thread ------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="hv-timers", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread:
            self.thread.join(2.0)

    def _run(self) -> None:
        hv = self.hv
        with self.cond:
            while not self.stopping and not hv.machine.stopping:
                now = self.clock.now()
                while self.heap and self.heap[0][0] <= now:
                    _, seq, st = heapq.heappop(self.heap)
                    if seq == st.armed_seq and st.enabled and st.expiration is not None and not st.pending:
                        self.expire(st, now)
                wait = None
                if self.heap:
                    wait = max(0.0, (self.heap[0][0] - self.clock.now()) * 100e-9)
                now_s = time.monotonic()
                late, next_kick = hv.auto_eoi_due(now_s)
                for t in late:
                    hv.kick_for_auto_eoi(t, now_s)
                self.counts["auto_eoi_kicks"] += len(late)
                if next_kick is not None:
                    wait = next_kick if wait is None else min(wait, next_kick)
                self.cond.wait(wait if wait is not None else 0.05)

    def summary(self) -> dict:
        return dict(self.counts)


def install(hv) -> None:
    clock = hv.clock = ReferenceClock(hv)
    timers = hv.timers = Timers(hv, clock)

    hv.add_msr(T.MSR_TIME_REF_COUNT, "HV_X64_MSR_TIME_REF_COUNT", clock.read_msr, None, feature="time")

    def write_ref_tsc(vp, value):
        gpa = value & ~0xFFF
        if value & T.PAGE_ENABLE:
            if gpa + 0x1000 > hv.memory.size:
                raise MsrFault(f"reference TSC page {gpa:#x} is outside guest memory")
        hv.place_overlay("reference_tsc", None, vp.plane, hv.planes[vp.plane].reference_tsc, value)
        if value & T.PAGE_ENABLE:
            clock.write_page(vp.plane, gpa)
        hv.planes[vp.plane].reference_tsc = value
    hv.add_msr(T.MSR_REFERENCE_TSC, "HV_X64_MSR_REFERENCE_TSC",
               lambda vp: hv.planes[vp.plane].reference_tsc, write_ref_tsc, feature="time")
    hv.add_msr(T.MSR_TSC_FREQUENCY, "HV_X64_MSR_TSC_FREQUENCY", lambda vp: clock.tsc_hz, None, feature="frequencies")
    hv.add_msr(T.MSR_APIC_FREQUENCY, "HV_X64_MSR_APIC_FREQUENCY", lambda vp: APIC_FREQUENCY_HZ, None,
               feature="frequencies")

    for vp in hv.vps.values():
        vp.stimers = [Stimer(vp, i) for i in range(T.STIMER_COUNT)]

    for i in range(T.STIMER_COUNT):
        def read_config(vp, i=i):
            return vp.stimers[i].config

        def write_config(vp, value, i=i):
            if value & T.STIMER_RSVDZ:
                raise MsrFault(f"STIMER{i}_CONFIG {value:#x} sets RsvdZ bits (15:13, 63:20)")
            if value & T.STIMER_DIRECT_MODE and not hv.config.has("stimer_direct"):
                raise MsrFault(f"STIMER{i}_CONFIG direct mode needs hv_stimer_direct")
            st = vp.stimers[i]
            if value & T.STIMER_DIRECT_MODE and value & T.STIMER_ENABLE and (value >> 4) & 0xFF < 0x10:
                raise MsrFault(f"STIMER{i}_CONFIG direct-mode vector {(value >> 4) & 0xFF:#x} is below 0x10")
            if not value & T.STIMER_DIRECT_MODE and (value >> 16) & 0xF == 0:
                value &= ~T.STIMER_ENABLE
            st.config = value
            timers.arm(st)

        def read_count(vp, i=i):
            return vp.stimers[i].count

        def write_count(vp, value, i=i):
            st = vp.stimers[i]
            st.count = value
            if value == 0:
                st.config &= ~T.STIMER_ENABLE
            elif st.config & T.STIMER_AUTO_ENABLE and (st.direct or st.sint):
                st.config |= T.STIMER_ENABLE
            timers.arm(st)

        hv.add_msr(T.MSR_STIMER0_CONFIG + 2 * i, f"HV_X64_MSR_STIMER{i}_CONFIG", read_config, write_config,
                   feature="stimer")
        hv.add_msr(T.MSR_STIMER0_COUNT + 2 * i, f"HV_X64_MSR_STIMER{i}_COUNT", read_count, write_count,
                   feature="stimer")
