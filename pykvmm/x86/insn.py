"""Instruction lengths (capstone), for reporting and rewinding a faulting instruction.

``length(code)``: the length of the instruction at the start of ``code`` (0 if it does not
decode). ``start_before(fetch, end, matches)``: where the instruction that ends at ``end``
begins, for hosts that report an exit with RIP already past the instruction; x86 cannot be
decoded backwards uniquely, so each candidate start (1..15 bytes back) must decode to one
instruction ending exactly at ``end`` and satisfy ``matches(insn)`` (e.g. "writes the faulting
address"); the longest such candidate wins.
"""

from __future__ import annotations

MAX_INSN = 15
_cs = None


def _capstone():
    global _cs
    if _cs is None:
        import capstone
        _cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        _cs.detail = True
    return _cs


def decode(code: bytes, address: int = 0):
    """The capstone instruction at the start of ``code``, or None."""
    for insn in _capstone().disasm(code, address, 1):
        return insn
    return None


def length(code: bytes) -> int:
    insn = decode(code)
    return insn.size if insn is not None else 0


def start_before(fetch, end: int, matches) -> int | None:
    """``fetch(addr, n)`` -> bytes or None. The start of the instruction ending at ``end``."""
    for n in range(MAX_INSN, 0, -1):
        code = fetch(end - n, n)
        if not code or len(code) != n:
            continue
        insn = decode(code, end - n)
        if insn is not None and insn.size == n and matches(insn):
            return end - n
    return None


def memory_write_operands(insn) -> list:
    """The explicit memory operands ``insn`` writes (capstone x86 operands)."""
    import capstone
    from capstone import x86
    out = []
    for op in insn.operands:
        if op.type == x86.X86_OP_MEM and op.access & capstone.CS_AC_WRITE:
            out.append(op)
    return out


def effective_address(insn, op, reg_value) -> int | None:
    """The address a memory operand names, with ``reg_value(name)`` giving register values
    (RIP-relative operands count from the end of the instruction)."""
    mem = op.mem
    addr = mem.disp
    for reg, scale in ((mem.base, 1), (mem.index, mem.scale)):
        if reg == 0:
            continue
        name = insn.reg_name(reg)
        value = insn.address + insn.size if name == "rip" else reg_value(name)
        if value is None:
            return None
        addr += value * scale
    return addr & 0xFFFFFFFFFFFFFFFF
