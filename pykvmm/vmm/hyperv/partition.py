"""The Hyper-V partition: per-partition and per-VTL state, the synthetic-MSR path (the MSR
filter sends 0x40000000-0x400001FF to userspace; the handlers below answer or #GP), the
hypercall table, and the hooks into the machine's vCPU threads.

An MSR handler is ``read(vp) -> int`` / ``write(vp, value)``; raising MsrFault injects #GP.
"""

from __future__ import annotations

import errno
import threading
import time
from dataclasses import dataclass, field

from ... import exits as X, kvm as K
from ...uapi import constants as C, ffi
from ...x86 import apic, arch
from .. import events as ev
from ..memory import GuestMemoryError
from ..outcomes import Fault, Stop, StopKind
from . import tlfs as T
from .features import HvConfig
from .hypercall import FAST_REGS_SIZE, HvError, HvUndefined, HypercallTable, is_cpl0, rewind_to_out, write_xmm


class MsrFault(Exception):
    """#GP for this RDMSR/WRMSR (the reason is kept for traces and tests)."""


@dataclass
class PlaneHv:
    """Per partition, per VTL (one per plane): the TLFS makes these private to a VTL."""
    guest_os_id: int = 0
    hypercall: int = 0
    reference_tsc: int = 0

    @property
    def hypercall_gpa(self) -> int | None:
        return self.hypercall & ~0xFFF if self.hypercall & T.HYPERCALL_ENABLE else None


# A vCPU that holds auto-EOI vectors is kicked so that pykvmm can EOI them (HyperV.service),
# once it has run AUTO_EOI_KICK since its last service, or KICK_DUTY times as long as its last
# kick took to serve (from the kick to its way back into the guest), whichever is longer: kicks
# then take at most a fifth of a vCPU's time. Kicked at a fixed rate, a vCPU whose kicks took
# longer to serve than the rate (nested KVM under QEMU TCG: about 2 ms) ran almost no guest
# code, e.g. while an auto-EOI vector waited in the IRR for a long handler to end.
AUTO_EOI_KICK = 200e-6
KICK_DUTY = 4


@dataclass
class VpHv:
    """Per virtual processor, per VTL: SynIC, timers, VP assist page (private to a VTL)."""
    index: int
    plane: int
    vp_assist: int = 0
    synic: object = None
    stimers: list = field(default_factory=list)
    auto_eoi: set = field(default_factory=set)   # vectors delivered with auto-EOI, not yet EOIed
    auto_eoi_serviced: float = 0.0      # time.monotonic() of its thread's last auto-EOI service,
    auto_eoi_kicked: float = 0.0        # of the kick not yet served (0: none)
    auto_eoi_gap: float = AUTO_EOI_KICK     # from a service to the next kick


class HyperV:
    """The Hyper-V personality layer of one machine (usable with one plane or many)."""

    def __init__(self, machine, config: HvConfig):
        config.check()
        self.machine = machine
        self.config = config
        self.memory = machine.memory
        self.lock = threading.RLock()
        self.planes = [PlaneHv() for _ in range(machine.plane_count)]
        self.vps: dict[tuple[int, int], VpHv] = {}
        for i in range(machine.config.vcpus):
            for p in range(machine.plane_count):
                self.vps[(i, p)] = VpHv(i, p)
        self.msr_read: dict[int, object] = {}
        self.msr_write: dict[int, object] = {}
        self.msr_names: dict[int, str] = {}
        self.table = HypercallTable(self)
        self.on_continuation = None      # test hook: callable(call, next_rep) at each continuation
        self.tlb_flush_gate = None       # VSM TLB locks: callable(call, vps) before a flush (vsm/tlb.py)
        self.vp_requests = None          # VSM: other VPs' register accesses, served here (vsm/remote.py)
        self.overlays = None             # VSM: overlay pages per VTL (vsm/overlay.py)
        self.stats = {"msr_exits": 0, "gp_injected": 0, "ud_injected": 0}
        self.gp_reasons: list[str] = []
        self.stopped_why: str | None = None
        from .testdev import PORT
        self.testdev_port = PORT

    # -- set-up ---------------------------------------------------------------------------
    def attach(self) -> None:
        """Before vCPUs are created: route the synthetic MSRs to userspace on every plane VM."""
        pvm = self.machine.pvm
        kvm = self.machine.kvm
        if not kvm.check_extension(C.KVM_CAP_X86_USER_SPACE_MSR) or not kvm.check_extension(C.KVM_CAP_X86_MSR_FILTER):
            raise K.KvmError("KVM_CHECK_EXTENSION", kvm.label, errno.ENOTSUP,
                             "the Hyper-V personality needs KVM_CAP_X86_USER_SPACE_MSR and "
                             "KVM_CAP_X86_MSR_FILTER (synthetic MSRs are emulated in userspace)")
        bitmap = bytes(T.MSR_RANGE_SIZE // 8)   # all zero: every MSR of the range exits
        flags = C.KVM_MSR_FILTER_READ | C.KVM_MSR_FILTER_WRITE

        def setup(vm):
            vm.enable_cap(C.KVM_CAP_X86_USER_SPACE_MSR, C.KVM_MSR_EXIT_REASON_FILTER)
            vm.set_msr_filter(False, [(flags, T.MSR_RANGE_BASE, T.MSR_RANGE_SIZE, bitmap)])
        pvm.on_every_plane_vm(setup)
        from . import messaging, synic, testdev, timers, vapic, vmmu, vp
        for module in (vp, timers, synic, messaging, vapic, vmmu, testdev):
            module.install(self)
        from .hypercall import install_echo
        install_echo(self)
        if self.config.has("vsm"):
            from ..vsm import install as install_vsm
            install_vsm(self)

    def cpuid(self, cpuid):
        from .discovery import with_hyperv_leaves
        return with_hyperv_leaves(cpuid, self.config, self.machine.config.vcpus)

    def attach_thread(self, t) -> None:
        """Give one vCPU thread the MSR exits and the auto-EOI service on kicks."""
        t.set_exit_handler(X.X86Rdmsr, lambda ex, t=t: self._on_rdmsr(t, ex))
        t.set_exit_handler(X.X86Wrmsr, lambda ex, t=t: self._on_wrmsr(t, ex))
        kicked = t.set_exit_handler(X.Interrupted, None)

        def on_interrupted(ex, t=t):        # a kick: EOI what we delivered with auto-EOI first
            self.service(t)
            return kicked(ex)
        t.set_exit_handler(X.Interrupted, on_interrupted)
        t.set_port_handler(self.testdev_port, lambda ex, t=t: self.testdev.on_write(t, ex))

    def start(self) -> None:
        """Before the vCPU threads start: calibrate the reference clock, start the timers."""
        self.clock.calibrate()
        self.timers.start()

    def stop(self) -> None:
        self.timers.stop()

    def parts(self):
        return [self.timers, self.synic, self.messaging, self.flusher]

    # -- registries -------------------------------------------------------------------------
    def add_msr(self, index: int, name: str, read=None, write=None, feature: str | None = None) -> None:
        def gated(fn):
            if fn is None or feature is None:
                return fn

            def check(*a, fn=fn):
                if not self.config.has(feature):
                    raise MsrFault(f"{name} needs hv_{feature}")
                return fn(*a)
            return check
        self.msr_names[index] = name
        if read:
            self.msr_read[index] = gated(read)
        if write:
            self.msr_write[index] = gated(write)

    def vp(self, vcpu: int, plane: int) -> VpHv:
        return self.vps[(vcpu, plane)]

    def plane_state(self, plane: int) -> PlaneHv:
        return self.planes[plane]

    def place_overlay(self, kind: str, vp, plane: int, old: int, new: int) -> None:
        """An overlay page's MSR goes from ``old`` to ``new`` (before the VMM writes the page):
        with VSM each VTL's overlays cover guest RAM for that VTL only (vsm/overlay.py)."""
        if self.overlays is not None:
            self.overlays.place(kind, vp, plane, old, new)

    # -- MSR exits ---------------------------------------------------------------------------
    def _on_rdmsr(self, t, ex) -> None:
        self.stats["msr_exits"] += 1
        v = t.plane_vcpu()
        fn = self.msr_read.get(ex.index)
        try:
            if fn is None:
                raise MsrFault(self._unknown(ex.index, "read"))
            with self.lock:
                value = fn(self.vp(t.index, t.plane))
        except MsrFault as e:
            self._gp(t, ex.index, "rdmsr", str(e))
            v.complete_msr(error=True)
            return
        v.complete_msr(error=False, data=value)
        self._trace(t, "rdmsr", ex.index, value)

    def _on_wrmsr(self, t, ex) -> None:
        self.stats["msr_exits"] += 1
        v = t.plane_vcpu()
        fn = self.msr_write.get(ex.index)
        try:
            if fn is None:
                raise MsrFault(self._unknown(ex.index, "write"))
            with self.lock:
                fn(self.vp(t.index, t.plane), ex.data)
        except MsrFault as e:
            self._gp(t, ex.index, "wrmsr", str(e))
            v.complete_msr(error=True)
            return
        v.complete_msr(error=False)
        self._trace(t, "wrmsr", ex.index, ex.data)
        self.service(t)

    def _unknown(self, index: int, what: str) -> str:
        name = self.msr_names.get(index)
        if name:
            return f"{name} cannot be {'read' if what == 'read' else 'written'}"
        return f"MSR {index:#x} is not implemented"

    def _gp(self, t, index: int, op: str, why: str) -> None:
        self.stats["gp_injected"] += 1
        self.gp_reasons.append(f"vcpu{t.index}/vtl{t.plane} {op} {index:#x}: {why}")
        del self.gp_reasons[:-64]
        m = self.machine
        if m.trace:
            m.trace(ev.TraceEvent(ev.FAULT, t.index, t.plane, {"vector": arch.VEC_GP, "why": f"{op} {index:#x}: {why}"}))

    def _trace(self, t, op: str, index: int, value: int) -> None:
        m = self.machine
        if m.trace:
            m.trace(ev.TraceEvent("msr", t.index, t.plane, {"op": op, "msr": index,
                                                            "name": self.msr_names.get(index), "value": value}))

    # -- hypercall support -------------------------------------------------------------------
    def check_hypercall_allowed(self, call) -> None:
        if not is_cpl0(call.vcpu):
            raise HvUndefined("hypercall at CPL > 0")
        ps = self.planes[call.plane]
        if not ps.guest_os_id or ps.hypercall_gpa is None:
            raise HvUndefined(f"hypercall from VTL{call.plane} before it set GUEST_OS_ID and enabled "
                              f"the hypercall page")

    def undefined(self, call, why: str) -> Fault:
        """#UD for this call, at the stub's ``out`` of the page the guest enabled."""
        self.stats["ud_injected"] += 1
        rewind_to_out(self, call)
        call.vcpu.mark_dirty("regs")
        return Fault(arch.VEC_UD, why, at_hypercall=False)

    def check_vtl_access(self, plane: int, gpa: int, size: int, what: str, write: bool) -> None:
        """A hypercall's input and output are memory the calling VTL itself may read (write):
        the hypervisor must not read or write, on a lower VTL's behalf, what a higher VTL's
        protection keeps from it (VSM, planes/memview.py). ACCESS_DENIED otherwise."""
        view = self.machine.pvm.planes[plane].view
        if view.restricted:
            from ...planes.memview import Access
            if not view.allows(gpa, size, Access.WRITE if write else Access.READ):
                raise HvError(T.ACCESS_DENIED, f"{what} GPA {gpa:#x} is protected from VTL{plane}")

    def read_block(self, plane: int, gpa: int, size: int, what: str) -> bytes:
        """``plane``'s hypercall input block (as that VTL sees guest memory)."""
        if gpa & 7:
            raise HvError(T.INVALID_ALIGNMENT, f"{what} GPA {gpa:#x} is not 8-byte aligned")
        if size and (gpa & 0xFFF) + size > 0x1000:
            raise HvError(T.INVALID_ALIGNMENT, f"{what} block {gpa:#x}+{size} crosses a page")
        try:
            return self.memory.seen_by(plane).read(gpa, size)
        except GuestMemoryError:
            raise HvError(T.INVALID_PARAMETER, f"{what} GPA {gpa:#x} is not in guest memory") from None

    def write_block(self, plane: int, gpa: int, offset: int, data: bytes) -> None:
        """Into ``plane``'s hypercall output block (as that VTL sees guest memory)."""
        if gpa & 7:
            raise HvError(T.INVALID_ALIGNMENT, f"output GPA {gpa:#x} is not 8-byte aligned")
        if (gpa & 0xFFF) + offset + len(data) > 0x1000:
            raise HvError(T.INVALID_ALIGNMENT, f"output block {gpa:#x} crosses a page")
        try:
            self.memory.seen_by(plane).write(gpa + offset, data)
        except GuestMemoryError:
            raise HvError(T.INVALID_PARAMETER, f"output GPA {gpa:#x} is not in guest memory") from None

    def write_fast_output(self, call, start: int, data: bytes) -> None:
        assert start + len(data) <= FAST_REGS_SIZE
        regs = call.regs
        gpr = bytearray(regs.rdx.to_bytes(8, "little") + regs.r8.to_bytes(8, "little"))
        head = data[:max(0, 16 - start)]
        if head:
            gpr[start:start + len(head)] = head
            regs.rdx = int.from_bytes(gpr[:8], "little")
            regs.r8 = int.from_bytes(gpr[8:], "little")
        tail = data[len(head):]
        if tail:
            write_xmm(call.vcpu, max(start, 16), tail)

    # -- interrupts into the guest ---------------------------------------------------------------
    def assert_vector(self, vcpu: int, plane: int, vector: int, auto_eoi: bool = False) -> bool:
        """An edge interrupt ``vector`` to (vcpu, plane)'s LAPIC; auto-EOI: pykvmm EOIs it
        for the guest at the first exit after the guest took it (see service)."""
        vp = self.vps[(vcpu, plane)]
        if auto_eoi:
            vp.auto_eoi.add(vector)
        ok = self.machine.pvm.planes[plane].signal_msi(*apic.msi_message(vcpu, vector)) > 0
        if auto_eoi:
            t = self.machine.threads[vcpu]
            # the vCPU's own thread services on its way back to the guest: a kick would only
            # make it come back out before the guest has taken the vector
            if t.planes_vcpu.thread_id != threading.get_ident():
                now = time.monotonic()
                if self._kick_due(t, now) <= 0:
                    self.kick_for_auto_eoi(t, now)
        return ok

    def service(self, t) -> None:
        """On the vCPU's own thread: EOI the auto-EOI vectors the running plane took.

        Auto-EOI means the interrupt leaves no ISR bit. The in-kernel LAPIC knows nothing
        of it, so pykvmm EOIs (host-initiated x2APIC EOI write, which clears the highest
        ISR bit) while the highest in-service vector is one it delivered with auto-EOI;
        a vector only in the IRR waits for the next exit (a kick follows every delivery
        and the timer thread kicks while any is outstanding). The same vector can be in
        service and pending again (an EOM re-asserted it before the first exit after the
        guest took it): the one in service is EOIed, the pending one stays outstanding,
        else the ISR bit would block it forever (kvm-unit-tests' hyperv_stimer on
        mainline KVM)."""
        vp = self.vps.get((t.index, t.plane))
        if vp is None:
            return
        flusher = getattr(self, "flusher", None)
        if flusher is not None and flusher.pending:
            with self.lock:
                flusher.service(t)
        requests = self.vp_requests
        if requests is not None and requests.pending:
            with self.lock:
                requests.service(t)
        if not vp.auto_eoi:
            return
        v = t.plane_vcpu()
        with self.lock:
            for _ in range(8):
                regs = bytes(ffi.buffer(v.get_lapic().regs))
                isr = apic.isr_vectors(regs)
                irr = set(apic.irr_vectors(regs))
                top = max(isr) if isr else None
                if top is not None and top in vp.auto_eoi:
                    v.set_msrs({arch.X2APIC_EOI: 0})
                    if top not in irr:
                        vp.auto_eoi.discard(top)
                    continue
                for vec in list(vp.auto_eoi):
                    if vec not in irr and vec not in isr:
                        vp.auto_eoi.discard(vec)   # the guest EOIed it itself
                break
        self.auto_eoi_served(vp, time.monotonic())

    @staticmethod
    def auto_eoi_served(vp: VpHv, now: float) -> None:
        """``vp``'s thread goes back into the guest after an auto-EOI service: the next kick
        waits a gap from now, KICK_DUTY times as long as the kick just served took."""
        if vp.auto_eoi_kicked:
            vp.auto_eoi_gap = max(AUTO_EOI_KICK, KICK_DUTY * (now - vp.auto_eoi_kicked))
            vp.auto_eoi_kicked = 0.0
        vp.auto_eoi_serviced = now

    def auto_eoi_due(self, now: float) -> tuple[list, float | None]:
        """(the vCPU threads to kick now: their running plane holds auto-EOI vectors and they
        have run long enough since their last service (AUTO_EOI_KICK, KICK_DUTY), seconds
        until the next one is due or None: nothing outstanding)."""
        due, soonest = [], None
        for t in self.machine.threads:
            left = self._kick_due(t, now)
            if left is None:
                continue
            if left <= 0:
                due.append(t)
                left = self.vps[(t.index, t.plane)].auto_eoi_gap
            soonest = left if soonest is None else min(soonest, left)
        return due, soonest

    def kick_for_auto_eoi(self, t, now: float) -> None:
        """Kick ``t`` to have its auto-EOI vectors serviced; the gap after the kick is measured
        from the first kick not yet served."""
        vp = self.vps[(t.index, t.plane)]
        if not vp.auto_eoi_kicked:
            vp.auto_eoi_kicked = now
        t.planes_vcpu.kick()

    def _kick_due(self, t, now: float) -> float | None:
        """Seconds until ``t`` may be kicked for auto-EOI (<= 0: now), None: nothing outstanding."""
        vp = self.vps[(t.index, t.plane)]
        if not vp.auto_eoi:
            return None
        # kicked and not served yet (its thread may have gone to another plane meanwhile):
        # again only a whole gap after that kick
        return (vp.auto_eoi_kicked or vp.auto_eoi_serviced) + vp.auto_eoi_gap - now

    # -- machine-level requests ---------------------------------------------------------------------
    def stop_machine(self, t, why: str) -> None:
        self.stopped_why = why
        self.machine.warn(why)
        t.apply(Stop(StopKind.CRASH, why))

    def summary(self) -> dict:
        out = dict(self.stats)
        out["continuations"] = self.table.continuations
        for part in self.parts():
            out.update(getattr(part, "summary", dict)())
        return {"hyperv": out}
