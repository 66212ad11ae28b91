"""pykvmm's own guest protocol: a flat x86-64 binary at GUEST_LOAD_ADDR, entered in long mode.

Every (vCPU, plane) starts at the entry with rdi = vCPU index, rsi = plane, rdx = boot info
(see abi.py, the single source of these addresses).
"""

from __future__ import annotations

from ...uapi import constants as C
from ...x86 import arch, longmode
from .. import abi
from ..hypercalls import hypercall_page
from .errors import BootError


class FlatBinary:
    name = "flat"
    long_mode = True          # entered with paging and CR4.OSXSAVE (when the host has XSAVE) on
    test_abi = True           # uses the ucall/console ports and the hypercall page

    def __init__(self, image: bytes):
        if not image or len(image) > abi.GUEST_MAX_SIZE:
            raise BootError(f"a flat guest image must be 1..{abi.GUEST_MAX_SIZE} bytes, not {len(image)}")
        self.image = image

    def check(self, config) -> None:
        needed = abi.free_memory_start(config.vcpus)
        if config.mem_size < needed:
            raise BootError(f"guest memory of {config.mem_size >> 20} MiB is too small; {config.vcpus} vCPUs "
                            f"need at least {(needed + (1 << 20) - 1) >> 20} MiB")

    def write_memory(self, machine) -> None:
        mem, cfg = machine.memory, machine.config
        mem.write(abi.GDT_ADDR, longmode.gdt_bytes(abi.TSS_ADDR))
        mem.write(abi.PAGE_TABLE_ADDR, longmode.identity_page_tables(abi.PAGE_TABLE_ADDR, cfg.mem_size))
        if cfg.hyperv is not None:
            from ..hyperv.hypercall import page_bytes
            mem.write(abi.HYPERCALL_PAGE_ADDR, page_bytes())   # the same stubs, plus rep continuation
        else:
            mem.write(abi.HYPERCALL_PAGE_ADDR, hypercall_page("port"))
        mem.write(abi.GUEST_LOAD_ADDR, self.image)
        bi = abi.BOOT_INFO_ADDR
        mem.write_u64(bi + abi.BI_MAGIC, abi.BOOT_MAGIC)
        mem.write_u32(bi + abi.BI_VCPU_COUNT, cfg.vcpus)
        mem.write_u32(bi + abi.BI_PLANE_COUNT, cfg.planes)
        mem.write_u64(bi + abi.BI_HYPERCALL_PAGE, abi.HYPERCALL_PAGE_ADDR)
        mem.write_u64(bi + abi.BI_CONTROL_PAGE_BASE, abi.CONTROL_PAGE_BASE)
        mem.write_u64(bi + abi.BI_MEM_SIZE, cfg.mem_size)
        mem.write_u64(bi + abi.BI_FREE_START, abi.free_memory_start(cfg.vcpus))
        mem.write_u64(bi + abi.BI_FREE_END, cfg.mem_size)
        mem.write_u64(bi + abi.BI_ARG, cfg.arg)

    def init_vcpu(self, machine, v, index: int, plane: int) -> None:
        sregs = v.get_sregs()
        longmode.setup_sregs(sregs, gdt_addr=abi.GDT_ADDR, tss_addr=abi.TSS_ADDR, cr3=abi.PAGE_TABLE_ADDR,
                             sel_code=abi.SEL_CODE64, sel_data=abi.SEL_DATA, sel_tss=abi.SEL_TSS,
                             osxsave=machine.osxsave)
        v.set_sregs(sregs)
        regs = v.get_regs()
        regs.rip = abi.GUEST_LOAD_ADDR
        regs.rsp = abi.stack_top(index, plane)
        regs.rflags = arch.RFLAGS_FIXED
        regs.rdi, regs.rsi, regs.rdx = index, plane, abi.BOOT_INFO_ADDR
        v.set_regs(regs)
        base = arch.APIC_DEFAULT_BASE | arch.APICBASE_ENABLE | (arch.APICBASE_BSP if index == 0 else 0)
        # x2APIC is entered from xAPIC mode only: both writes, in order, in one ioctl
        v.set_msrs([(arch.MSR_IA32_APICBASE, base), (arch.MSR_IA32_APICBASE, base | arch.APICBASE_X2APIC)])
        v.set_mp_state(C.KVM_MP_STATE_RUNNABLE)
