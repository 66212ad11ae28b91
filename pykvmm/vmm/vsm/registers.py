"""TLFS "Virtual Processor Register Interface": HvCallGetVpRegisters (0x0050) and
HvCallSetVpRegisters (0x0051), both rep calls.

Input header: PartitionId u64 @0, VpIndex u32 @8, TargetVtl HV_INPUT_VTL @12, 3 reserved bytes.
Get: each rep element is an HV_REGISTER_NAME (u32, packed); each output element is a 16-byte
HV_REGISTER_VALUE. Set: each element is HV_REGISTER_ASSOC: name u32, 12 reserved bytes, then
the 16-byte value.

VTL rule: a VTL reads and writes its own and lower VTLs' registers, never a higher VTL's
(ACCESS_DENIED), and only of VTLs enabled on the VP (INVALID_VTL_STATE). VpIndex:
HV_VP_INDEX_SELF, the caller's own VP, or another VP (remote.py: done by that VP's thread;
INVALID_VP_STATE while that VP executes with the registers asked for); a VP that does not
exist -> INVALID_VP_INDEX. An unknown name -> INVALID_PARAMETER; a read-only register in a
Set -> INVALID_PARAMETER.

Shared registers (TLFS "VP State Isolation": RAX..R15 but RSP, CR2, DR0-DR3, XCR0) are one
value for all VTLs of a VP: they are read from and written to the state of the VTL the VP
runs (the caller's, on its own VP), which the VTL personality hands on at the next switch.
Everything else is the target VTL's own.
"""

from __future__ import annotations

import struct

from ...kvm import KvmError
from ...x86 import arch
from . import hvdef as H
from ..hyperv.hypercall import target_vtl
from ..hyperv.tlfs import (REG_APIC_BASE, REG_CR0, REG_CR2, REG_CR3, REG_CR4, REG_CR8, REG_CSTAR,  # noqa: F401 (HV_REGISTER_NAME values)
                           REG_DR0, REG_DR1, REG_DR2, REG_DR3, REG_DR6, REG_DR7, REG_EFER, REG_GDTR, REG_IDTR,
                           REG_KERNEL_GS_BASE, REG_LSTAR, REG_PAT, REG_RAX as REG_GPR0, REG_RFLAGS, REG_RIP,
                           REG_ES as REG_SEG0, REG_SFMASK, REG_STAR, REG_SYSENTER_CS, REG_SYSENTER_EIP,
                           REG_SYSENTER_ESP, REG_TSC, REG_TSC_AUX, REG_VP_ASSIST_PAGE, REG_VSM_CAPABILITIES,
                           REG_VSM_CODE_PAGE_OFFSETS, REG_VSM_PARTITION_CONFIG, REG_VSM_PARTITION_STATUS,
                           REG_VSM_VINA, REG_VSM_VP_SECURE_CONFIG_VTL0, REG_VSM_VP_STATUS, REG_XFEM)
from .protections import VsmError, check_partition
from .remote import check_idle, vp_thread

GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs", "ldt", "tr")

MSRS = {REG_TSC: arch.MSR_IA32_TSC, REG_KERNEL_GS_BASE: arch.MSR_KERNEL_GS_BASE, REG_PAT: arch.MSR_IA32_CR_PAT,
        REG_SYSENTER_CS: arch.MSR_IA32_SYSENTER_CS, REG_SYSENTER_EIP: arch.MSR_IA32_SYSENTER_EIP,
        REG_SYSENTER_ESP: arch.MSR_IA32_SYSENTER_ESP, REG_STAR: arch.MSR_STAR, REG_LSTAR: arch.MSR_LSTAR,
        REG_CSTAR: arch.MSR_CSTAR, REG_SFMASK: arch.MSR_SFMASK, REG_TSC_AUX: arch.MSR_TSC_AUX}
# name -> (live copy, field) for the registers kept in kvm_regs / kvm_sregs
FIELDS = {REG_GPR0 + i: ("regs", n) for i, n in enumerate(GPRS)}
FIELDS.update({REG_RIP: ("regs", "rip"), REG_RFLAGS: ("regs", "rflags"), REG_CR0: ("sregs", "cr0"),
               REG_CR2: ("sregs", "cr2"), REG_CR3: ("sregs", "cr3"), REG_CR4: ("sregs", "cr4"),
               REG_CR8: ("sregs", "cr8"), REG_EFER: ("sregs", "efer"), REG_APIC_BASE: ("sregs", "apic_base")})
SEGMENT_FIELDS = {REG_SEG0 + i: n for i, n in enumerate(SEGMENTS)}
TABLE_FIELDS = {REG_IDTR: "idt", REG_GDTR: "gdt"}
SHARED = {REG_GPR0 + i for i, n in enumerate(GPRS) if n != "rsp"} | {REG_CR2, REG_XFEM} \
    | {REG_DR0, REG_DR1, REG_DR2, REG_DR3}


def u128(value: int) -> bytes:
    return (value & ((1 << 128) - 1)).to_bytes(16, "little")


def seg_value(seg) -> bytes:
    from .intercept import segment_bytes
    return segment_bytes(seg)


def set_seg(seg, value: bytes) -> None:
    base, limit, selector, attr = struct.unpack("<QIHH", value)
    seg.base, seg.limit, seg.selector = base, limit, selector
    seg.type, seg.s, seg.dpl, seg.present = attr & 0xF, attr >> 4 & 1, attr >> 5 & 3, attr >> 7 & 1
    seg.avl, seg.l, seg.db, seg.g = attr >> 12 & 1, attr >> 13 & 1, attr >> 14 & 1, attr >> 15 & 1
    seg.unusable = 0 if seg.present else 1


def table_value(dt) -> bytes:
    return struct.pack("<6xHQ", dt.limit, dt.base)


def set_table(dt, value: bytes) -> None:
    dt.limit, dt.base = struct.unpack("<6xHQ", value)


class RegisterAccess:
    """Registers of VTL ``target`` of the VP whose thread is ``cpu`` (the caller is VTL
    ``caller``). Used on ``cpu``'s own thread (remote.py for another VP's)."""

    def __init__(self, vsm, cpu, caller: int, target: int):
        self.vsm, self.cpu, self.caller, self.target = vsm, cpu, caller, target

    def _vcpu(self, name: int):
        plane = self.cpu.plane if name in SHARED else self.target
        return self.cpu.plane_vcpu(plane)

    def check_idle(self, name: int) -> None:
        """Another VP's registers: only while it does not execute with them (remote.py)."""
        check_idle(self.cpu, self.target, name in SHARED, "reaching")

    def get(self, name: int) -> bytes:
        v = self._vcpu(name)
        field = FIELDS.get(name)
        if field is not None:
            return u128(getattr(getattr(v, field[0]), field[1]))
        if name in SEGMENT_FIELDS:
            return seg_value(getattr(v.sregs, SEGMENT_FIELDS[name]))
        if name in TABLE_FIELDS:
            return table_value(getattr(v.sregs, TABLE_FIELDS[name]))
        if REG_DR0 <= name <= REG_DR7:
            d = v.get_debugregs()
            i = name - REG_DR0
            return u128(d.db[i] if i < 4 else d.dr6 if name == REG_DR6 else d.dr7)
        if name == REG_XFEM:
            xs = v.get_xcrs()
            return u128(next((xs.xcrs[i].value for i in range(xs.nr_xcrs) if xs.xcrs[i].xcr == 0), 1))
        if name in MSRS:
            return u128(v.get_msrs([MSRS[name]]).get(MSRS[name], 0))
        value = self.vsm.get_register(self.cpu, self.caller, self.target, name)
        if value is None:
            raise VsmError(H.INVALID_PARAMETER, f"register {name:#x} is not known")
        return u128(value)

    def set(self, name: int, raw: bytes) -> None:
        v = self._vcpu(name)
        value = int.from_bytes(raw[:8], "little")
        field = FIELDS.get(name)
        if field is not None:
            setattr(getattr(v, field[0]), field[1], value)
            v.mark_dirty(field[0])
            return
        if name in SEGMENT_FIELDS or name in TABLE_FIELDS:
            s = v.sregs
            if name in SEGMENT_FIELDS:
                set_seg(getattr(s, SEGMENT_FIELDS[name]), raw)
            else:
                set_table(getattr(s, TABLE_FIELDS[name]), raw)
            v.mark_dirty("sregs")
            return
        if REG_DR0 <= name <= REG_DR7:
            d = v.get_debugregs()
            i = name - REG_DR0
            if i < 4:
                d.db[i] = value
            elif name == REG_DR6:
                d.dr6 = value
            else:
                d.dr7 = value
            d.flags = 0
            v.set_debugregs(d)
            self.vsm.forget(self.cpu.index, self.caller if name in SHARED else self.target)
            return
        if name in MSRS:
            try:
                v.set_msrs({MSRS[name]: value})
            except KvmError as e:
                raise VsmError(H.INVALID_PARAMETER, f"register {name:#x} value {value:#x}: {e}") from None
            return
        if not self.vsm.set_register(self.cpu, self.caller, self.target, name, value):
            raise VsmError(H.INVALID_PARAMETER, f"register {name:#x} is not known or not writable")


def check_header(vsm, cpu, caller: int, header: bytes) -> RegisterAccess:
    check_partition(header)
    cpu = vp_thread(vsm, cpu, int.from_bytes(header[8:12], "little"))
    target = target_vtl(header[12], caller, vsm.machine.plane_count)
    if target > caller:
        raise VsmError(H.ACCESS_DENIED, f"VTL{caller} cannot reach the registers of the higher VTL{target}")
    vsm.check_vtl_enabled(cpu, target)
    return RegisterAccess(vsm, cpu, caller, target)
