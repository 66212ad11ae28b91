"""ACPI tables, written into the BIOS area as firmware (SeaBIOS under QEMU) leaves them.

RSDP (revision 2) at ACPI_BASE, in the 0xE0000-0xFFFFF range the OS scans; RSDT and XSDT
listing the FADT, the MADT; the FADT (revision 3) points at the FACS, the DSDT and the
ACPI PM registers of acpi_pm.py (PM1a event and control blocks, the PM timer); the DSDT
holds only the sleep-type packages (_S3 = SLP_TYP 1 and _S5 = 0, as QEMU's PIIX4); the
MADT lists one local APIC per vCPU, the IOAPIC, QEMU's interrupt source overrides (ISA IRQ0
to GSI 2; the PCI IRQs 5, 9, 10, 11 level-triggered, active high) and the LINT1 NMI. ACPI 6.5, chapter 5.
"""

from __future__ import annotations

import struct

from .acpi_pm import PM1_CNT, PM1_EVT, PM_BASE, PM_TMR

ACPI_BASE = 0xE0000
ACPI_END = 0x100000
ACPI_SIZE = 0x2000
IOAPIC_ADDR = 0xFEC00000
LAPIC_ADDR = 0xFEE00000
SCI_IRQ = 9
PIT_GSI = 2            # ISA IRQ0 (the PIT) arrives at IOAPIC pin 2, as on QEMU's pc machine
PCI_IRQS = (5, 9, 10, 11)   # QEMU's PCI interrupt lines: level-triggered, active high
ISO_ACTIVE_HIGH, ISO_LEVEL = 0x1, 0xC
OEM_ID = b"PYKVMM"
OEM_TABLE_ID = b"PYKVMMPC"

# where each table goes (offsets from ACPI_BASE; the FACS must be 64-byte aligned)
RSDP_OFF, RSDT_OFF, XSDT_OFF, FACS_OFF, FADT_OFF, DSDT_OFF, MADT_OFF = 0x0, 0x40, 0x80, 0xC0, 0x100, 0x200, 0x300

# DSDT body: Name(_S3_, Package(4){1, 1, 0, 0}); Name(_S5_, Package(4){0, 0, 0, 0})
SLP_TYP_S3, SLP_TYP_S5 = 1, 0
_DSDT_AML = (b"\x08_S3_\x12\x06\x04" + bytes([1, 1, 0, 0])) + (b"\x08_S5_\x12\x06\x04" + bytes([0, 0, 0, 0]))


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    length = 36 + len(body)
    head = struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1, b"PYKV", 1)
    raw = bytearray(head + body)
    raw[9] = checksum(raw)
    return bytes(raw)


def _gas_io(port: int, width_bits: int) -> bytes:
    """A Generic Address Structure for an I/O port register."""
    access = {8: 1, 16: 2, 32: 3}[width_bits]
    return struct.pack("<BBBBQ", 1, width_bits, 0, access, port)


def rsdp(rsdt: int, xsdt: int) -> bytes:
    first = bytearray(struct.pack("<8sB6sBI", b"RSD PTR ", 0, OEM_ID, 2, rsdt))
    first[8] = checksum(first)
    full = bytearray(bytes(first) + struct.pack("<IQB3x", 36, xsdt, 0))
    full[32] = checksum(full)
    return bytes(full)


def facs() -> bytes:
    # signature, length, hardware signature, waking vector, global lock, flags, X waking vector, version
    return struct.pack("<4sIIIIIQB3xI24x", b"FACS", 64, 0, 0, 0, 0, 0, 2, 0)


def fadt(facs_addr: int, dsdt_addr: int) -> bytes:
    body = bytearray(244 - 36)

    def put(fmt, off, *vals):
        struct.pack_into(fmt, body, off - 36, *vals)

    put("<II", 36, facs_addr, dsdt_addr)
    put("<BxH", 44, 0, SCI_IRQ)                     # preferred PM profile: unspecified
    put("<I", 48, 0)                                # no SMI command port: ACPI mode is always on
    put("<IIIIII", 56, PM_BASE + PM1_EVT, 0, PM_BASE + PM1_CNT, 0, 0, PM_BASE + PM_TMR)
    put("<BBBB", 88, 4, 2, 0, 4)                    # PM1 event 4 bytes, control 2, timer 4
    put("<HH", 96, 0xFFF, 0xFFF)                    # C2/C3 latency: not supported
    put("<BBB", 108, 0, 0, 0x32)                    # no day/month alarm; century in CMOS 0x32
    put("<H", 109, 0)                               # IA-PC boot flags (none)
    put("<I", 112, 1 << 0 | 1 << 4 | 1 << 5)        # WBINVD, PWR_BUTTON and SLP_BUTTON as control methods
    put("<B", 131, 0)
    put("<QQ", 132, facs_addr, dsdt_addr)
    put("<12s", 148, _gas_io(PM_BASE + PM1_EVT, 32))
    put("<12s", 172, _gas_io(PM_BASE + PM1_CNT, 16))
    put("<12s", 208, _gas_io(PM_BASE + PM_TMR, 32))
    return _table(b"FACP", 3, bytes(body))


def dsdt() -> bytes:
    return _table(b"DSDT", 1, _DSDT_AML)


def madt(vcpus: int, ioapic_id: int) -> bytes:
    body = struct.pack("<II", LAPIC_ADDR, 1)         # flags: PCAT_COMPAT (8259s present)
    for i in range(vcpus):
        body += struct.pack("<BBBBI", 0, 8, i, i, 1)  # processor local APIC, enabled
    body += struct.pack("<BBBBII", 1, 12, ioapic_id, 0, IOAPIC_ADDR, 0)
    # interrupt source overrides as QEMU's build_madt: IRQ0 -> GSI 2 (conforming), the PCI lines level/high
    body += struct.pack("<BBBBIH", 2, 10, 0, 0, PIT_GSI, 0)
    for irq in PCI_IRQS:
        body += struct.pack("<BBBBIH", 2, 10, 0, irq, irq, ISO_ACTIVE_HIGH | ISO_LEVEL)
    body += struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1)  # local APIC NMI on LINT1, all processors
    return _table(b"APIC", 1, body)


def build_tables(vcpus: int) -> bytes:
    """The whole ACPI area, to be written at ACPI_BASE."""
    base = ACPI_BASE
    area = bytearray(ACPI_SIZE)
    tables = {FACS_OFF: facs(), FADT_OFF: fadt(base + FACS_OFF, base + DSDT_OFF), DSDT_OFF: dsdt(),
              MADT_OFF: madt(vcpus, ioapic_id=0)}   # IOAPIC id 0, as QEMU's tables
    listed = [base + FADT_OFF, base + MADT_OFF]
    tables[RSDT_OFF] = _table(b"RSDT", 1, b"".join(struct.pack("<I", a) for a in listed))
    tables[XSDT_OFF] = _table(b"XSDT", 1, b"".join(struct.pack("<Q", a) for a in listed))
    tables[RSDP_OFF] = rsdp(base + RSDT_OFF, base + XSDT_OFF)
    offsets = sorted(tables)
    for off, nxt in zip(offsets, offsets[1:] + [ACPI_SIZE]):
        if off + len(tables[off]) > nxt:
            raise ValueError(f"ACPI table at {off:#x} ({len(tables[off])} bytes) runs into the next")
        area[off:off + len(tables[off])] = tables[off]
    return bytes(area)


FACS_ADDR = ACPI_BASE + FACS_OFF
FACS_WAKING_VECTOR = 12
