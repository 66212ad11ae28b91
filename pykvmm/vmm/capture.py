"""State capture for crash reports and dumps: every plane's registers of a vCPU and the guest
code around RIP."""

from __future__ import annotations

from ..kvm import KvmError, Vcpu
from ..x86 import arch
from ..x86.sysstate import read_system_state
from .results import CpuReport, PlaneState


def regs_dict(r) -> dict:
    return {n: getattr(r, n) for n in arch.GPRS + ("rip", "rflags")}


def _segment(s) -> dict:
    return {"selector": s.selector, "base": s.base, "limit": s.limit, "type": s.type, "dpl": s.dpl,
            "present": s.present, "l": s.l, "db": s.db}


def sregs_dict(s) -> dict:
    d = {n: getattr(s, n) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")}
    for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        d[n] = _segment(getattr(s, n))
    d["gdt"] = {"base": s.gdt.base, "limit": s.gdt.limit}
    d["idt"] = {"base": s.idt.base, "limit": s.idt.limit}
    return d


def events_dict(e) -> dict:
    return {"exception": {"injected": e.exception.injected, "nr": e.exception.nr,
                          "pending": e.exception.pending, "has_error_code": e.exception.has_error_code,
                          "error_code": e.exception.error_code},
            "interrupt": {"injected": e.interrupt.injected, "nr": e.interrupt.nr, "shadow": e.interrupt.shadow},
            "nmi": {"injected": e.nmi.injected, "pending": e.nmi.pending, "masked": e.nmi.masked},
            "triple_fault_pending": e.triple_fault.pending}


def read_code(memory, vcpu: Vcpu, rip: int, before: int = 32, after: int = 48) -> tuple[bytes, int]:
    """Guest bytes around ``rip`` (virtual), translated through the vCPU's page tables."""
    start = max(0, rip - before)
    out = bytearray()
    addr = start
    while addr < rip + after:
        try:
            gpa = vcpu.translate(addr)
        except KvmError:
            gpa = None
        if gpa is None or gpa >= memory.size:
            if addr < rip:
                start, out = addr + 1, bytearray()
                addr += 1
                continue
            break
        chunk = min(rip + after - addr, 4096 - (addr & 0xFFF), memory.size - gpa)
        out += memory.read(gpa, chunk)
        addr += chunk
    return bytes(out), start


def capture(memory, thread) -> CpuReport:
    """Every plane's state of one vCPU thread (call on that thread, or after it stopped)."""
    planes = {}
    for p in thread.planes_vcpu.planes:
        vcpu = thread.plane_vcpu(p)
        started = p in thread.started_planes
        try:
            regs, sregs, events = vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_vcpu_events()
        except KvmError as e:
            planes[p] = PlaneState(p, {}, {}, {"error": str(e)}, started=started)
            continue
        code, addr = read_code(memory.seen_by(p), vcpu, regs.rip)
        planes[p] = PlaneState(p, regs_dict(regs), sregs_dict(sregs), events_dict(events), code, addr,
                               started=started, system=read_system_state(vcpu))
    return CpuReport(thread.index, thread.plane, list(thread.suspended), planes)
