"""The VTL personality: Hyper-V VSM semantics on planes (and the ``vmpl`` variant).

Plane p is VTL p: a higher plane is more privileged.

Switching
    VtlCall (0x11, the stub at HYPERCALL_PAGE_ADDR+0x0F) goes to the next higher plane and
    suspends the caller; VtlReturn (0x12, +0x26) pops the suspended stack (back to the plane
    that called, or that an interrupt preempted). Neither answers with a status. A malformed
    call is answered with #UD (InjectFault), as Hyper-V does: a control word other than exactly
    0x11/0x12, a non-zero VTL input (RAX) on a call, RAX bits other than bit 0 (fast) on a
    return, a call from the highest plane, a return from VTL0 or with nothing suspended, or
    a call made at CPL > 0.

Shared state (TLFS "Virtual Processor State Isolation"; copied from ``src`` to ``dst`` on every
switch except a plane's first entry)
    RAX..R15 but RSP (through the live sync-register copies: no ioctl), CR2 (through the
    KVM_SYNC_X86_SREGS copy, which this policy enables: no ioctl), DR0-DR3 (KVM_GET/SET_DEBUGREGS),
    the XSAVE image but PKRU (KVM_GET/SET_XSAVE; skipped when the backend already shares the FPU)
    and XCR0 (KVM_GET/SET_XCRS; only when the guest CPUID offers XSAVE, since otherwise
    CR4.OSXSAVE cannot be set and XCR0 cannot change).
    A SET on the destination is left out when the destination provably already holds the value:
    the policy remembers the value of every plane when it last stopped running (it read it then,
    as the source of that switch) or when it last wrote it, and a plane's DR0-3/XSAVE/XCR0 cannot
    change while it does not run. Anything else that writes those registers of a plane that is not
    running must call ``forget(vcpu, plane)``. So a switch costs two ioctls on this host
    (GET_DEBUGREGS and GET_XSAVE of the source) plus one SET per class the guest really changed.
    Everything else (RIP, RSP, RFLAGS, CR0/3/4/8, segments, descriptor tables, EFER, syscall
    MSRs, DR6/DR7, the LAPIC) is private: each plane keeps its own, as separate KVM vCPUs do.

Entry reason and return registers (the per-plane control page, VP-assist layout)
    Every entry into a plane by a VtlCall or an interrupt writes EntryReason (u32 at 0x08:
    1 = VtlCall, 2 = Interrupt) into the control page of the plane entered, first entries
    included. A non-fast VtlReturn (RAX bit 0 clear) loads the lower plane's RAX and RCX from
    VtlReturnX64Rax/Rcx (0x10/0x18) of the *returning* plane's control page; a fast return
    leaves them as shared.

Interrupts
    req_exit_planes = every higher plane, always (running, spinning or halted): the policy keeps
    no pending or masked state of its own. A plane event names only planes whose LAPIC would
    deliver now (the planes API's contract: IRR above PPR, so TPR-masked vectors make no event
    until the mask drops or a higher vector comes), and the policy switches to the highest plane
    of ``event.target`` above the running one; that plane is entered with reason Interrupt and
    the running plane is suspended. An event naming no higher plane is counted as spurious and
    ignored. An interrupt for a lower plane stays pending in that plane's own LAPIC until the
    plane runs again (after a VtlReturn). A lower plane preempted while halted is still halted
    when it resumes: it wakes for its own interrupts only, as after any interrupt it did not take.

HvCallSendSyntheticClusterIpi (0x0B), fast or memory form
    Vector u32 @0 (0x10..0xFF), TargetVtl HV_INPUT_VTL @4 (bits 3:0 VTL, bit 4 UseTargetVtl,
    bits 7:5 reserved), ProcessorMask u64 @8; padding is ignored, as the TLFS says. Errors:
    control bits other than the code and Fast -> INVALID_HYPERCALL_INPUT; memory-form GPA not
    8-byte aligned -> INVALID_ALIGNMENT; not in guest memory, bad vector, reserved VTL bits,
    target VTL >= plane count, mask bits for vCPUs that do not exist -> INVALID_PARAMETER.
    Delivered as an MSI to the target plane (Plane.signal_msi), which tells the target vCPU
    and kicks its thread when its run requested that plane.

``vmpl``: the same calls, nothing shared (transfer copies nothing and a non-fast VtlReturn
loads nothing), no preemption (req_exit_planes = 0: a plane runs only when explicitly called
or returned to; interrupts for other planes wait until they run). EntryReason is still written.
"""

from __future__ import annotations

from collections import Counter

from ..planes.api import merge_pkru, pkru_xsave_offset
from ..uapi import constants as C, ffi
from ..x86 import apic
from . import abi
from .hypercalls import HypercallError, InjectFault
from .memory import GuestMemoryError
from .policy import POLICIES, PlanePolicy, higher_planes

UD_VECTOR = 6

SHARED_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11",
               "r12", "r13", "r14", "r15")
ENTRY_REASONS = {"call": abi.VTL_ENTRY_VTL_CALL, "interrupt": abi.VTL_ENTRY_INTERRUPT,
                 "intercept": abi.VTL_ENTRY_INTERCEPT}

HV_INPUT_VTL_TARGET = 0x0F
HV_INPUT_VTL_USE_TARGET = 0x10
HV_INPUT_VTL_RESERVED = 0xE0


def _gpr_ranges() -> tuple[tuple[int, int], ...]:
    """SHARED_GPRS as (offset, length) runs of struct kvm_regs: everything but RSP, RIP, RFLAGS."""
    runs: list[list[int]] = []
    for name in sorted(SHARED_GPRS, key=lambda n: ffi.offsetof("struct kvm_regs", n)):
        off = ffi.offsetof("struct kvm_regs", name)
        if runs and runs[-1][0] + runs[-1][1] == off:
            runs[-1][1] += 8
        else:
            runs.append([off, 8])
    return tuple((a, b) for a, b in runs)


_SHARED_GPR_RANGES = _gpr_ranges()


class _Known:
    """What one plane of one vCPU holds of the shared state while it is not running."""
    __slots__ = ("dr", "xsave", "xcr0")

    def __init__(self):
        self.dr = None        # struct kvm_debugregs (its own DR6/DR7, the shared DR0-3)
        self.xsave = None     # bytes of the XSAVE image
        self.xcr0 = None


def _commit(v, name: str, obj) -> None:
    """Hand a changed live copy (``v.regs``/``v.sregs``) to KVM. Plane vCPUs without a kvm_run
    (native plane N) have no sync area: their live copy is a fresh GET, so SET it."""
    if v.run_struct is None:
        getattr(v, "set_" + name)(obj)
    else:
        v.mark_dirty(name)


class VtlPolicy(PlanePolicy):
    """Hyper-V VSM: see the module docstring."""

    name = "vtl"
    sync_classes = C.KVM_SYNC_X86_SREGS   # CR2 and CS.DPL without an ioctl (costs nothing per exit here)
    shares_state = True
    loads_return_regs = True
    preempts = True
    elide_sets = True     # leave out SETs the destination provably does not need (see above)
    vsm = None            # vsm.Vsm: protections, intercepts, VP registers (vtl only, not vmpl)

    # -- setup -------------------------------------------------------------------------------
    def attach(self, machine) -> None:
        self.machine = machine
        self.plane_count = n = machine.plane_count
        self.vcpu_count = machine.config.vcpus
        self._higher = [higher_planes(p, n) if self.preempts else 0 for p in range(n)]
        self._stats = [Counter() for _ in range(self.vcpu_count)]
        self._ud = [Counter() for _ in range(self.vcpu_count)]
        self._known: dict[tuple[int, int], _Known] = {}
        # VTLs enabled on each VP (bit n = VTL n): all of them in pykvmm's boot mode; with
        # --vtl-boot tlfs only VTL0 until HvCallEnableVpVtl (vsm/enable.py)
        self.enabled = [(1 << n) - 1] * self.vcpu_count
        self.copy_xcr0 = bool(getattr(machine, "osxsave", False))
        self.pkru_offset = pkru_xsave_offset(machine.kvm.supported_cpuid()) if self.copy_xcr0 else None
        d = machine.dispatcher
        d.register(abi.HVCALL_VTL_CALL, self._vtl_call)
        d.register(abi.HVCALL_VTL_RETURN, self._vtl_return)
        d.register(abi.HVCALL_SEND_SYNTHETIC_CLUSTER_IPI, self._send_ipi)
        if self.name == "vtl":
            from .vsm import Vsm
            self.vsm = Vsm(machine, self)

    def forget(self, vcpu: int, plane: int) -> None:
        """Someone other than this policy changed the shared registers of a plane that is not
        running: do not trust what the policy remembers of them."""
        self._known.pop((vcpu, plane), None)

    # -- the run loop's questions ----------------------------------------------------------------
    def req_exit_planes(self, cpu) -> int:
        return self._higher[cpu.plane] & self.enabled[cpu.index]

    def on_plane_event(self, cpu, event) -> None:
        candidates = event.target & self._higher[cpu.plane] & self.enabled[cpu.index]
        if not candidates:
            self._stats[cpu.index]["events_spurious"] += 1
            return
        self._stats[cpu.index]["preemptions"] += 1
        cpu.switch_to(candidates.bit_length() - 1, reason="interrupt", suspend=True)

    def on_memory_fault(self, cpu, fault) -> None:
        """A secure intercept when a higher VTL's protection explains it (vsm/intercept.py)."""
        if self.vsm is None or not self.vsm.on_memory_fault(cpu, fault):
            super().on_memory_fault(cpu, fault)

    # -- switches -------------------------------------------------------------------------------
    def on_first_entry(self, cpu, plane: int, reason: str) -> None:
        self._known.pop((cpu.index, plane), None)
        self._write_entry_reason(cpu.index, plane, reason)

    def transfer(self, cpu, src: int, dst: int, reason: str) -> None:
        if self.shares_state:
            self._copy_shared(cpu, src, dst)
        self._write_entry_reason(cpu.index, dst, reason)

    def _write_entry_reason(self, vcpu: int, plane: int, reason: str) -> None:
        code = ENTRY_REASONS.get(reason)
        if code is not None:
            self.machine.memory.write_u32(self.vtl_control(vcpu, plane) + abi.VTL_ENTRY_REASON, code)

    def vtl_control(self, vcpu: int, plane: int) -> int:
        """The page holding this VTL's HV_VP_VTL_CONTROL (EntryReason, VtlReturnX64Rax/Rcx):
        the VP assist page once the VTL enabled one (HV_X64_MSR_VP_ASSIST_PAGE, Hyper-V
        layer), else pykvmm's control page (the same layout)."""
        hv = self.machine.hyperv
        if hv is not None:
            assist = hv.vp(vcpu, plane).vp_assist
            if assist & 1:
                return assist & ~0xFFF
        return abi.control_page(vcpu, plane)

    def _known_of(self, vcpu: int, plane: int) -> _Known:
        k = self._known.get((vcpu, plane))
        if k is None:
            k = self._known[(vcpu, plane)] = _Known()
        return k

    def _copy_shared(self, cpu, src: int, dst: int) -> None:
        pc = cpu.cpu
        vs, vd = pc.plane_vcpu(src), pc.plane_vcpu(dst)
        ioctls = 0
        # GPRs and CR2: the live copies (no ioctl with KVM_CAP_SYNC_REGS).
        rs, rd = vs.regs, vd.regs
        ps, pd = ffi.cast("char *", ffi.addressof(rs)), ffi.cast("char *", ffi.addressof(rd))
        for start, length in _SHARED_GPR_RANGES:
            ffi.memmove(pd + start, ps + start, length)
        _commit(vd, "regs", rd)
        ss, sd = vs.sregs, vd.sregs
        if sd.cr2 != ss.cr2:
            sd.cr2 = ss.cr2
            _commit(vd, "sregs", sd)
        ks, kd = self._known_of(cpu.index, src), self._known_of(cpu.index, dst)
        elide = self.elide_sets
        # DR0-DR3 (DR6/DR7 stay the destination's own).
        ds = vs.get_debugregs()
        ioctls += 1
        dd = kd.dr if elide else None
        if dd is None:
            dd = vd.get_debugregs()
            ioctls += 1
        if not elide or tuple(dd.db) != tuple(ds.db):
            for i in range(4):
                dd.db[i] = ds.db[i]
            dd.flags = 0
            vd.set_debugregs(dd)
            ioctls += 1
        kd.dr, ks.dr = dd, ds
        # XCR0 before the XSAVE image (which KVM checks against the guest's features).
        if self.copy_xcr0:
            xs = vs.get_xcrs()
            ioctls += 1
            x0 = next((xs.xcrs[i].value for i in range(xs.nr_xcrs) if xs.xcrs[i].xcr == 0), None)
            if x0 is not None and (not elide or kd.xcr0 != x0):
                vd.set_xcrs(xs)
                ioctls += 1
            kd.xcr0 = ks.xcr0 = x0
        # x87/SSE/AVX: the XSAVE image but PKRU (as planes.api.copy_fpu_state, with the
        # destination's PKRU taken from what we know of it instead of another GET).
        if not self.machine.pvm.shared_fpu:
            image = vs.get_xsave()
            ioctls += 1
            src_bytes = bytes(ffi.buffer(image.region))
            off = self.pkru_offset
            if off is not None:
                mine = kd.xsave if elide else None
                if mine is None:
                    mine = bytes(ffi.buffer(vd.get_xsave().region))
                    ioctls += 1
                merge_pkru(image, mine, off)
                new_bytes = bytes(ffi.buffer(image.region))
            else:
                new_bytes = src_bytes
            if not elide or kd.xsave != new_bytes:
                vd.set_xsave(image)
                ioctls += 1
            kd.xsave, ks.xsave = new_bytes, src_bytes
        st = self._stats[cpu.index]
        st["state_ioctls"] += ioctls
        st["shared_state_copies"] += 1

    # -- hypercalls -------------------------------------------------------------------------------
    def _fault(self, cpu, what: str, why: str) -> InjectFault:
        self._ud[cpu.index][what] += 1
        return InjectFault(UD_VECTOR, why)

    def _check_cpl(self, cpu, plane: int, name: str) -> None:
        cs = cpu.cpu.plane_vcpu(plane).sregs.cs
        if cs.dpl != 0:
            raise self._fault(cpu, "cpl", f"{name} at CPL {cs.dpl} (hypercalls need CPL 0)")

    def _vtl_call(self, cpu, plane, control, regs):
        self._check_cpl(cpu, plane, "HvCallVtlCall")
        if control.value != abi.HVCALL_VTL_CALL:
            raise self._fault(cpu, "call-control", f"HvCallVtlCall control word {control.value:#x} "
                                                   f"has bits other than the call code 0x11")
        if regs.rax != 0:
            raise self._fault(cpu, "call-input", f"HvCallVtlCall with VTL input (RAX) {regs.rax:#x}; it must be 0")
        above = higher_planes(plane, self.plane_count) & self.enabled[cpu.index]
        if not above:
            raise self._fault(cpu, "call-from-top", f"HvCallVtlCall from VTL{plane}, the highest VTL "
                                                    f"enabled on VP {cpu.index} of {self.plane_count}")
        cpu.switch_to((above & -above).bit_length() - 1, reason="call", suspend=True)
        return None

    def _vtl_return(self, cpu, plane, control, regs):
        self._check_cpl(cpu, plane, "HvCallVtlReturn")
        if control.value != abi.HVCALL_VTL_RETURN:
            raise self._fault(cpu, "return-control", f"HvCallVtlReturn control word {control.value:#x} "
                                                     f"has bits other than the call code 0x12")
        if regs.rax & ~1:
            raise self._fault(cpu, "return-input", f"HvCallVtlReturn with VTL input (RAX) {regs.rax:#x}; "
                                                   f"only bit 0 (fast return) may be set")
        if plane == 0:
            raise self._fault(cpu, "return-from-vtl0", "HvCallVtlReturn from VTL0 (no lower VTL)")
        if not cpu.suspended or cpu.suspended[-1] >= plane:
            raise self._fault(cpu, "return-nothing-suspended",
                              f"HvCallVtlReturn from VTL{plane} with no lower VTL to return to")
        load = self.loads_return_regs and not regs.rax & 1
        if load:
            page = self.vtl_control(cpu.index, plane)
            rax = self.machine.memory.u64(page + abi.VTL_RETURN_RAX)
            rcx = self.machine.memory.u64(page + abi.VTL_RETURN_RCX)
        target = cpu.resume_suspended(reason="return")
        if load:
            v = cpu.cpu.plane_vcpu(target)
            rd = v.regs
            rd.rax, rd.rcx = rax, rcx
            _commit(v, "regs", rd)
        return None

    def _send_ipi(self, cpu, plane, control, regs):
        self._check_cpl(cpu, plane, "HvCallSendSyntheticClusterIpi")
        if control.value >> 17:   # var-header size, rep count/start, reserved bits: a simple call has none
            raise HypercallError(abi.HV_STATUS_INVALID_HYPERCALL_INPUT,
                                 f"SendSyntheticClusterIpi control word {control.value:#x} has bits other "
                                 f"than the code and Fast")
        if control.fast:
            head, mask = regs.rdx, regs.r8
        else:
            gpa = regs.rdx
            if gpa & 7:
                raise HypercallError(abi.HV_STATUS_INVALID_ALIGNMENT, f"input GPA {gpa:#x} is not 8-byte aligned")
            try:
                data = self.machine.memory.read(gpa, 16)
            except GuestMemoryError:
                raise HypercallError(abi.HV_STATUS_INVALID_PARAMETER,
                                     f"input GPA {gpa:#x} is not in guest memory") from None
            head = int.from_bytes(data[0:8], "little")
            mask = int.from_bytes(data[8:16], "little")
        vector = head & 0xFFFFFFFF
        target_vtl = (head >> 32) & 0xFF
        if not 0x10 <= vector <= 0xFF:
            raise HypercallError(abi.HV_STATUS_INVALID_PARAMETER, f"vector {vector:#x} is not in 0x10..0xff")
        if target_vtl & HV_INPUT_VTL_RESERVED:
            raise HypercallError(abi.HV_STATUS_INVALID_PARAMETER, f"HV_INPUT_VTL {target_vtl:#x} has reserved bits")
        target = target_vtl & HV_INPUT_VTL_TARGET if target_vtl & HV_INPUT_VTL_USE_TARGET else plane
        if target >= self.plane_count:
            raise HypercallError(abi.HV_STATUS_INVALID_PARAMETER,
                                 f"target VTL {target} does not exist ({self.plane_count} planes)")
        if mask >> self.vcpu_count:
            raise HypercallError(abi.HV_STATUS_INVALID_PARAMETER,
                                 f"processor mask {mask:#x} names vCPUs that do not exist ({self.vcpu_count})")
        refused = self.vsm.interrupt_refusal(plane, target) if self.vsm is not None else None
        if refused:
            raise HypercallError(*refused)
        stats = self._stats[cpu.index]
        kind = "ipi_synthetic_same_vtl" if target == plane else "ipi_synthetic_cross_vtl"
        to_plane = self.machine.pvm.planes[target]
        while mask:
            low = mask & -mask
            mask ^= low
            v = low.bit_length() - 1
            if to_plane.signal_msi(*apic.msi_message(v, vector)) <= 0:
                stats["ipi_dropped"] += 1
            stats[kind] += 1
        return abi.HV_STATUS_SUCCESS

    # -- the summary ---------------------------------------------------------------------------------
    def summary(self) -> dict:
        total, ud = Counter(), Counter()
        for c in self._stats:
            total.update(c)
        for c in self._ud:
            ud.update(c)
        return {
            "ipis": {"synthetic_same_vtl": total["ipi_synthetic_same_vtl"],
                     "synthetic_cross_vtl": total["ipi_synthetic_cross_vtl"]},
            "ipis_dropped": total["ipi_dropped"],
            "ud_injected": sum(ud.values()),
            "ud_reasons": dict(ud),
            "preemptions": total["preemptions"],
            "interrupts_masked": sum(getattr(t.cpu, "masked_interrupts", 0) for t in self.machine.threads),
            "events_spurious": total["events_spurious"],
            "shared_state_copies": total["shared_state_copies"],
            "state_ioctls": total["state_ioctls"],
            **(self.vsm.summary() if self.vsm else {}),
        }


class VmplPolicy(VtlPolicy):
    """SEV-SNP-like: nothing shared, switches only by explicit VtlCall/VtlReturn."""

    name = "vmpl"
    sync_classes = C.KVM_SYNC_X86_SREGS
    shares_state = False
    loads_return_regs = False
    preempts = False


POLICIES.setdefault("vtl", VtlPolicy)
POLICIES.setdefault("vmpl", VmplPolicy)
