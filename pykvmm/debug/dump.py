"""Human-readable state dumps: every plane's registers and the instructions at RIP."""

from __future__ import annotations

from ..x86 import arch
from .disasm import around

_RFLAGS = [(0, "CF"), (2, "PF"), (4, "AF"), (6, "ZF"), (7, "SF"), (8, "TF"), (9, "IF"), (10, "DF"), (11, "OF")]


def _flags(v: int) -> str:
    return " ".join(n for b, n in _RFLAGS if v >> b & 1)


def format_plane(ps, plane_label: str = "plane") -> list[str]:
    lines = [f"  {plane_label} {ps.plane}" + ("" if ps.started else " (never entered)")]
    if not ps.regs:
        lines.append(f"    state unavailable: {ps.events.get('error', '?')}")
        return lines
    r = ps.regs
    for i in range(0, len(arch.GPRS), 4):
        lines.append("    " + "  ".join(f"{n.upper():>3}={r[n]:016x}" for n in arch.GPRS[i:i + 4]))
    lines.append(f"    RIP={r['rip']:016x}  RFLAGS={r['rflags']:08x} [{_flags(r['rflags'])}]")
    s = ps.sregs
    lines.append(f"    CR0={s['cr0']:08x} CR2={s['cr2']:016x} CR3={s['cr3']:016x} CR4={s['cr4']:08x} "
                 f"EFER={s['efer']:x}")
    lines.append("    " + " ".join(f"{n.upper()}={s[n]['selector']:04x}" for n in ("cs", "ds", "ss", "es", "fs", "gs", "tr"))
                 + f"  GDT={s['gdt']['base']:x}/{s['gdt']['limit']:x} IDT={s['idt']['base']:x}/{s['idt']['limit']:x}")
    e = ps.events
    pend = []
    if e["exception"]["injected"] or e["exception"]["pending"]:
        nr = e["exception"]["nr"]
        pend.append(f"exception {arch.EXCEPTION_NAMES.get(nr, nr)}")
    if e["interrupt"]["injected"]:
        pend.append(f"interrupt {e['interrupt']['nr']:#x}")
    if e["nmi"]["pending"] or e["nmi"]["injected"]:
        pend.append("NMI")
    if e.get("triple_fault_pending"):
        pend.append("triple fault")
    lines.append("    pending events: " + (", ".join(pend) if pend else "none"))
    insns = around(ps.code, ps.code_addr, r["rip"])
    if insns:
        lines.append("    code:")
        for insn in insns:
            mark = "=>" if insn.address == r["rip"] else "  "
            lines.append(f"    {mark} {insn}")
    else:
        lines.append(f"    code: RIP {r['rip']:#x} is not mapped in guest memory")
    return lines


def format_cpu_report(report, plane_label: str = "plane") -> str:
    head = f"vCPU {report.vcpu}: running {plane_label} {report.plane}"
    if report.suspended:
        head += f", suspended {plane_label}s {report.suspended}"
    lines = [head]
    for p in sorted(report.planes):
        lines += format_plane(report.planes[p], plane_label)
    return "\n".join(lines)


def where(report) -> str:
    """One line: where a vCPU is (for timeouts)."""
    ps = report.planes.get(report.plane)
    if not ps or not ps.regs:
        return f"vCPU {report.vcpu} plane {report.plane}: state unavailable"
    rip = ps.regs["rip"]
    insns = around(ps.code, ps.code_addr, rip, before=0, after=1)
    text = insns[0].text if insns else "?"
    return f"vCPU {report.vcpu} plane {report.plane}: RIP={rip:#x}  {text}"
