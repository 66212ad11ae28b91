"""The multiboot loader: ELF32/ELF64 images entered in 32-bit protected mode with the
multiboot info, and every bad image refused with exit status 2 and a one-line reason.

The probe guest is assembled here (binutils): it checks EAX, echoes the command line and the
module through the UART, checks its .bss was zeroed, and exits through isa-debug-exit with
mem_upper (KiB) as its code.
"""

import shutil
import struct
import subprocess

import pytest

from pykvmm.vmm import boot
from pykvmm.vmm.boot import multiboot as mb
from pykvmm.vmm.machine import ExitStatus, Machine, MachineConfig
from test_cli import assert_clean_error, pykvmm

PROBE = r"""
.code32
.section .text
.globl _start
_start:
    cmp $0x2BADB002, %eax
    jne bad
    cmpl $0, bss_word
    jne bad
    mov $0x3f8, %dx
    mov 16(%ebx), %esi          /* cmdline */
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  mov $'|', %al
    out %al, %dx
    testl $8, (%ebx)            /* modules present? */
    jz 4f
    mov 24(%ebx), %edi
    mov (%edi), %esi
    mov 4(%edi), %ecx
3:  cmp %esi, %ecx
    je 4f
    lodsb
    out %al, %dx
    jmp 3b
4:  mov $'\n', %al
    out %al, %dx
    mov 8(%ebx), %eax           /* mem_upper */
    mov $0xf4, %dx
    out %eax, %dx
bad:
    mov $0xdead, %eax
    mov $0xf4, %dx
    out %eax, %dx
    hlt
.section .bss
bss_word: .long 0
"""

have_binutils = shutil.which("as") is not None and shutil.which("ld") is not None


def build_probe(tmp_path, elf64: bool, text_addr: int = 0x200000) -> str:
    src = tmp_path / "probe.S"
    src.write_text(PROBE)
    obj, out = tmp_path / "probe.o", tmp_path / f"probe{64 if elf64 else 32}.elf"
    subprocess.run(["as", "--64" if elf64 else "--32", "-o", str(obj), str(src)], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64" if elf64 else "elf_i386", f"-Ttext={text_addr:#x}",
                    "-e", "_start", "-o", str(out), str(obj)], check=True)
    return str(out)


def serial(result):
    return [t for v, _, t in result.console if v < 0]


@pytest.mark.skipif(not have_binutils, reason="needs binutils (as, ld)")
@pytest.mark.parametrize("elf64", [False, True], ids=["elf32", "elf64"])
def test_probe_sees_the_multiboot_info(kvm_available, tmp_path, elf64):
    initrd = tmp_path / "mod"
    initrd.write_bytes(b"MODULE")
    path = build_probe(tmp_path, elf64)
    image = boot.open_guest(path, cmdline="hello world", initrd=str(initrd))
    assert isinstance(image, boot.MultibootImage)
    with Machine(image, MachineConfig(quiet=True, mem_size=64 << 20)) as m:
        r = m.run(20)
    assert serial(r) == [f"{path} hello world|MODULE"]
    assert r.exit_code == (64 << 10) - 1024 and r.status == ExitStatus.ASSERT_FAILED


@pytest.mark.skipif(not have_binutils, reason="needs binutils (as, ld)")
def test_cli_append_and_initrd(kvm_available, tmp_path):
    initrd = tmp_path / "mod"
    initrd.write_bytes(b"ENV=1")
    path = build_probe(tmp_path, False)
    res = pykvmm("run", path, "--append", "a b", "--initrd", str(initrd), "--mem", "32")
    assert res.stdout.splitlines() == [f"{path} a b|ENV=1"]
    assert res.returncode == 1 and "guest wrote 0x7c00 to isa-debug-exit" in res.stderr


def test_flat_binaries_stay_flat():
    assert isinstance(boot.from_bytes(b"\x90" * 16), boot.FlatBinary)


# ---- bad images: a clear message and exit status 2, never a traceback ------------------

def elf32(phdrs, entry=0x200000, machine=3, etype=2, data=b"\xf4" * 16):
    """An ELF32 file: phdrs are (paddr, filesz, memsz); every segment's bytes are ``data``."""
    ehdr_size, ph_size = 52, 32
    off = ehdr_size + ph_size * len(phdrs)
    ident = b"\x7fELF" + bytes([1, 1, 1]) + bytes(9)
    out = ident + struct.pack("<HHIIIIIHHHHHH", etype, machine, 1, entry, ehdr_size, 0, 0, ehdr_size,
                              ph_size, len(phdrs), 40, 0, 0)
    body = b""
    for paddr, filesz, memsz in phdrs:
        out += struct.pack("<8I", 1, off + len(body), paddr, paddr, filesz, memsz, 7, 0x1000)
        body += data[:filesz].ljust(filesz, b"\0")
    return out + body


def multiboot_header(flags=0, checksum=None):
    return struct.pack("<III", mb.MULTIBOOT_HEADER_MAGIC, flags,
                       (-(mb.MULTIBOOT_HEADER_MAGIC + flags)) & 0xFFFFFFFF if checksum is None else checksum)


BAD_IMAGES = [
    ("bad-checksum", b"\0" * 16 + multiboot_header(checksum=1), "bad checksum"),
    ("video-mode", multiboot_header(flags=4) + b"\0" * 64, "requires a video mode"),
    ("no-address-fields", multiboot_header() + b"\0" * 64, "not an ELF file"),
    ("truncated-elf", b"\x7fELF\x01\x01\x01" + bytes(20), "truncated ELF header"),
    ("not-x86", elf32([(0x200000, 16, 16)], machine=40), "is not x86"),
    ("not-executable", elf32([(0x200000, 16, 16)], etype=1), "not an executable"),
    ("no-segments", elf32([]), "no loadable segment"),
    ("beyond-file", elf32([(0x200000, 16, 16)])[:-8], "beyond the end of the file"),
    ("outside-ram", elf32([(0x7FF0000, 16, 0x100000)]), "outside guest RAM"),
    ("over-acpi-tables", elf32([(0xF0000, 16, 16)]), "overlaps the ACPI tables"),
    ("no-room-for-boot-info", elf32([(0x3FFF000, 16, 0x1000)]), "boot structures"),
]


@pytest.mark.parametrize("name,data,phrase", BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
def test_bad_image_exit_2(kvm_available, tmp_path, name, data, phrase):
    p = tmp_path / name
    p.write_bytes(data)
    assert_clean_error(pykvmm("run", str(p), "--mem", "64"), 2, phrase)


def test_append_to_a_flat_binary_exit_2(kvm_available, tmp_path):
    p = tmp_path / "flat.bin"
    p.write_bytes(b"\xf4" * 16)
    assert_clean_error(pykvmm("run", str(p), "--append", "x"), 2, "is a flat binary")


def test_missing_initrd_exit_2(kvm_available, tmp_path):
    p = tmp_path / "k.elf"
    p.write_bytes(elf32([(0x200000, 16, 16)]))
    assert_clean_error(pykvmm("run", str(p), "--initrd", str(tmp_path / "nope")), 2, "initrd file", "does not exist")


def test_initrd_that_does_not_fit_exit_2(kvm_available, tmp_path):
    p = tmp_path / "k.elf"
    p.write_bytes(elf32([(0x1F00000, 16, 0xF0000)]))
    big = tmp_path / "big"
    big.write_bytes(b"\0" * (0x200000))
    assert_clean_error(pykvmm("run", str(p), "--mem", "32", "--initrd", str(big)), 2, "do not fit")
