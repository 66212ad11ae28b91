"""Human-readable state dumps: every plane's registers and the instructions at RIP."""

from __future__ import annotations

from ..x86 import arch
from .disasm import around, insn_at
from .symbols import Symbols

_NO_SYMBOLS = Symbols()


_RFLAGS = [(0, "CF"), (2, "PF"), (4, "AF"), (6, "ZF"), (7, "SF"), (8, "TF"), (9, "IF"), (10, "DF"), (11, "OF"),
           (14, "NT"), (16, "RF"), (17, "VM"), (18, "AC"), (19, "VIF"), (20, "VIP"), (21, "ID")]
_SEG_NAMES = ("cs", "ds", "es", "ss", "fs", "gs", "tr", "ldt")


def _flags(v: int) -> str:
    return " ".join(n for b, n in _RFLAGS if v >> b & 1)


def _at(addr: int, symbols: Symbols) -> str:
    name = symbols.name(addr)
    return f" <{name}>" if name else ""


def format_plane(ps, plane_label: str = "plane", symbols: Symbols = _NO_SYMBOLS) -> list[str]:
    lines = [f"  {plane_label} {ps.plane}" + ("" if ps.started else " (never entered)")]
    if not ps.regs:
        lines.append(f"    state unavailable: {ps.events.get('error', '?')}")
        return lines
    r = ps.regs
    for i in range(0, len(arch.GPRS), 4):
        lines.append("    " + "  ".join(f"{n.upper():>3}={r[n]:016x}" for n in arch.GPRS[i:i + 4]))
    lines.append(f"    RIP={r['rip']:016x}{_at(r['rip'], symbols)}  RFLAGS={r['rflags']:08x} [{_flags(r['rflags'])}]")
    s = ps.sregs
    lines.append(f"    CR0={s['cr0']:08x} CR2={s['cr2']:016x} CR3={s['cr3']:016x} CR4={s['cr4']:08x} "
                 f"EFER={s['efer']:x}")
    lines.append("    " + " ".join(f"{n.upper()}={s[n]['selector']:04x}" for n in ("cs", "ds", "ss", "es", "fs", "gs", "tr"))
                 + f"  GDT={s['gdt']['base']:x}/{s['gdt']['limit']:x} IDT={s['idt']['base']:x}/{s['idt']['limit']:x}")
    lines += format_system(ps.sregs, ps.system)
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
            name = symbols.name(insn.address, limit=0)      # label the lines that start a symbol
            if name:
                lines.append(f"       <{name}>:")
            lines.append(f"    {mark} {insn}")
    else:
        lines.append(f"    code: RIP {r['rip']:#x} is not mapped in guest memory")
    return lines


def format_system(sregs: dict, system: dict) -> list[str]:
    """Segment bases, debug registers, syscall/base MSRs and the LAPIC, indented for a dump."""
    lines = ["    bases: " + " ".join(f"{n.upper()}={sregs[n]['base']:x}" for n in _SEG_NAMES if n in sregs)]
    dr = system.get("dr")
    if dr:
        lines.append("    " + ("debug registers unavailable: " + dr["error"] if "error" in dr else
                               "  ".join(f"{n.upper()}={dr[n]:x}" for n in ("dr0", "dr1", "dr2", "dr3", "dr6", "dr7"))))
    msrs = system.get("msrs")
    if msrs:
        lines.append("    " + ("MSRs unavailable: " + msrs["error"] if "error" in msrs else
                               "  ".join(f"{n.upper()}={v:x}" for n, v in msrs.items())))
    lapic = system.get("lapic")
    if lapic:
        lines.append("    " + ("LAPIC unavailable: " + lapic["error"] if "error" in lapic else format_lapic(lapic)))
    return lines


def _vectors(vs) -> str:
    return "[" + ",".join(f"{v:#x}" for v in vs) + "]"


def format_lapic(lapic: dict) -> str:
    t = lapic["timer"]
    return (f"LAPIC id={lapic['id']} TPR={lapic['tpr']:#x} PPR={lapic['ppr']:#x} IRR={_vectors(lapic['irr'])} "
            f"ISR={_vectors(lapic['isr'])} timer: vector={t['vector']:#x} {t['mode']}"
            f"{' masked' if t['masked'] else ''} initial={t['initial']} current={t['current']} "
            f"divide={t['divide']:#x}")


def format_cpu_report(report, plane_label: str = "plane", symbols: Symbols = _NO_SYMBOLS) -> str:
    head = f"vCPU {report.vcpu}: running {plane_label} {report.plane}"
    if report.suspended:
        head += f", suspended {plane_label}s {report.suspended}"
    lines = [head]
    for p in sorted(report.planes):
        lines += format_plane(report.planes[p], plane_label, symbols)
    return "\n".join(lines)


def explain_crash(crash, symbols: Symbols = _NO_SYMBOLS) -> str:
    """The crash reason with what the crashed plane was doing: for a triple fault, the exception
    the instruction at RIP raises (where it can be told from the instruction) and the IDT
    ("#UD at fault_ud2, IDT limit 0: triple fault")."""
    ps = crash.report.planes.get(crash.plane) if crash.report is not None else None
    if ps is None or not ps.regs or not crash.reason.startswith("triple fault"):
        return crash.reason
    rip = ps.regs["rip"]
    insn = insn_at(ps.code, ps.code_addr, rip)
    name = symbols.name(rip)
    place = name or f"{rip:#x}"
    if insn is None:
        what = f"an exception at {place} (RIP not mapped)"
    else:
        vector = _vector_of(insn.text)
        what = (f"{arch.EXCEPTION_NAMES[vector]} ({insn.text}) at {place}" if vector is not None
                else f"an exception at {place} ({insn.text})")
    idt = ps.sregs["idt"]
    handlers = "IDT limit 0" if idt["limit"] == 0 else f"IDT at {idt['base']:#x} limit {idt['limit']:#x}"
    return f"{what}, {handlers}: {crash.reason}"


def _vector_of(text: str) -> int | None:
    """The exception an instruction raises by itself, when it always does."""
    words = text.split()
    if not words:
        return None
    if words[0] in ("ud0", "ud1", "ud2"):
        return 6
    if words[0] == "int3":
        return 3
    if words[0] == "int1":
        return 1
    if words[0] == "int" and len(words) == 2:
        try:
            n = int(words[1], 0)
        except ValueError:
            return None
        return n if n in arch.EXCEPTION_NAMES else None
    return None


def where(report, symbols: Symbols = _NO_SYMBOLS) -> str:
    """One line: where a vCPU is (for timeouts)."""
    ps = report.planes.get(report.plane)
    if not ps or not ps.regs:
        return f"vCPU {report.vcpu} plane {report.plane}: state unavailable"
    rip = ps.regs["rip"]
    insns = around(ps.code, ps.code_addr, rip, before=0, after=1)
    text = insns[0].text if insns else "?"
    return f"vCPU {report.vcpu} plane {report.plane}: RIP={rip:#x}{_at(rip, symbols)}  {text}"
