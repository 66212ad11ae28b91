"""Boot set-up of the flat-binary guest ABI (DESIGN.md "Guest ABI"): the memory image (GDT,
page tables, hypercall page, guest image, boot-info block) and every plane vCPU entered in
64-bit long mode at the guest's entry."""

from __future__ import annotations

from ..kvm import Vcpu
from ..uapi import constants as C
from ..x86 import arch, longmode
from . import abi


def write_long_mode_tables(mem, mem_size: int) -> None:
    """The GDT (with its TSS) and identity page tables that set_long_mode_sregs() points at."""
    mem.write(abi.GDT_ADDR, longmode.gdt_bytes(abi.TSS_ADDR))
    mem.write(abi.PAGE_TABLE_ADDR, longmode.identity_page_tables(abi.PAGE_TABLE_ADDR, mem_size))


def write_memory(mem, image: bytes, vcpus: int, planes: int, mem_size: int, arg: int,
                 hypercall_stubs: bytes) -> None:
    write_long_mode_tables(mem, mem_size)
    mem.write(abi.HYPERCALL_PAGE_ADDR, hypercall_stubs)
    mem.write(abi.GUEST_LOAD_ADDR, image)
    bi = abi.BOOT_INFO_ADDR
    mem.write_u64(bi + abi.BI_MAGIC, abi.BOOT_MAGIC)
    mem.write_u32(bi + abi.BI_VCPU_COUNT, vcpus)
    mem.write_u32(bi + abi.BI_PLANE_COUNT, planes)
    mem.write_u64(bi + abi.BI_HYPERCALL_PAGE, abi.HYPERCALL_PAGE_ADDR)
    mem.write_u64(bi + abi.BI_CONTROL_PAGE_BASE, abi.CONTROL_PAGE_BASE)
    mem.write_u64(bi + abi.BI_MEM_SIZE, mem_size)
    mem.write_u64(bi + abi.BI_FREE_START, abi.free_memory_start(vcpus))
    mem.write_u64(bi + abi.BI_FREE_END, mem_size)
    mem.write_u64(bi + abi.BI_ARG, arg)


def set_long_mode_sregs(vcpu: Vcpu, osxsave: bool) -> None:
    """Segments, tables and control registers of pykvmm's flat long-mode layout (abi: GDT, TSS,
    identity page tables)."""
    sregs = vcpu.get_sregs()
    longmode.setup_sregs(sregs, gdt_addr=abi.GDT_ADDR, tss_addr=abi.TSS_ADDR, cr3=abi.PAGE_TABLE_ADDR,
                         sel_code=abi.SEL_CODE64, sel_data=abi.SEL_DATA, sel_tss=abi.SEL_TSS,
                         osxsave=osxsave)
    vcpu.set_sregs(sregs)


def init_plane_vcpu(vcpu: Vcpu, index: int, plane: int, osxsave: bool, sync_classes: int,
                    shutdown_resets: bool, sync: bool = True) -> None:
    """Long mode at the guest entry with rdi = vCPU index, rsi = plane, rdx = boot info; the
    x2APIC on; runnable; ``sync_classes`` of registers kept in the sync area. On a host that
    resets the vCPU on a triple fault (``shutdown_resets``), the state each KVM_RUN enters
    with is kept too, for the crash report."""
    set_long_mode_sregs(vcpu, osxsave)
    regs = vcpu.get_regs()
    regs.rip = abi.GUEST_LOAD_ADDR
    regs.rsp = abi.stack_top(index, plane)
    regs.rflags = arch.RFLAGS_FIXED
    regs.rdi, regs.rsi, regs.rdx = index, plane, abi.BOOT_INFO_ADDR
    vcpu.set_regs(regs)
    base = arch.APIC_DEFAULT_BASE | arch.APICBASE_ENABLE | (arch.APICBASE_BSP if index == 0 else 0)
    # x2APIC is entered from xAPIC mode only: both writes, in order, in one ioctl
    vcpu.set_msrs([(arch.MSR_IA32_APICBASE, base), (arch.MSR_IA32_APICBASE, base | arch.APICBASE_X2APIC)])
    vcpu.set_mp_state(C.KVM_MP_STATE_RUNNABLE)
    if sync:
        enable_sync_regs(vcpu, sync_classes, shutdown_resets)


def enter_long_mode(vcpu: Vcpu, index: int, plane: int, osxsave: bool) -> None:
    """The flat ABI's start-up state alone (init_plane_vcpu without the sync-regs set-up)."""
    init_plane_vcpu(vcpu, index, plane, osxsave, 0, False, sync=False)


def enable_sync_regs(vcpu: Vcpu, sync_classes: int, shutdown_resets: bool) -> None:
    """Keep ``sync_classes`` (and the registers, always) in kvm_run's sync area; on a host
    that resets the vCPU on a triple fault, also the state each KVM_RUN enters with."""
    if vcpu.run_struct is not None:
        classes = C.KVM_SYNC_X86_REGS | sync_classes
        if shutdown_resets:
            classes |= C.KVM_SYNC_X86_SREGS
        if vcpu.enable_sync_regs(classes) & C.KVM_SYNC_X86_SREGS and shutdown_resets:
            vcpu.keep_entry_state()
