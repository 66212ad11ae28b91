"""The x86-64 register layout gdb sees (target description XML and the ``g`` packet order),
read from and written to one KVM vCPU (one plane of one vCPU)."""

from __future__ import annotations

from ...x86.arch import GPRS
from ...x86.sysstate import SYSTEM_MSRS, read_system_state

SEGS = ("cs", "ss", "ds", "es", "fs", "gs")
FPU_CTRL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
SYSREGS = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")
DEBUGREGS = ("dr0", "dr1", "dr2", "dr3", "dr6", "dr7")           # the guest's own (KVM_GET_DEBUGREGS)
MSR_REGS = ("star", "lstar", "cstar", "sfmask", "kernel_gs_base")  # x86.sysstate.SYSTEM_MSRS

# (name, bits, xml type, group, feature)
REGISTERS: list[tuple[str, int, str, str, str]] = (
    [(n, 64, "data_ptr" if n in ("rbp", "rsp") else "int64", "", "core") for n in GPRS]
    + [("rip", 64, "code_ptr", "", "core"), ("eflags", 32, "i386_eflags", "", "core")]
    + [(n, 32, "int32", "", "core") for n in SEGS]
    + [(f"st{i}", 80, "i387_ext", "", "core") for i in range(8)]
    + [(n, 32, "int", "float", "core") for n in FPU_CTRL]
    + [(f"xmm{i}", 128, "vec128", "", "sse") for i in range(16)]
    + [("mxcsr", 32, "i386_mxcsr", "vector", "sse")]
    + [("fs_base", 64, "int", "", "segments"), ("gs_base", 64, "int", "", "segments")]
    + [(n, 64, "int", "system", "sys") for n in SYSREGS + DEBUGREGS]
    + [(n, 64, "code_ptr" if n in ("lstar", "cstar") else "int", "system", "sys") for n in MSR_REGS]
)
REG_INDEX = {r[0]: i for i, r in enumerate(REGISTERS)}

_EFLAGS = [(0, "CF"), (1, ""), (2, "PF"), (4, "AF"), (6, "ZF"), (7, "SF"), (8, "TF"), (9, "IF"),
           (10, "DF"), (11, "OF"), (14, "NT"), (16, "RF"), (17, "VM"), (18, "AC"), (19, "VIF"),
           (20, "VIP"), (21, "ID")]
_MXCSR = ["IE", "DE", "ZE", "OE", "UE", "PE", "DAZ", "IM", "DM", "ZM", "OM", "UM", "PM", "FZ"]
_FEATURES = {"core": "org.gnu.gdb.i386.core", "sse": "org.gnu.gdb.i386.sse",
             "segments": "org.gnu.gdb.i386.segments", "sys": "org.pykvmm.x86.system"}


def target_xml() -> str:
    out = ['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">', "<target>",
           "<architecture>i386:x86-64</architecture>"]
    for key, fname in _FEATURES.items():
        out.append(f'<feature name="{fname}">')
        if key == "core":
            out.append('<flags id="i386_eflags" size="4">')
            out += [f'<field name="{n}" start="{b}" end="{b}"/>' for b, n in _EFLAGS]
            out.append("</flags>")
        if key == "sse":
            out += ['<vector id="v4f" type="ieee_single" count="4"/>',
                    '<vector id="v2d" type="ieee_double" count="2"/>',
                    '<vector id="v16i8" type="int8" count="16"/>',
                    '<vector id="v8i16" type="int16" count="8"/>',
                    '<vector id="v4i32" type="int32" count="4"/>',
                    '<vector id="v2i64" type="int64" count="2"/>',
                    '<union id="vec128"><field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>'
                    '<field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/>'
                    '<field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/>'
                    '<field name="uint128" type="uint128"/></union>',
                    '<flags id="i386_mxcsr" size="4">']
            out += [f'<field name="{n}" start="{b}" end="{b}"/>' for b, n in enumerate(_MXCSR)]
            out.append("</flags>")
        for i, (name, bits, typ, group, feat) in enumerate(REGISTERS):
            if feat == key:
                g = f' group="{group}"' if group else ""
                out.append(f'<reg name="{name}" bitsize="{bits}" type="{typ}" regnum="{i}"{g}/>')
        out.append("</feature>")
    out.append("</target>")
    return "\n".join(out) + "\n"


def _ftag_full(fpu) -> int:
    """The i387 tag word from FXSAVE's abridged one (per physical register)."""
    top = (fpu.fsw >> 11) & 7
    tag = 0
    for phys in range(8):
        if not fpu.ftwx >> phys & 1:
            t = 3
        else:
            st = (phys - top) & 7
            raw = bytes(fpu.fpr[st])[:10]
            mant = int.from_bytes(raw[:8], "little")
            exp = int.from_bytes(raw[8:10], "little") & 0x7FFF
            if exp == 0x7FFF:
                t = 2
            elif exp == 0:
                t = 1 if mant == 0 else 2
            else:
                t = 0 if mant >> 63 else 2
        tag |= t << (2 * phys)
    return tag


def _ftwx_abridged(tag: int) -> int:
    return sum(1 << i for i in range(8) if (tag >> (2 * i)) & 3 != 3)


def read_registers(v) -> list[bytes]:
    """Every register of REGISTERS, in order, as gdb's little-endian bytes, from KVM vCPU ``v``."""
    r, s, f = v.get_regs(), v.get_sregs(), v.get_fpu()
    system = read_system_state(v, lapic=False)
    vals = {n: getattr(r, n) for n in GPRS}
    vals["rip"], vals["eflags"] = r.rip, r.rflags
    for n in SEGS:
        vals[n] = getattr(s, n).selector
    vals.update(fctrl=f.fcw, fstat=f.fsw, ftag=_ftag_full(f), fiseg=(f.last_ip >> 32) & 0xFFFF,
                fioff=f.last_ip & 0xFFFFFFFF, foseg=(f.last_dp >> 32) & 0xFFFF,
                fooff=f.last_dp & 0xFFFFFFFF, fop=f.last_opcode & 0x7FF, mxcsr=f.mxcsr,
                fs_base=s.fs.base, gs_base=s.gs.base, cr0=s.cr0, cr2=s.cr2, cr3=s.cr3, cr4=s.cr4,
                cr8=s.cr8, efer=s.efer)
    for part, names in (("dr", DEBUGREGS), ("msrs", MSR_REGS)):
        vals.update({n: system[part].get(n, 0) for n in names})     # 0 where KVM refused them
    out = []
    for name, bits, *_ in REGISTERS:
        if name.startswith("st") and name[2:].isdigit():
            out.append(bytes(f.fpr[int(name[2:])])[:10])
        elif name.startswith("xmm"):
            out.append(bytes(f.xmm[int(name[3:])]))
        else:
            out.append((vals[name] & ((1 << bits) - 1)).to_bytes(bits // 8, "little"))
    return out


def write_registers(v, values: dict[int, bytes]) -> None:
    """Write the registers ``values`` (REGISTERS index -> gdb bytes) that differ to KVM vCPU ``v``."""
    current = read_registers(v)
    changed = {REGISTERS[i][0]: d for i, d in values.items() if d != current[i]}
    if not changed:
        return
    as_int = {n: int.from_bytes(d, "little") for n, d in changed.items()}
    if any(n in GPRS or n in ("rip", "eflags") for n in changed):
        r = v.get_regs()
        for n in GPRS:
            if n in as_int:
                setattr(r, n, as_int[n])
        if "rip" in as_int:
            r.rip = as_int["rip"]
        if "eflags" in as_int:
            r.rflags = as_int["eflags"] | 0x2
        v.set_regs(r)
    if any(n in SEGS or n in SYSREGS or n in ("fs_base", "gs_base") for n in changed):
        s = v.get_sregs()
        for n in SEGS:
            if n in as_int:
                getattr(s, n).selector = as_int[n]
        for n in SYSREGS:
            if n in as_int:
                setattr(s, n, as_int[n])
        if "fs_base" in as_int:
            s.fs.base = as_int["fs_base"]
        if "gs_base" in as_int:
            s.gs.base = as_int["gs_base"]
        v.set_sregs(s)
    if any(n in DEBUGREGS for n in changed):
        d = v.get_debugregs()
        for k, n in enumerate(DEBUGREGS[:4]):
            if n in as_int:
                d.db[k] = as_int[n]
        d.dr6 = as_int.get("dr6", d.dr6)
        d.dr7 = as_int.get("dr7", d.dr7)
        v.set_debugregs(d)
    msrs = {SYSTEM_MSRS[n]: as_int[n] for n in MSR_REGS if n in as_int}
    if msrs:
        v.set_msrs(msrs)
    fpu_names = set(FPU_CTRL) | {"mxcsr"} | {f"st{i}" for i in range(8)} | {f"xmm{i}" for i in range(16)}
    if any(n in fpu_names for n in changed):
        f = v.get_fpu()
        for n, d in changed.items():
            if n.startswith("st") and n[2:].isdigit():
                buf = bytearray(bytes(f.fpr[int(n[2:])]))
                buf[:10] = d
                for k in range(16):
                    f.fpr[int(n[2:])][k] = buf[k]
            elif n.startswith("xmm"):
                for k in range(16):
                    f.xmm[int(n[3:])][k] = d[k]
        x = as_int
        if "fctrl" in x:
            f.fcw = x["fctrl"] & 0xFFFF
        if "fstat" in x:
            f.fsw = x["fstat"] & 0xFFFF
        if "ftag" in x:
            f.ftwx = _ftwx_abridged(x["ftag"])
        if "fop" in x:
            f.last_opcode = x["fop"] & 0x7FF
        if "fioff" in x or "fiseg" in x:
            f.last_ip = (x.get("fiseg", f.last_ip >> 32) << 32) | x.get("fioff", f.last_ip & 0xFFFFFFFF)
        if "fooff" in x or "foseg" in x:
            f.last_dp = (x.get("foseg", f.last_dp >> 32) << 32) | x.get("fooff", f.last_dp & 0xFFFFFFFF)
        if "mxcsr" in x:
            f.mxcsr = x["mxcsr"]
        v.set_fpu(f)

