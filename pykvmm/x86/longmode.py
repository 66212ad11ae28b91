"""Long-mode bring-up done by the VMM, as the kernel's KVM selftests do.

The VMM writes a flat GDT, a TSS and identity page tables (2 MiB pages) into guest memory,
then sets each vCPU's segment and control registers so it starts directly in 64-bit mode.
"""

import struct

from . import arch

PAGE_PRESENT = 1 << 0
PAGE_WRITE = 1 << 1
PAGE_HUGE = 1 << 7

GDT_ENTRIES = 5  # null, code64, data, tss (two slots)


def descriptor(base: int, limit: int, access: int, flags: int) -> bytes:
    return struct.pack("<HHBBBB", limit & 0xFFFF, base & 0xFFFF, (base >> 16) & 0xFF, access,
                       ((limit >> 16) & 0xF) | (flags << 4), (base >> 24) & 0xFF)


def gdt_bytes(tss_addr: int, tss_limit: int = 0x67) -> bytes:
    null = b"\0" * 8
    code64 = descriptor(0, 0xFFFFF, 0x9B, 0xA)    # present, DPL0, code exec/read accessed; G, L
    data = descriptor(0, 0xFFFFF, 0x93, 0xC)      # present, DPL0, data r/w accessed; G, D/B
    tss_lo = descriptor(tss_addr, tss_limit, 0x8B, 0x0)  # present, 64-bit TSS (busy)
    tss_hi = struct.pack("<II", tss_addr >> 32, 0)
    return null + code64 + data + tss_lo + tss_hi


def interrupt_gate(handler: int, selector: int) -> bytes:
    """A 16-byte long-mode IDT entry: interrupt gate (IF cleared on entry), DPL 0, IST 0."""
    return struct.pack("<HHBBHII", handler & 0xFFFF, selector, 0, 0x8E, (handler >> 16) & 0xFFFF,
                       handler >> 32, 0)


def identity_page_tables(base: int, mem_size: int) -> bytes:
    """PML4 at base, PDPT at base+4K, page directories after: identity-map [0, mem_size)."""
    n_pd = max(1, (mem_size + (1 << 30) - 1) >> 30)
    if n_pd > 512:
        raise ValueError("more than 512 GiB of guest memory")
    pml4 = bytearray(4096)
    pdpt = bytearray(4096)
    pds = bytearray(4096 * n_pd)
    struct.pack_into("<Q", pml4, 0, (base + 0x1000) | PAGE_PRESENT | PAGE_WRITE)
    for i in range(n_pd):
        struct.pack_into("<Q", pdpt, i * 8, (base + 0x2000 + i * 0x1000) | PAGE_PRESENT | PAGE_WRITE)
    for page in range((mem_size + (2 << 20) - 1) >> 21):
        struct.pack_into("<Q", pds, page * 8, (page << 21) | PAGE_PRESENT | PAGE_WRITE | PAGE_HUGE)
    return bytes(pml4 + pdpt + pds)


def page_tables_size(mem_size: int) -> int:
    return 0x2000 + 0x1000 * max(1, (mem_size + (1 << 30) - 1) >> 30)


def _segment(seg, selector: int, code: bool, base: int = 0, limit: int = 0xFFFFFFFF) -> None:
    seg.base = base
    seg.limit = limit
    seg.selector = selector
    seg.type = 0xB if code else 0x3
    seg.present = 1
    seg.dpl = 0
    seg.db = 0 if code else 1
    seg.s = 1
    seg.l = 1 if code else 0
    seg.g = 1
    seg.avl = 0
    seg.unusable = 0


def setup_sregs(sregs, *, gdt_addr: int, tss_addr: int, cr3: int, sel_code: int, sel_data: int,
                sel_tss: int, osxsave: bool) -> None:
    """Put a vCPU's special registers into 64-bit long mode with paging on."""
    _segment(sregs.cs, sel_code, code=True)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _segment(seg, sel_data, code=False)
    tr = sregs.tr
    tr.base, tr.limit, tr.selector, tr.type = tss_addr, 0x67, sel_tss, 0xB
    tr.present, tr.dpl, tr.db, tr.s, tr.l, tr.g, tr.avl, tr.unusable = 1, 0, 0, 0, 0, 0, 0, 0
    sregs.ldt.unusable = 1
    sregs.ldt.selector = 0
    sregs.gdt.base, sregs.gdt.limit = gdt_addr, GDT_ENTRIES * 8 - 1
    sregs.idt.base, sregs.idt.limit = 0, 0
    sregs.cr0 = arch.CR0_PE | arch.CR0_MP | arch.CR0_ET | arch.CR0_NE | arch.CR0_WP | arch.CR0_AM | arch.CR0_PG
    sregs.cr3 = cr3
    sregs.cr4 = arch.CR4_PAE | arch.CR4_OSFXSR | arch.CR4_OSXMMEXCPT | (arch.CR4_OSXSAVE if osxsave else 0)
    sregs.efer = arch.EFER_LME | arch.EFER_LMA | arch.EFER_SCE | arch.EFER_NXE


# ---- CPUID --------------------------------------------------------------------------------

CPUID_1_ECX_X2APIC = 1 << 21
CPUID_1_ECX_TSC_DEADLINE = 1 << 24
CPUID_1_ECX_XSAVE = 1 << 26
CPUID_1_ECX_OSXSAVE = 1 << 27
CPUID_1_ECX_HYPERVISOR = 1 << 31


def adjust_cpuid_for_vcpu(cpuid, apic_id: int, osxsave: bool, add_flags: bool = True) -> None:
    """Per-vCPU fix-ups of KVM_GET_SUPPORTED_CPUID before KVM_SET_CPUID2 (``add_flags``:
    turn on x2APIC and the hypervisor flag; off when a CPU model has chosen the flags)."""
    for i in range(cpuid.nent):
        e = cpuid.entries[i]
        if e.function == 1:
            e.ebx = (e.ebx & 0x00FFFFFF) | ((apic_id & 0xFF) << 24)
            if add_flags:
                e.ecx |= CPUID_1_ECX_X2APIC | CPUID_1_ECX_HYPERVISOR
            if osxsave:
                e.ecx |= CPUID_1_ECX_OSXSAVE
        elif e.function in (0xB, 0x1F):
            e.edx = apic_id


def offer_tsc_deadline(cpuid) -> None:
    """CPUID.1:ECX.TSC-deadline on, for a KVM that emulates it (KVM_CAP_TSC_DEADLINE_TIMER) but
    leaves the bit to the VMM: mainline before 6.9 never lists it in KVM_GET_SUPPORTED_CPUID."""
    for i in range(cpuid.nent):
        e = cpuid.entries[i]
        if e.function == 1:
            e.ecx |= CPUID_1_ECX_TSC_DEADLINE


def supports_xsave(cpuid) -> bool:
    for i in range(cpuid.nent):
        e = cpuid.entries[i]
        if e.function == 1:
            return bool(e.ecx & CPUID_1_ECX_XSAVE)
    return False
