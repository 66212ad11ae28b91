"""Virtual Secure Mode (TLFS chapter "Virtual Secure Mode") on the planes API: VTL n is plane n.

Modules, by TLFS section:

| module | TLFS section |
|---|---|
| ``hvdef`` | the numbers: calls, statuses, register names, map flags, message layouts |
| ``protections`` | VTL Memory Protections, HvCallModifyVtlProtectionMask |
| ``intercept`` | Secure Intercepts (GPA intercept messages, entry reason Intercept) |
| ``registers`` | VP register interface: HvCallGetVpRegisters / HvCallSetVpRegisters |
| ``translate`` | Virtual MMU: HvCallTranslateVirtualAddress |
| ``remote`` | the VP-register and translation calls aimed at another VP |
| ``overlay`` | overlay pages (hypercall, SIMP, SIEFP, VP assist, reference TSC) per VTL |
| ``enable`` | Enabling VTLs (the two boot modes, HvCallEnablePartitionVtl / EnableVpVtl), the VSM registers |
| ``tlb`` | Configuring Lower VTLs: TlbLocked and the address-space flushes it holds back |

The VTL switch itself (VtlCall/VtlReturn, shared and private state, interrupts) is the VTL
personality (vmm/vtl.py); this package adds what a VSM guest reaches through hypercalls and
what a higher VTL enforces on a lower one. Per-VTL state lives with the plane (its memory view,
its vCPU state), per-partition state (the protection masks) with the machine.

The calls are the Hyper-V layer's (``--hyperv`` with hv_vsm: hyperv/hypercall.py decodes the
input value, memory / fast / XMM input and output, rep counts and their continuation);
``install(hv)`` adds them to its table.
"""

from __future__ import annotations

from collections import Counter

from ...planes.memview import FAULT_ACCESS
from .. import abi, events as ev
from ..capture import read_code
from ..outcomes import Switch, SwitchReason
from ..hyperv.hypercall import CallSpec, HvError
from . import hvdef as H
from ...x86 import apic
from .enable import VINA_AUTO_EOI, VINA_AUTO_RESET, VtlEnables
from .intercept import deliver, memory_intercept_message
from .protections import VtlProtections
from .registers import check_header
from .overlay import Overlays
from .remote import RemoteVps
from .tlb import TlbLocks


class Vsm:
    """The VSM state of one machine, attached by the VTL personality."""

    def __init__(self, machine, policy):
        self.machine = machine
        self.policy = policy
        self.protections = VtlProtections(machine)
        self.tlb = TlbLocks(self)
        self.remote = RemoteVps(self)
        self.overlays = None
        self.enables = VtlEnables(self)
        # What the switch path tests for truth (a property would cost a Python frame per exit):
        # the (VP, VTL) pairs with VINA enabled (the run loop asks vina_watch only then) and
        # the TLB locks held (with VINA, what makes a VtlReturn call returned()). Never rebound.
        self.vina_enabled = self.enables.vina_enabled
        self.tlb_held = self.tlb.held
        self.stats = Counter()
        self.intercepts: Counter = Counter()     # (vcpu, from VTL, to VTL, access) -> count

    # -- calls (CallSpec functions: one rep each) --------------------------------------------------
    def install(self, hv) -> None:
        t = hv.table
        t.add(CallSpec(H.HVCALL_MODIFY_VTL_PROTECTION_MASK, "HvCallModifyVtlProtectionMask", "vsm",
                       self._modify, header_size=16, rep_size=8))
        t.add(CallSpec(H.HVCALL_GET_VP_REGISTERS, "HvCallGetVpRegisters", "vsm", self._get,
                       header_size=16, rep_size=4, out_rep_size=16))
        t.add(CallSpec(H.HVCALL_SET_VP_REGISTERS, "HvCallSetVpRegisters", "vsm", self._set,
                       header_size=16, rep_size=32))
        self.enables.install(t)
        hv.tlb_flush_gate = lambda call, vps: self.tlb.wait_unlocked(hv, call, vps)
        hv.vp_requests = self.remote
        self.overlays = hv.overlays = Overlays(hv)
        from .translate import install as install_translate
        install_translate(self, t)

    def _modify(self, call, header, index, element):
        self.protections.modify_element(call.plane, header, element)

    def _get(self, call, header, index, element):
        name = int.from_bytes(element, "little")
        return self.on_vp(call, check_header(self, call.thread, call.plane, header), name,
                          lambda access: access.get(name))

    def _set(self, call, header, index, element):
        name = int.from_bytes(element[0:4], "little")
        self.on_vp(call, check_header(self, call.thread, call.plane, header), name,
                   lambda access: access.set(name, element[16:32]))

    def on_vp(self, call, access, name: int, fn):
        """``fn(access)`` on the thread of the VP the access is for (remote.py)."""
        if access.cpu is call.thread:
            return fn(access)

        def there(thread):
            access.check_idle(name)
            return fn(access)
        return self.remote.run(call.thread, access.cpu, there)

    def forget(self, vcpu: int, plane: int) -> None:
        """Registers of a plane changed behind the personality's back (its copy elision)."""
        forget = getattr(self.policy, "forget", None)
        if forget:
            forget(vcpu, plane)

    def check_vtl_enabled(self, cpu, vtl: int) -> None:
        if not self.enables.vp_enabled(cpu.index) >> vtl & 1:
            raise HvError(H.INVALID_VTL_STATE, f"VTL{vtl} is not enabled on VP {cpu.index}")

    def get_register(self, cpu, caller: int, target: int, name: int) -> int | None:
        return self.enables.get(cpu, caller, target, name)

    def set_register(self, cpu, caller: int, target: int, name: int, value: int) -> bool:
        return self.enables.set(cpu, caller, target, name, value)

    # -- VINA (TLFS "Virtual Interrupt Notification Assist") -----------------------------------
    def vina_watch(self, thread) -> int:
        """Lower planes whose deliverable interrupts must end the running plane's run: those
        below a VTL that enabled VINA and whose VinaAsserted is clear."""
        vina = self.enables.vina_config(thread.index, thread.plane)
        if not vina or self._vina_asserted(thread.index, thread.plane):
            return 0
        return ((1 << thread.plane) - 1) & self.enables.vp_enabled(thread.index)

    def vina_event(self, thread, target: int) -> bool:
        """An interrupt for a lower VTL became deliverable while this VTL runs: latch
        VinaAsserted and send this VTL its VINA vector (once, edge). True if that happened."""
        vcpu, plane = thread.index, thread.plane
        vina = self.enables.vina_config(vcpu, plane)
        if not vina or not target & ((1 << plane) - 1) or self._vina_asserted(vcpu, plane):
            return False
        page = self.policy.vtl_control(vcpu, plane) + abi.VTL_VINA_STATUS
        mem = self.machine.memory
        mem.write(page, bytes([mem.read(page, 1)[0] | 1]))
        vector = vina & 0xFF
        hv = self.machine.hyperv
        if hv is not None:
            hv.assert_vector(vcpu, plane, vector, auto_eoi=bool(vina & VINA_AUTO_EOI))
        else:
            self.machine.pvm.planes[plane].signal_msi(*apic.msi_message(vcpu, vector))
        self.stats["vina_asserted"] += 1
        return True

    def returned(self, vcpu: int, plane: int) -> None:
        """A VtlReturn from ``plane``: VINA's AutoReset; the TLB locks the VTL held are released."""
        self.vina_returned(vcpu, plane)
        if self.tlb.held:
            hv = self.machine.hyperv
            with hv.lock:
                self.enables.release_tlb_locks(vcpu, plane)

    def vina_returned(self, vcpu: int, plane: int) -> None:
        """A VtlReturn from ``plane``: AutoReset clears its VinaAsserted."""
        vina = self.enables.vina_config(vcpu, plane)
        if vina & VINA_AUTO_RESET:
            page = self.policy.vtl_control(vcpu, plane) + abi.VTL_VINA_STATUS
            mem = self.machine.memory
            mem.write(page, bytes([mem.read(page, 1)[0] & ~1]))

    def _vina_asserted(self, vcpu: int, plane: int) -> bool:
        return bool(self.machine.memory.read(self.policy.vtl_control(vcpu, plane) + abi.VTL_VINA_STATUS, 1)[0] & 1)

    def interrupt_refusal(self, caller: int, target: int) -> tuple[int, str] | None:
        """TLFS VTL interrupt rules for the synthetic IPIs (SendSyntheticClusterIpi/Ex), in
        both boot modes: a VTL may interrupt its own and lower VTLs only (ACCESS_DENIED: a
        lower VTL reaches a higher one by VtlCall, never by an interrupt), and only enabled
        ones (INVALID_VTL_STATE). (status, why), or None if allowed."""
        if target > caller:
            return H.ACCESS_DENIED, f"VTL{caller} cannot interrupt the higher VTL{target}"
        if not self.enables.partition >> target & 1:
            return H.INVALID_VTL_STATE, f"VTL{target} is not enabled"
        return None

    # -- secure intercepts -----------------------------------------------------------------------
    def on_memory_fault(self, thread, fault):
        """A lower VTL broke a higher VTL's protection: a Switch into that VTL with reason
        Intercept (the message is already delivered). None if no VTL protection explains the
        fault (someone else set the plane's view)."""
        plane = thread.plane
        need = FAULT_ACCESS.get(fault.flags)
        owner = None if need is None else self.protections.denier(plane, fault.gpa, need)
        if owner is None:
            return None
        v = thread.plane_vcpu(plane)
        regs, sregs = v.regs, v.sregs
        events = v.get_vcpu_events()
        code, _ = read_code(self.machine.memory.seen_by(plane), v, regs.rip, before=0, after=16)
        msg = memory_intercept_message(thread.index, plane, regs, sregs, events, fault, code[:16])
        where = deliver(self.machine, thread.index, owner, msg)
        self.stats["intercepts"] += 1
        self.stats["intercepts_" + where] += 1
        self.intercepts[(thread.index, plane, owner, need.name.lower())] += 1
        sink = self.machine.trace
        if sink:
            sink(ev.TraceEvent("intercept", thread.index, plane, {"to": owner, "gpa": fault.gpa,
                                                                 "access": need.name.lower(), "rip": regs.rip,
                                                                 "message": where}))
        return Switch(owner, SwitchReason.INTERCEPT, suspend=True)

    def summary(self) -> dict:
        """The VSM counters, when the guest used VSM at all (nothing for a plain VTL guest)."""
        out = dict(self.stats)
        out.update(self.protections.summary())
        out["flushes_held"] = self.tlb.held_calls
        out["remote_vp_accesses"] = self.remote.count
        if self.overlays is not None:
            out.update(self.overlays.summary())
        out["flushes_suspended"] = self.tlb.suspended
        return {"vsm": out} if any(out.values()) else {}


def install(hv) -> None:
    """hv_vsm: the VTL personality's Vsm (a plain one with a single VTL) gets the calls."""
    machine = hv.machine
    vsm = getattr(machine.policy, "vsm", None)
    if vsm is None:
        vsm = Vsm(machine, machine.policy)
    vsm.install(hv)
