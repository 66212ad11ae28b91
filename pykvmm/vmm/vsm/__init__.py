"""Virtual Secure Mode (TLFS chapter "Virtual Secure Mode") on the planes API: VTL n is plane n.

Modules, by TLFS section:

| module | TLFS section |
|---|---|
| ``hvdef`` | the numbers: calls, statuses, register names, map flags, message layouts |
| ``protections`` | VTL Memory Protections, HvCallModifyVtlProtectionMask |
| ``intercept`` | Secure Intercepts (GPA intercept messages, entry reason Intercept) |
| ``registers`` | VP register interface: HvCallGetVpRegisters / HvCallSetVpRegisters, VSM registers |

The VTL switch itself (VtlCall/VtlReturn, shared and private state, interrupts) is the VTL
personality (vmm/vtl.py); this package adds what a VSM guest reaches through hypercalls and
what a higher VTL enforces on a lower one. Per-VTL state lives with the plane (its memory view,
its vCPU state), per-partition state (the protection masks) with the machine.

Hypercall input (until the Hyper-V layer's decoder is on main): memory form only, through
``rep_call``; the fast forms need XMM input and answer INVALID_HYPERCALL_INPUT.
"""

from __future__ import annotations

from collections import Counter

from ...planes.memview import FAULT_ACCESS
from .. import abi, events as ev
from . import hvdef as H
from .intercept import deliver, memory_intercept_message
from .protections import VsmError, VtlProtections
from .registers import (REG_VSM_CAPABILITIES, REG_VSM_CODE_PAGE_OFFSETS, REG_VSM_PARTITION_STATUS,
                        REG_VSM_VP_STATUS, check_header)


class Vsm:
    """The VSM state of one machine, attached by the VTL personality."""

    def __init__(self, machine, policy):
        self.machine = machine
        self.policy = policy
        self.protections = VtlProtections(machine)
        self.stats = Counter()
        self.intercepts: Counter = Counter()     # (vcpu, from VTL, to VTL, access) -> count
        d = machine.dispatcher
        d.register(abi.HVCALL_MODIFY_VTL_PROTECTION_MASK,
                   lambda cpu, plane, control, regs: rep_call(self, cpu, plane, regs, 16, 8, 0, self._modify))
        d.register(abi.HVCALL_GET_VP_REGISTERS,
                   lambda cpu, plane, control, regs: rep_call(self, cpu, plane, regs, 16, 4, 16, self._get))
        d.register(abi.HVCALL_SET_VP_REGISTERS,
                   lambda cpu, plane, control, regs: rep_call(self, cpu, plane, regs, 16, 32, 0, self._set))

    # -- calls ----------------------------------------------------------------------------------
    def _modify(self, cpu, plane, header, index, element):
        self.protections.modify_element(plane, header, element)

    def _get(self, cpu, plane, header, index, element):
        return check_header(self, cpu, plane, header).get(int.from_bytes(element, "little"))

    def _set(self, cpu, plane, header, index, element):
        name = int.from_bytes(element[0:4], "little")
        check_header(self, cpu, plane, header).set(name, element[16:32])

    def check_vtl_enabled(self, cpu, vtl: int) -> None:
        """pykvmm boot mode: every VTL is enabled on every VP from the start."""

    # -- VSM registers --------------------------------------------------------------------------
    def get_register(self, cpu, caller: int, target: int, name: int) -> int | None:
        n = self.machine.plane_count
        enabled = (1 << n) - 1
        if name == REG_VSM_CODE_PAGE_OFFSETS:
            return abi.HCPAGE_VTL_CALL | abi.HCPAGE_VTL_RETURN << 12
        if name == REG_VSM_VP_STATUS:
            return (target & 0xF) | enabled << 8
        if name == REG_VSM_PARTITION_STATUS:
            return enabled | (n - 1) << 16
        if name == REG_VSM_CAPABILITIES:
            return 0            # DR6 not shared, no MBEC, no deny-lower-VTL-startup
        return None

    def set_register(self, cpu, caller: int, target: int, name: int, value: int) -> bool:
        return False

    # -- secure intercepts -----------------------------------------------------------------------
    def on_memory_fault(self, cpu, fault) -> bool:
        """A lower VTL broke a higher VTL's protection: intercept into that VTL. False if no
        VTL protection explains the fault (someone else set the plane's view)."""
        plane = cpu.plane
        need = FAULT_ACCESS.get(fault.flags)
        owner = None if need is None else self.protections.denier(plane, fault.gpa, need)
        if owner is None:
            return False
        v = cpu.cpu.plane_vcpu(plane)
        regs, sregs = v.regs, v.sregs
        events = v.get_vcpu_events()
        code, _ = self.machine.read_code(v, regs.rip, before=0, after=16)
        msg = memory_intercept_message(cpu.index, plane, regs, sregs, events, fault, code[:16])
        where = deliver(self.machine, cpu.index, owner, msg)
        self.stats["intercepts"] += 1
        self.stats["intercepts_" + where] += 1
        self.intercepts[(cpu.index, plane, owner, need.name.lower())] += 1
        sink = self.machine.trace
        if sink:
            sink(ev.TraceEvent("intercept", cpu.index, plane, {"to": owner, "gpa": fault.gpa,
                                                              "access": need.name.lower(), "rip": regs.rip,
                                                              "message": where}))
        cpu.switch_to(owner, reason="intercept", suspend=True)
        return True

    def summary(self) -> dict:
        out = dict(self.stats)
        out.update(self.protections.summary())
        return {"vsm": out}


def rep_call(vsm, cpu, plane, regs, header_size: int, rep_size: int, out_size: int, fn) -> int:
    """A memory-form rep call: RDX = input GPA (header, then rep elements), R8 = output GPA
    (out_size bytes per rep). Status | reps completed << 32 (TLFS result value)."""
    c = regs.rcx
    count, start = (c >> 32) & 0xFFF, (c >> 48) & 0xFFF
    if c & (1 << 16):
        return H.INVALID_HYPERCALL_INPUT   # fast: needs XMM input (the Hyper-V layer)
    if c & ((0x3FF << 17) | (0x1F << 27) | (0xF << 44) | (0xF << 60)) or not count or start >= count:
        return H.INVALID_HYPERCALL_INPUT
    mem = vsm.machine.memory
    gpa, out = regs.rdx, regs.r8
    total = header_size + count * rep_size
    if gpa & 7 or (out_size and out & 7):
        return H.INVALID_ALIGNMENT
    if (gpa & 0xFFF) + total > 0x1000 or (out_size and (out & 0xFFF) + count * out_size > 0x1000):
        return H.INVALID_ALIGNMENT
    if gpa + total > mem.size or (out_size and out + count * out_size > mem.size):
        return H.INVALID_PARAMETER
    block = mem.read(gpa, total)
    header = block[:header_size]
    i = start
    try:
        while i < count:
            off = header_size + i * rep_size
            result = fn(cpu, plane, header, i, block[off:off + rep_size])
            if out_size and result is not None:
                mem.write(out + i * out_size, result)
            i += 1
    except VsmError as e:
        return e.status | i << 32
    return H.SUCCESS | i << 32
