"""x86-64 disassembly with capstone, lazily: instructions are decoded as they are asked for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

_cs = None


def _capstone():
    global _cs
    if _cs is None:
        import capstone
        _cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    return _cs


@dataclass(frozen=True)
class Insn:
    address: int
    size: int
    text: str
    raw: bytes

    def __str__(self):
        return f"{self.address:#018x}: {self.raw.hex(' '):<24} {self.text}"


def disassemble(code: bytes, address: int, count: int = 0) -> Iterator[Insn]:
    for i in _capstone().disasm_lite(code, address, count):
        addr, size, mnemonic, ops = i
        off = addr - address
        yield Insn(addr, size, f"{mnemonic} {ops}".strip(), code[off:off + size])


def insn_at(code: bytes, code_addr: int, rip: int) -> Insn | None:
    off = rip - code_addr
    if off < 0 or off >= len(code):
        return None
    return next(disassemble(code[off:], rip, 1), None)


def around(code: bytes, code_addr: int, rip: int, before: int = 3, after: int = 4) -> list[Insn]:
    """Instructions around ``rip``: the backward part is found by trying start points that
    decode into an instruction boundary exactly at ``rip`` (x86 cannot be decoded backwards)."""
    off = rip - code_addr
    if off < 0 or off >= len(code):
        return []
    lead: list[Insn] = []
    for start in range(max(0, off - 15 * before), off):
        insns = []
        for insn in disassemble(code[start:off], code_addr + start):
            insns.append(insn)
        if insns and insns[-1].address + insns[-1].size == rip:
            lead = insns[-before:]
            break
    tail = list(disassemble(code[off:], rip, after))
    return lead + tail
