"""Multiboot (v1) loader, as QEMU's -kernel loads a multiboot or ELF kernel.

The image is an ELF32/ELF64 executable (loaded by its PT_LOAD program headers at their
physical addresses), or a multiboot kernel whose header has the a.out kludge (flag 16:
the header gives the load and entry addresses). The boot processor starts in 32-bit
protected mode with paging off, EAX = 0x2BADB002 and EBX = the multiboot information
(memory sizes and map, the command line "FILE --append-text", the --initrd file as module 0). The
application processors wait for INIT/SIPI (KVM_MP_STATE_INIT_RECEIVED): the BSP starts
them through the in-kernel LAPIC, as on a PC.

As QEMU lays them out, the module follows the image (page aligned) and the boot structures
(multiboot info, memory map, module list, strings, a GDT and TSS) follow the module. The
image may not overlap anything the platform reserves (the ACPI tables at 0xE0000).
"""

from __future__ import annotations

import struct

from ...uapi import constants as C
from ...x86 import arch, protmode
from .errors import BootError

MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_BOOT_MAGIC = 0x2BADB002
MULTIBOOT_SEARCH = 8192           # the header lies within the first 8 KiB, 4-byte aligned
MB_FLAG_PAGE_ALIGN = 1 << 0       # required flags (bits 0-15) the loader honours
MB_FLAG_MEMORY_INFO = 1 << 1
MB_FLAG_VIDEO_MODE = 1 << 2
MB_FLAG_AOUT_KLUDGE = 1 << 16
MB_SUPPORTED_REQUIRED = MB_FLAG_PAGE_ALIGN | MB_FLAG_MEMORY_INFO

# multiboot_info.flags
MBI_MEM, MBI_CMDLINE, MBI_MODS, MBI_MMAP, MBI_LOADER_NAME = 1 << 0, 1 << 2, 1 << 3, 1 << 6, 1 << 9
MBI_SIZE = 88
MMAP_AVAILABLE, MMAP_RESERVED = 1, 2

# The boot area (offsets from its page-aligned start after the image and the module).
MBI_OFFSET = 0x000
MMAP_OFFSET = 0x100
MODS_OFFSET = 0x200
GDT_OFFSET = 0x300
TSS_OFFSET = 0x380
STRINGS_OFFSET = 0x400
BOOT_AREA_SIZE = 0x2000
LOW_MEM_END = 0x9FC00             # 639 KiB of conventional memory, as a PC BIOS reports
HIGH_MEM = 0x100000
LOADER_NAME = b"pykvmm\0"

ELF_MAGIC = b"\x7fELF"
EM_386, EM_X86_64 = 3, 62
ET_EXEC = 2
PT_LOAD = 1


def _find_header(data: bytes) -> tuple[int, int] | None:
    """(offset, flags) of a valid multiboot header; BootError for one with a bad checksum."""
    bad = None
    for off in range(0, min(len(data), MULTIBOOT_SEARCH) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic != MULTIBOOT_HEADER_MAGIC:
            continue
        if (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return off, flags
        bad = off if bad is None else bad
    if bad is not None:
        raise BootError(f"multiboot header at offset {bad:#x} has a bad checksum "
                        "(magic + flags + checksum must be 0 mod 2^32)")
    return None


def looks_like_multiboot(data: bytes) -> bool:
    """An ELF file or a file with a multiboot magic in its first 8 KiB: this loader's, not flat."""
    if data[:4] == ELF_MAGIC:
        return True
    magic = struct.pack("<I", MULTIBOOT_HEADER_MAGIC)
    head = data[:MULTIBOOT_SEARCH]
    return any(head.startswith(magic, off) for off in range(0, len(head) - 3, 4))


class Segment:
    def __init__(self, paddr: int, data: bytes, memsz: int, what: str):
        self.paddr, self.data, self.memsz, self.what = paddr, data, memsz, what

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


def _elf_segments(data: bytes, name: str) -> tuple[list[Segment], int]:
    if len(data) < 52:
        raise BootError(f"{name}: truncated ELF header")
    ei_class, ei_data = data[4], data[5]
    if ei_data != 1:
        raise BootError(f"{name}: not a little-endian ELF file")
    if ei_class == 1:
        hdr = struct.unpack_from("<HHIIIIIHHHHHH", data, 16)
        e_type, e_machine, _, e_entry, e_phoff, _, _, _, e_phentsize, e_phnum = hdr[:10]
        ph_fmt, want_machine, bits = "<IIIIIIII", EM_386, 32
    elif ei_class == 2:
        if len(data) < 64:
            raise BootError(f"{name}: truncated ELF64 header")
        hdr = struct.unpack_from("<HHIQQQIHHHHHH", data, 16)
        e_type, e_machine, _, e_entry, e_phoff, _, _, _, e_phentsize, e_phnum = hdr[:10]
        ph_fmt, want_machine, bits = "<IIQQQQQQ", EM_X86_64, 64
    else:
        raise BootError(f"{name}: unknown ELF class {ei_class}")
    if e_machine not in (EM_386, EM_X86_64):
        raise BootError(f"{name}: ELF machine {e_machine} is not x86 (want {want_machine})")
    if e_type != ET_EXEC:
        raise BootError(f"{name}: ELF type {e_type} is not an executable (ET_EXEC)")
    if e_phentsize < struct.calcsize(ph_fmt) or e_phoff + e_phnum * e_phentsize > len(data):
        raise BootError(f"{name}: ELF program headers lie outside the file")
    segments, vmap = [], []
    for i in range(e_phnum):
        raw = struct.unpack_from(ph_fmt, data, e_phoff + i * e_phentsize)
        if bits == 32:
            p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz = raw[:6]
        else:
            p_type, _, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz = raw[:7]
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        if p_filesz > p_memsz:
            raise BootError(f"{name}: ELF segment {i} has a file size larger than its memory size")
        if p_offset + p_filesz > len(data):
            raise BootError(f"{name}: ELF segment {i} lies beyond the end of the file")
        segments.append(Segment(p_paddr, data[p_offset:p_offset + p_filesz], p_memsz, f"ELF segment {i}"))
        vmap.append((p_vaddr, p_paddr, p_memsz))
    if not segments:
        raise BootError(f"{name}: the ELF file has no loadable segment")
    entry = e_entry
    for vaddr, paddr, memsz in vmap:       # enter at the physical address (paging is off)
        if vaddr <= e_entry < vaddr + memsz:
            entry = e_entry - vaddr + paddr
            break
    return segments, entry


def _aout_segments(data: bytes, off: int, name: str) -> tuple[list[Segment], int]:
    if off + 32 > len(data):
        raise BootError(f"{name}: the multiboot header is truncated (no address fields)")
    header_addr, load_addr, load_end, bss_end, entry = struct.unpack_from("<5I", data, off + 12)
    if load_addr > header_addr:
        raise BootError(f"{name}: multiboot load_addr {load_addr:#x} is above header_addr {header_addr:#x}")
    start = off - (header_addr - load_addr)
    if start < 0:
        raise BootError(f"{name}: multiboot header_addr/load_addr put the load start before the file")
    size = (load_end - load_addr) if load_end else len(data) - start
    if load_end and load_end < load_addr or start + size > len(data):
        raise BootError(f"{name}: multiboot load_end_addr {load_end:#x} lies beyond the file")
    memsz = max(size, bss_end - load_addr) if bss_end else size
    return [Segment(load_addr, data[start:start + size], memsz, "multiboot image")], entry


class MultibootImage:
    name = "multiboot"
    long_mode = False
    test_abi = False

    def __init__(self, data: bytes, *, cmdline: str = "", initrd: bytes | None = None, name: str = "guest"):
        self.path = name
        header = _find_header(data)
        flags = header[1] if header else 0
        if header and flags & 0xFFFF & ~MB_SUPPORTED_REQUIRED:
            what = "a video mode" if flags & MB_FLAG_VIDEO_MODE else f"flags {flags & 0xFFFF:#x}"
            raise BootError(f"{name}: the multiboot header requires {what}, which pykvmm does not provide")
        if header and flags & MB_FLAG_AOUT_KLUDGE:
            self.segments, self.entry = _aout_segments(data, header[0], name)
        elif data[:4] == ELF_MAGIC:
            self.segments, self.entry = _elf_segments(data, name)
        else:
            raise BootError(f"{name}: multiboot header without address fields (flag 16) and not an ELF file")
        if self.entry >= 1 << 32:
            raise BootError(f"{name}: entry point {self.entry:#x} is above 4 GiB (entered in 32-bit mode)")
        # As QEMU: the command line is the kernel's file name, a space, then the -append text
        # (kvm-unit-tests takes argv[0] from it).
        self.cmdline = f"{name} {cmdline}".encode() + b"\0"
        self.initrd = initrd
        room = BOOT_AREA_SIZE - STRINGS_OFFSET - len(LOADER_NAME) - 64
        if len(self.cmdline) > room:
            raise BootError(f"the command line is {len(self.cmdline) - 1} bytes; at most {room - 1} fit")
        self.reserved: list[tuple[int, int, str]] = []
        self.module_addr = self.boot_area = None

    def reserve(self, start: int, end: int, what: str) -> None:
        """Keep the image out of a range the platform uses (ACPI tables, ...)."""
        self.reserved.append((start, end, what))

    def check(self, config) -> None:
        mem = config.mem_size
        for seg in self.segments:
            if seg.paddr < 0 or seg.end > mem:
                raise BootError(f"{self.path}: {seg.what} at {seg.paddr:#x}-{seg.end:#x} lies outside guest RAM "
                                f"(0-{mem:#x}; more with --mem)")
            for start, end, what in self.reserved:
                if seg.paddr < end and start < seg.end:
                    raise BootError(f"{self.path}: {seg.what} at {seg.paddr:#x}-{seg.end:#x} overlaps {what} "
                                    f"at {start:#x}-{end:#x}")
        page = 0xFFF
        self.module_addr = (max(seg.end for seg in self.segments) + page) & ~page
        module_end = self.module_addr + (len(self.initrd) if self.initrd is not None else 0)
        self.boot_area = (module_end + page) & ~page
        if self.boot_area + BOOT_AREA_SIZE > mem:
            what = "the --initrd file and the boot structures" if self.initrd else "the boot structures"
            raise BootError(f"{what} ({module_end - self.module_addr + BOOT_AREA_SIZE} bytes after the image, "
                            f"at {self.module_addr:#x}) do not fit in guest RAM ({mem >> 20} MiB)")

    def memory_map(self, mem_size: int) -> list[tuple[int, int, int]]:
        regions = [(0, LOW_MEM_END, MMAP_AVAILABLE), (LOW_MEM_END, 0xA0000 - LOW_MEM_END, MMAP_RESERVED),
                   (0xE0000, 0x20000, MMAP_RESERVED)]
        if mem_size > HIGH_MEM:
            regions.append((HIGH_MEM, mem_size - HIGH_MEM, MMAP_AVAILABLE))
        return regions

    def write_memory(self, machine) -> None:
        mem, cfg = machine.memory, machine.config
        if self.boot_area is None:
            self.check(cfg)
        area = self.boot_area
        for seg in self.segments:
            mem.write(seg.paddr, seg.data)
            if seg.memsz > len(seg.data):
                mem.write(seg.paddr + len(seg.data), bytes(seg.memsz - len(seg.data)))
        mem.write(area + GDT_OFFSET, protmode.gdt32_bytes(area + TSS_OFFSET))
        mem.write(area + TSS_OFFSET, bytes(0x68))

        strings = area + STRINGS_OFFSET
        cmdline_addr = strings
        mem.write(cmdline_addr, self.cmdline)
        strings += len(self.cmdline)
        loader_addr = strings
        mem.write(loader_addr, LOADER_NAME)
        strings += len(LOADER_NAME)

        flags = MBI_MEM | MBI_CMDLINE | MBI_MMAP | MBI_LOADER_NAME
        mods_count = 0
        if self.initrd is not None:
            mem.write(self.module_addr, self.initrd)
            mod_name = strings
            mem.write(mod_name, b"initrd\0")
            mem.write(area + MODS_OFFSET, struct.pack("<4I", self.module_addr, self.module_addr + len(self.initrd),
                                             mod_name, 0))
            flags |= MBI_MODS
            mods_count = 1
        mmap = b"".join(struct.pack("<IQQI", 20, base, length, kind)
                        for base, length, kind in self.memory_map(cfg.mem_size))
        mem.write(area + MMAP_OFFSET, mmap)
        upper_kib = (min(cfg.mem_size, 0xFFFFFFFF) - HIGH_MEM) // 1024
        info = bytearray(MBI_SIZE)
        struct.pack_into("<7I", info, 0, flags, LOW_MEM_END // 1024, upper_kib, 0, cmdline_addr,
                         mods_count, area + MODS_OFFSET)
        struct.pack_into("<2I", info, 44, len(mmap), area + MMAP_OFFSET)
        struct.pack_into("<I", info, 64, loader_addr)
        mem.write(area + MBI_OFFSET, bytes(info))

    def init_vcpu(self, machine, v, index: int, plane: int) -> None:
        if index != 0:
            # An AP waits for INIT/SIPI; KVM starts it at the SIPI vector in real mode.
            v.set_mp_state(C.KVM_MP_STATE_INIT_RECEIVED)
            return
        sregs = v.get_sregs()
        protmode.setup_sregs32(sregs, gdt_addr=self.boot_area + GDT_OFFSET, tss_addr=self.boot_area + TSS_OFFSET)
        v.set_sregs(sregs)
        regs = v.get_regs()
        regs.rip = self.entry
        regs.rax, regs.rbx = MULTIBOOT_BOOT_MAGIC, self.boot_area + MBI_OFFSET
        regs.rflags = arch.RFLAGS_FIXED
        v.set_regs(regs)
        v.set_mp_state(C.KVM_MP_STATE_RUNNABLE)
