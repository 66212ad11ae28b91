"""A software walk of x86-64 4-level page tables (for translating a guest-virtual address on
behalf of a guest, with the permission checks a hardware walk makes).

``walk(read_u64, cr3, gva)`` follows PML4 -> PDPT -> PD -> PT (1 GiB and 2 MiB pages
included) and returns a Walk: the GPA, or the level where an entry was not present, and the
accumulated permissions (writable only if every level allows writes, user only if every level
allows user, no-execute if any level sets NX).
"""

from __future__ import annotations

from dataclasses import dataclass

P, RW, US, PS = 1 << 0, 1 << 1, 1 << 2, 1 << 7
A, D = 1 << 5, 1 << 6
NX = 1 << 63
ADDR_MASK = 0x000FFFFFFFFFF000


@dataclass
class Walk:
    gpa: int | None           # None: not present
    writable: bool = True
    user: bool = True
    nx: bool = False
    level: int = 0            # the level that ended the walk (4 = PML4 ... 1 = PT)
    bad_entry: bool = False   # a reserved bit (MAXPHYADDR and above) was set
    entries: tuple = ()       # GPAs of the entries walked, top level first (for A/D updates)


def walk(read_u64, cr3: int, gva: int, maxphyaddr: int = 52) -> Walk:
    """``read_u64(gpa)`` -> int or None (outside memory). 4-level paging, 4 KiB granules."""
    table = cr3 & ADDR_MASK
    w = Walk(gpa=None)
    reserved = ADDR_MASK & ~((1 << maxphyaddr) - 1)
    for level, shift in ((4, 39), (3, 30), (2, 21), (1, 12)):
        at = table + ((gva >> shift) & 0x1FF) * 8
        entry = read_u64(at)
        w.level = level
        w.entries += (at,)
        if entry is None or not entry & P:
            return w
        if entry & reserved:
            w.bad_entry = True
            return w
        w.writable &= bool(entry & RW)
        w.user &= bool(entry & US)
        w.nx |= bool(entry & NX)
        if level in (3, 2) and entry & PS:
            size = 1 << shift
            w.gpa = (entry & ADDR_MASK & ~(size - 1)) | (gva & (size - 1))
            return w
        table = entry & ADDR_MASK
    w.gpa = table | (gva & 0xFFF)
    return w
