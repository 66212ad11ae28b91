"""Guest symbols: an ELF64 symbol table read with the standard library (no binutils at run
time), and ``symbol+offset`` names for guest addresses, including the VMM's hypercall-page
stubs (which no guest ELF contains)."""

from __future__ import annotations

import struct
from bisect import bisect_right
from pathlib import Path

from ..vmm import abi

# The stubs pykvmm writes into the hypercall page (vmm/hypercalls.py), by offset in the page.
HYPERCALL_PAGE_SYMBOLS = {abi.HCPAGE_HYPERCALL: "hypercall_stub", abi.HCPAGE_VTL_CALL: "VtlCall_stub",
                          abi.HCPAGE_VTL_RETURN: "VtlReturn_stub"}

_STT_FUNC, _STT_OBJECT, _STT_NOTYPE = 2, 1, 0
_SHT_SYMTAB = 2


class SymbolError(ValueError):
    pass


def read_elf_symbols(path: str | Path) -> dict[str, int]:
    """name -> address of the defined function, object and label symbols of an ELF64 file,
    global ones first."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise SymbolError(f"{path}: not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    globals_: dict[str, int] = {}
    locals_: dict[str, int] = {}
    for i in range(shnum):
        sh = struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
        if sh[1] != _SHT_SYMTAB:
            continue
        sym_off, sym_size, strtab_index, entsize = sh[4], sh[5], sh[6], sh[9] or 24
        strtab = struct.unpack_from("<IIQQQQIIQQ", data, shoff + strtab_index * shentsize)
        str_off = strtab[4]
        for k in range(sym_off, sym_off + sym_size, entsize):
            name_off, info, _, shndx, value, _ = struct.unpack_from("<IBBHQQ", data, k)
            if not name_off or shndx == 0 or info & 0xF not in (_STT_FUNC, _STT_OBJECT, _STT_NOTYPE):
                continue
            end = data.index(b"\0", str_off + name_off)
            name = data[str_off + name_off:end].decode(errors="replace")
            if name.startswith(".L") or shndx == 0xFFF1 and not value:   # local labels, absolute constants
                continue
            (globals_ if info >> 4 else locals_).setdefault(name, value)
    # global symbols first: where a local label shares an address, the global name is shown
    return {**globals_, **{n: a for n, a in locals_.items() if n not in globals_}}


class Symbols:
    """Address -> ``name+0xoff`` for a guest (its ELF symbols plus the hypercall-page stubs)."""

    def __init__(self, symbols: dict[str, int] | None = None, source: str = ""):
        table = {abi.HYPERCALL_PAGE_ADDR + off: name for off, name in HYPERCALL_PAGE_SYMBOLS.items()}
        for name, addr in (symbols or {}).items():
            table.setdefault(addr, name)
        self.source = source
        self._addrs = sorted(table)
        self._names = [table[a] for a in self._addrs]
        self.by_name = {n: a for a, n in table.items()}

    @classmethod
    def for_image(cls, path: str | Path | None, explicit: str | Path | None = None) -> "Symbols":
        """``explicit`` (--symbols FILE, errors raised), else the ELF beside a flat binary
        (guest/build/NAME.elf for NAME.bin, silently absent), else only the stubs."""
        if explicit:
            return cls(read_elf_symbols(explicit), str(explicit))
        if path:
            p = Path(path)
            elf = p if p.suffix == ".elf" else p.with_suffix(".elf")
            if elf.exists():
                try:
                    return cls(read_elf_symbols(elf), str(elf))
                except (SymbolError, OSError, struct.error):
                    pass
        return cls()

    def name(self, addr: int, limit: int = 0x10000) -> str | None:
        """``symbol`` or ``symbol+0x12`` for ``addr`` (None if no symbol within ``limit`` below it)."""
        if not isinstance(addr, int):
            return None
        k = bisect_right(self._addrs, addr) - 1
        if k < 0:
            return None
        base = self._addrs[k]
        off = addr - base
        if off > limit or (base >= abi.HYPERCALL_PAGE_ADDR and addr >= abi.HYPERCALL_PAGE_ADDR + 0x1000
                           and base < abi.HYPERCALL_PAGE_ADDR + 0x1000):
            return None
        return self._names[k] + (f"+{off:#x}" if off else "")

    def describe(self, addr: int) -> str:
        """``0x1234 <symbol+0x4>`` or ``0x1234``."""
        n = self.name(addr)
        return f"{addr:#x} <{n}>" if n else f"{addr:#x}"
