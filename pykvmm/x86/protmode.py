"""32-bit protected-mode entry (paging off), the state a multiboot loader hands over.

Multiboot v1, "Machine state": CS a 32-bit read/execute code segment with offset 0 and
limit 0xffffffff, DS/ES/FS/GS/SS 32-bit read/write data segments with offset 0 and limit
0xffffffff, CR0.PG clear and CR0.PE set, EFLAGS.VM and EFLAGS.IF clear. GDTR and IDTR are
the loader's: the kernel must load its own before reloading a segment register.
"""

from . import arch
from .longmode import descriptor

SEL_CODE32 = 0x08
SEL_DATA32 = 0x10
SEL_TSS32 = 0x18


def gdt32_bytes(tss_addr: int) -> bytes:
    """null, flat 32-bit code, flat 32-bit data, a 32-bit TSS (busy, limit 0x67)."""
    return (b"\0" * 8 + descriptor(0, 0xFFFFF, 0x9B, 0xC) + descriptor(0, 0xFFFFF, 0x93, 0xC)
            + descriptor(tss_addr, 0x67, 0x8B, 0x0))


GDT32_SIZE = 4 * 8


def _flat(seg, selector: int, seg_type: int) -> None:
    seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFFFFFF, selector, seg_type
    seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g, seg.avl, seg.unusable = 1, 0, 1, 1, 0, 1, 0, 0


def setup_sregs32(sregs, *, gdt_addr: int, tss_addr: int) -> None:
    """Flat 32-bit protected mode, paging off, no long mode (sregs from KVM_GET_SREGS)."""
    _flat(sregs.cs, SEL_CODE32, 0xB)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _flat(seg, SEL_DATA32, 0x3)
    tr = sregs.tr
    tr.base, tr.limit, tr.selector, tr.type = tss_addr, 0x67, SEL_TSS32, 0xB
    tr.present, tr.dpl, tr.db, tr.s, tr.l, tr.g, tr.avl, tr.unusable = 1, 0, 0, 0, 0, 0, 0, 0
    sregs.ldt.unusable, sregs.ldt.selector = 1, 0
    sregs.gdt.base, sregs.gdt.limit = gdt_addr, GDT32_SIZE - 1
    sregs.idt.base, sregs.idt.limit = 0, 0x3FF
    sregs.cr0 = arch.CR0_PE | arch.CR0_ET
    sregs.cr3 = sregs.cr4 = 0
    sregs.efer = 0


def real_mode_segments(sregs, cs_selector: int) -> None:
    """Real mode with CS = cs_selector (base = selector << 4) and the other segments at 0,
    as firmware leaves a CPU it jumps to a real-mode vector (ACPI S3 resume)."""
    for seg, sel in ((sregs.cs, cs_selector), (sregs.ds, 0), (sregs.es, 0), (sregs.fs, 0),
                     (sregs.gs, 0), (sregs.ss, 0)):
        seg.base, seg.limit, seg.selector = sel << 4, 0xFFFF, sel
        seg.type = 0xB if seg is sregs.cs else 0x3
        seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g, seg.avl, seg.unusable = 1, 0, 0, 1, 0, 0, 0, 0
    sregs.gdt.base, sregs.gdt.limit = 0, 0xFFFF
    sregs.idt.base, sregs.idt.limit = 0, 0x3FF
    sregs.cr0 = arch.CR0_ET
    sregs.cr3 = sregs.cr4 = 0
    sregs.efer = 0

