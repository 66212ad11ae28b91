"""The VTL personality: Hyper-V VSM semantics on planes (and the ``vmpl`` variant).

Plane p is VTL p: a higher plane is more privileged.

Switching
    VtlCall (0x11, the stub at HYPERCALL_PAGE_ADDR+0x0F) goes to the next higher plane and
    suspends the caller; VtlReturn (0x12, +0x26) pops the suspended stack (back to the plane
    that called, or that an interrupt preempted). Neither answers with a status. A malformed
    call is answered with #UD (a Fault outcome), as Hyper-V does: a control word other than exactly
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

from ..uapi import constants as C, ffi
from ..x86 import apic, arch
from ..x86.xsave import merge_pkru, pkru_xsave_offset
from . import abi
from .hyperv import tlfs
from .hypercalls import HvInputVtl
from .memory import GuestMemoryError
from .outcomes import Answer, Fault, Outcome, Switch, SwitchReason
from .policy import PlanePolicy, higher_planes

# code: (name, kind for the #UD statistics, RAX bits allowed, what RAX must be)
_SWITCH_CALLS = {tlfs.HVCALL_VTL_CALL: ("HvCallVtlCall", "call", 0, "it must be 0"),
                 tlfs.HVCALL_VTL_RETURN: ("HvCallVtlReturn", "return", 1, "only bit 0 (fast return) may be set")}

ENTRY_REASONS = {SwitchReason.CALL: abi.VTL_ENTRY_VTL_CALL, SwitchReason.INTERRUPT: abi.VTL_ENTRY_INTERRUPT,
                 SwitchReason.INTERCEPT: abi.VTL_ENTRY_INTERCEPT}


def _gpr_slices() -> tuple[tuple[int, int], ...]:
    """arch.SHARED_GPRS as (start, end) byte runs of struct kvm_regs, for Vcpu.copy_live."""
    runs: list[list[int]] = []
    for name in sorted(arch.SHARED_GPRS, key=lambda n: ffi.offsetof("struct kvm_regs", n)):
        off = ffi.offsetof("struct kvm_regs", name)
        if runs and runs[-1][1] == off:
            runs[-1][1] += 8
        else:
            runs.append([off, off + 8])
    return tuple((a, b) for a, b in runs)


_CR2 = ffi.offsetof("struct kvm_sregs", "cr2")
_SHARED_LIVE = (("regs", _gpr_slices()), ("sregs", ((_CR2, _CR2 + 8),)))   # the GPRs but RSP, CR2
_DB_BYTES = ffi.sizeof("__u64[4]")         # DR0-DR3: the first field of struct kvm_debugregs
_DEBUGREGS_P = ffi.typeof("struct kvm_debugregs *")
_XSAVE_P = ffi.typeof("struct kvm_xsave *")
_XSAVE_SIZE = ffi.sizeof("struct kvm_xsave")


class _Known:
    """What one plane of one vCPU holds of the shared state while it is not running: the
    structs last read from it (as a switch's source) or written to it. The buffers are
    allocated once and reused: a switch reads into them and swaps them, it does not allocate."""
    __slots__ = ("dr", "db", "xsave", "xcr0", "dr_valid", "xsave_valid")

    def __init__(self):
        self.dr = ffi.new(_DEBUGREGS_P)     # struct kvm_debugregs (its own DR6/DR7, the shared DR0-3)
        self.db = ffi.buffer(self.dr, _DB_BYTES)    # its DR0-3 bytes
        self.xsave = _xsave_image()         # its XSAVE image: (struct kvm_xsave *, its bytes)
        self.xcr0 = None
        self.dr_valid = self.xsave_valid = False


def _xsave_image():
    image = ffi.new(_XSAVE_P)
    return image, ffi.buffer(image)


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
        self._above = [higher_planes(p, n) for p in range(n)]
        # The switches a VtlCall to plane t and a fast VtlReturn answer, made once: outcomes
        # are not changed after a handler returns them, and building one costs a Python frame
        # on the switch path.
        self._call_to = [Switch(t, SwitchReason.CALL, suspend=True) for t in range(n)]
        self._fast_return = Switch(None, SwitchReason.RETURN)
        self._higher = self._above if self.preempts else [0] * n
        self._stats = [Counter() for _ in range(self.vcpu_count)]
        self._ud = [Counter() for _ in range(self.vcpu_count)]
        # [vcpu][plane] -> _Known, made at the plane's first switch; None: nothing known
        self._known: list[list[_Known | None]] = [[None] * n for _ in range(self.vcpu_count)]
        self._spare_xsave = _xsave_image()
        # [vcpu][plane] -> pykvmm's control page (vtl_control without a VP assist page)
        self._control_pages = [[abi.control_page(v, p) for p in range(n)] for v in range(self.vcpu_count)]
        # VTLs enabled on each VP (bit n = VTL n): all of them in pykvmm's boot mode; with
        # --vtl-boot tlfs only VTL0 until HvCallEnableVpVtl (vsm/enable.py)
        self.enabled = [(1 << n) - 1] * self.vcpu_count
        self.copy_xcr0 = bool(getattr(machine, "osxsave", False))
        self.pkru_offset = pkru_xsave_offset(machine.kvm.supported_cpuid()) if self.copy_xcr0 else None
        d = machine.dispatcher
        d.register(tlfs.HVCALL_VTL_CALL, self.vtl_call)
        d.register(tlfs.HVCALL_VTL_RETURN, self.vtl_return)
        d.register(tlfs.HVCALL_SEND_SYNTHETIC_CLUSTER_IPI, self.send_synthetic_cluster_ipi)
        if self.name == "vtl":
            from .vsm import Vsm
            self.vsm = Vsm(machine, self)

    def forget(self, vcpu: int, plane: int) -> None:
        """Someone other than this policy changed the shared registers of a plane that is not
        running: do not trust what the policy remembers of them."""
        self._known[vcpu][plane] = None

    # -- the run loop's questions ----------------------------------------------------------------
    def req_exit_planes(self, thread) -> int:
        req = self._higher[thread.plane] & self.enabled[thread.index]
        vsm = self.vsm
        if vsm is not None and vsm.vina_enabled:
            req |= vsm.vina_watch(thread)           # lower planes whose interrupts raise VINA
        return req

    def on_plane_event(self, thread, event) -> Switch | None:
        candidates = event.target & self._higher[thread.plane] & self.enabled[thread.index]
        if not candidates and self.vsm is not None and self.vsm.vina_event(thread, event.target):
            return None
        if not candidates:
            self._stats[thread.index]["events_spurious"] += 1
            return None
        self._stats[thread.index]["preemptions"] += 1
        return Switch(candidates.bit_length() - 1, SwitchReason.INTERRUPT, suspend=True)

    def on_memory_fault(self, thread, fault) -> Outcome:
        """A secure intercept when a higher VTL's protection explains it (vsm/intercept.py)."""
        switch = self.vsm.on_memory_fault(thread, fault) if self.vsm is not None else None
        return switch or super().on_memory_fault(thread, fault)

    # -- switches -------------------------------------------------------------------------------
    def fast_switches(self, thread) -> dict | None:
        """vmpl's VtlCall/VtlReturn without VSM or Hyper-V: the whole switch is the checks C can
        make (control word, RAX, CPL, suspended stack), the stack and the EntryReason of a call
        (the C loop: fastexit.c's switch_target). vtl moves shared state and looks at higher
        planes' LAPICs: Python's."""
        if self.shares_state or self.loads_return_regs or self.preempts or self.vsm is not None \
                or self.machine.hyperv is not None:
            return None
        vcpu = thread.index
        return {p: (self._above[p] & self.enabled[vcpu],
                    self._control_pages[vcpu][p] + abi.VTL_ENTRY_REASON) for p in range(self.plane_count)}

    def transfer(self, thread, src: int, dst: int, dest, reason: SwitchReason, first: bool) -> None:
        """The shared state (module docstring) from ``thread.vcpu``, plane ``src``'s KVM vCPU,
        to ``dest``, plane ``dst``'s, unless ``dst`` has never run; then the entry reason, and
        the VSM work of a VtlReturn (VINA AutoReset, TLB locks released). One function, read
        top to bottom: on this host every Python call after a switch costs about a microsecond."""
        vcpu = thread.index
        known = self._known[vcpu]
        if first:
            known[dst] = None     # it starts at the entry, with its own state
        elif self.shares_state:
            source = thread.vcpu
            src_known, dst_known = known[src], known[dst]
            if src_known is None:
                src_known = known[src] = _Known()
            if dst_known is None:
                dst_known = known[dst] = _Known()
            # GPRs and CR2: the live copies (no ioctl with KVM_CAP_SYNC_REGS).
            dest.copy_live(source, _SHARED_LIVE)
            elide = self.elide_sets
            # DR0-DR3 (DR6/DR7 stay the destination's own).
            source.get_debugregs(into=src_known.dr)
            src_known.dr_valid = True
            ioctls = 1
            if not (elide and dst_known.dr_valid):
                dest.get_debugregs(into=dst_known.dr)
                dst_known.dr_valid = True
                ioctls += 1
            if not elide or src_known.db != dst_known.db:
                dst_known.db[:] = src_known.db
                dst_known.dr.flags = 0
                dest.set_debugregs(dst_known.dr)
                ioctls += 1
            # XCR0 before the XSAVE image (which KVM checks against the guest's features).
            if self.copy_xcr0:
                xcrs = source.get_xcrs()
                ioctls += 1
                xcr0 = next((xcrs.xcrs[i].value for i in range(xcrs.nr_xcrs) if xcrs.xcrs[i].xcr == 0), None)
                if xcr0 is not None and (not elide or dst_known.xcr0 != xcr0):
                    dest.set_xcrs(xcrs)
                    ioctls += 1
                dst_known.xcr0 = src_known.xcr0 = xcr0
            # x87/SSE/AVX: the XSAVE image but PKRU (as planes.api.copy_fpu_state, with the
            # destination's PKRU taken from what we know of it instead of another GET).
            if not self.machine.pvm.shared_fpu:
                ioctls += self._copy_xsave(source, dest, src_known, dst_known, elide)
            stats = self._stats[vcpu]
            stats["state_ioctls"] += ioctls
            stats["shared_state_copies"] += 1
        code = ENTRY_REASONS.get(reason)
        if code is not None:
            self.machine.memory.write_u32(self.vtl_control(vcpu, dst) + abi.VTL_ENTRY_REASON, code)
        vsm = self.vsm
        if reason is SwitchReason.RETURN and vsm is not None and (vsm.vina_enabled or vsm.tlb_held):
            vsm.returned(vcpu, src)

    def vtl_control(self, vcpu: int, plane: int) -> int:
        """The page holding this VTL's HV_VP_VTL_CONTROL (EntryReason, VtlReturnX64Rax/Rcx):
        the VP assist page once the VTL enabled one (HV_X64_MSR_VP_ASSIST_PAGE, Hyper-V
        layer), else pykvmm's control page (the same layout)."""
        hv = self.machine.hyperv
        if hv is not None:
            assist = hv.vp(vcpu, plane).vp_assist
            if assist & 1:
                return assist & ~0xFFF
        return self._control_pages[vcpu][plane]

    def _copy_xsave(self, source, dest, src_known: _Known, dst_known: _Known, elide: bool) -> int:
        """The source's XSAVE image with the destination's PKRU into the destination (no SET
        when the destination provably holds it already). Returns the ioctls made."""
        ioctls = 1
        image, image_bytes = src_known.xsave
        source.get_xsave(into=image)
        src_known.xsave_valid = True
        mine, mine_bytes = dst_known.xsave
        off = self.pkru_offset
        if off is None and elide and dst_known.xsave_valid and image_bytes == mine_bytes:
            return ioctls
        if off is not None and not (elide and dst_known.xsave_valid):
            dest.get_xsave(into=mine)
            ioctls += 1
        new, new_bytes = spare = self._spare_xsave   # swapped in as what the destination holds if SET
        ffi.memmove(new, image, _XSAVE_SIZE)
        if off is not None:
            merge_pkru(new, bytes(mine_bytes), off)
            if elide and new_bytes == mine_bytes:
                dst_known.xsave_valid = True
                return ioctls
        dest.set_xsave(new)
        self._spare_xsave, dst_known.xsave, dst_known.xsave_valid = dst_known.xsave, spare, True
        return ioctls + 1

    # -- hypercalls -------------------------------------------------------------------------------
    def _ud_fault(self, thread, what: str, why: str) -> Fault:
        self._ud[thread.index][what] += 1
        return Fault(arch.VEC_UD, why)

    def _cpl_fault(self, thread, plane: int, name: str) -> Fault | None:
        cs = thread.plane_vcpu(plane).sregs.cs
        if cs.dpl != 0:
            return self._ud_fault(thread, "cpl", f"{name} at CPL {cs.dpl} (hypercalls need CPL 0)")
        return None

    def _malformed_switch_call(self, thread, plane, control, regs, code: int) -> Fault | None:
        """#UD for a VtlCall/VtlReturn (``code``) above CPL 0, with control bits other than its
        code, or with RAX (the VTL input) bits it does not allow; None if well formed. The
        handlers test the common case (well formed) themselves first: a call less per switch."""
        name, kind, rax_allowed, rax_rule = _SWITCH_CALLS[code]
        if fault := self._cpl_fault(thread, plane, name):
            return fault
        if control.value != control.code:
            return self._ud_fault(thread, f"{kind}-control", f"{name} control word {control.value:#x} "
                                                            f"has bits other than the call code {control.code:#x}")
        if regs.rax & ~rax_allowed:
            return self._ud_fault(thread, f"{kind}-input", f"{name} with VTL input (RAX) {regs.rax:#x}; {rax_rule}")
        return None

    def vtl_call(self, thread, plane, control, regs) -> Outcome:
        # well formed: exactly the call code, RAX 0, CPL 0 (``thread.vcpu`` is the caller's)
        if control != tlfs.HVCALL_VTL_CALL or regs.rax or thread.vcpu.sregs.cs.dpl:
            if fault := self._malformed_switch_call(thread, plane, control, regs, tlfs.HVCALL_VTL_CALL):
                return fault
        above = self._above[plane] & self.enabled[thread.index]
        if not above:
            return self._ud_fault(thread, "call-from-top", f"HvCallVtlCall from VTL{plane}, the highest VTL "
                                                     f"enabled on VP {thread.index} of {self.plane_count}")
        return self._call_to[(above & -above).bit_length() - 1]

    def vtl_return(self, thread, plane, control, regs) -> Outcome:
        # well formed: exactly the call code, RAX 0 or 1 (fast), CPL 0
        if control != tlfs.HVCALL_VTL_RETURN or regs.rax & ~1 or thread.vcpu.sregs.cs.dpl:
            if fault := self._malformed_switch_call(thread, plane, control, regs, tlfs.HVCALL_VTL_RETURN):
                return fault
        if plane == 0:
            return self._ud_fault(thread, "return-from-vtl0", "HvCallVtlReturn from VTL0 (no lower VTL)")
        if not thread.suspended or thread.suspended[-1] >= plane:
            return self._ud_fault(thread, "return-nothing-suspended",
                            f"HvCallVtlReturn from VTL{plane} with no lower VTL to return to")
        if self.loads_return_regs and not regs.rax & 1:     # a non-fast return
            page = self.vtl_control(thread.index, plane)
            memory = self.machine.memory
            load = (memory.u64(page + abi.VTL_RETURN_RAX), memory.u64(page + abi.VTL_RETURN_RCX))
            return Switch(None, SwitchReason.RETURN, load_return_regs=load)
        return self._fast_return

    def send_synthetic_cluster_ipi(self, thread, plane, control, regs) -> Outcome:
        if fault := self._cpl_fault(thread, plane, "HvCallSendSyntheticClusterIpi"):
            return fault
        if control >> 17:   # var-header size, rep count/start, reserved bits: a simple call has none
            return Answer(tlfs.INVALID_HYPERCALL_INPUT)
        if control.fast:
            head, mask = regs.rdx, regs.r8
        else:
            gpa = regs.rdx
            if gpa & 7:
                return Answer(tlfs.INVALID_ALIGNMENT)
            try:
                data = self.machine.memory.seen_by(plane).read(gpa, 16)
            except GuestMemoryError:
                return Answer(tlfs.INVALID_PARAMETER)      # the input is not in guest memory
            head = int.from_bytes(data[0:8], "little")
            mask = int.from_bytes(data[8:16], "little")
        vector = head & 0xFFFFFFFF
        target_vtl = HvInputVtl((head >> 32) & 0xFF)
        if not 0x10 <= vector <= 0xFF or target_vtl.reserved:
            return Answer(tlfs.INVALID_PARAMETER)
        target = target_vtl.target(plane)
        if target >= self.plane_count or mask >> self.vcpu_count:   # no such VTL, or vCPUs
            return Answer(tlfs.INVALID_PARAMETER)
        refused = self.vsm.interrupt_refusal(plane, target) if self.vsm is not None else None
        if refused:
            return Answer(refused[0])
        stats = self._stats[thread.index]
        kind = "ipi_synthetic_same_vtl" if target == plane else "ipi_synthetic_cross_vtl"
        to_plane = self.machine.pvm.planes[target]
        while mask:
            low = mask & -mask
            mask ^= low
            v = low.bit_length() - 1
            if to_plane.signal_msi(*apic.msi_message(v, vector)) <= 0:
                stats["ipi_dropped"] += 1
            stats[kind] += 1
        return Answer(tlfs.SUCCESS)

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
            "interrupts_masked": sum(getattr(t.planes_vcpu, "masked_interrupts", 0) for t in self.machine.threads),
            "lapic_timer_events": sum(getattr(t.planes_vcpu, "timer_events", 0) for t in self.machine.threads),
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

