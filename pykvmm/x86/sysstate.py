"""The system state a debugger wants beside the general registers, read from one KVM vCPU (one
plane): the debug registers, the syscall and segment-base MSRs, and the local APIC's interrupt
state and timer. Each part that KVM refuses is reported as an error string, never raised."""

from __future__ import annotations

from ..kvm import KvmError, ffi
from . import apic, arch

SYSTEM_MSRS = {"star": arch.MSR_STAR, "lstar": arch.MSR_LSTAR, "cstar": arch.MSR_CSTAR,
               "sfmask": arch.MSR_SFMASK, "fs_base": arch.MSR_FS_BASE, "gs_base": arch.MSR_GS_BASE,
               "kernel_gs_base": arch.MSR_KERNEL_GS_BASE}

APIC_LVT_TIMER = 0x320
APIC_TMICT = 0x380     # initial count
APIC_TMCCT = 0x390     # current count
APIC_TDCR = 0x3E0      # divide configuration
TIMER_MODES = {0: "one-shot", 1: "periodic", 2: "TSC-deadline", 3: "reserved"}


def lapic_summary(regs: bytes) -> dict:
    """IRR/ISR vectors, TPR, PPR and the timer of a KVM_GET_LAPIC register page."""
    lvt = apic.reg32(regs, APIC_LVT_TIMER)
    return {"id": apic.reg32(regs, apic.APIC_ID) >> 24, "irr": apic.irr_vectors(regs),
            "isr": apic.isr_vectors(regs), "tpr": apic.reg32(regs, apic.APIC_TPR) & 0xFF,
            "ppr": apic.reg32(regs, apic.APIC_PPR) & 0xFF,
            "timer": {"vector": lvt & 0xFF, "masked": bool(lvt >> 16 & 1), "mode": TIMER_MODES[lvt >> 17 & 3],
                      "initial": apic.reg32(regs, APIC_TMICT), "current": apic.reg32(regs, APIC_TMCCT),
                      "divide": apic.reg32(regs, APIC_TDCR) & 0xB}}


def read_system_state(v, lapic: bool = True) -> dict:
    """{"dr": {...}, "msrs": {...}, "lapic": {...}} of KVM vCPU ``v`` (``lapic=False`` where the
    VM has no in-kernel LAPIC); a part KVM refused holds {"error": message}."""
    out = {}
    try:
        d = v.get_debugregs()
        out["dr"] = {"dr0": d.db[0], "dr1": d.db[1], "dr2": d.db[2], "dr3": d.db[3], "dr6": d.dr6, "dr7": d.dr7}
    except KvmError as e:
        out["dr"] = {"error": str(e)}
    try:
        values = v.get_msrs(list(SYSTEM_MSRS.values()))
        out["msrs"] = {name: values[index] for name, index in SYSTEM_MSRS.items() if index in values}
    except KvmError as e:
        out["msrs"] = {"error": str(e)}
    if lapic:
        try:
            out["lapic"] = lapic_summary(bytes(ffi.buffer(v.get_lapic().regs)))
        except KvmError as e:
            out["lapic"] = {"error": str(e)}
    return out
