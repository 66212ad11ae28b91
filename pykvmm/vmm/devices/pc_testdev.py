"""QEMU's pc-testdev (hw/misc/pc-testdev.c), the test device kvm-unit-tests drives.

- 0xe0-0xe3: a 32-bit register that reads back what was written (any width);
- 0xe4-0xe7: "flush page": a write names a guest page whose mappings QEMU drops and
  restores; pykvmm's memory has no host-side mapping to drop, so the write is accepted;
- 0x2000-0x2017: one port per ISA/GSI line: writing a byte drives that line to the value
  (the in-kernel PIC and IOAPIC see it through KVM_IRQ_LINE);
- MMIO 0xff000000-0xff000fff: memory that reads back what was written ("iomem").

QEMU also has a byte register at 0xe8; pykvmm keeps 0xe8-0xeb for its own test ABI (ucall,
console, hypercall, null port), which no kvm-unit-test uses.
"""

from __future__ import annotations

import threading

from .bus import MmioDevice, PortDevice

IOPORT = 0xE0
IOPORT_SIZE = 4
FLUSHPAGE = 0xE4
FLUSHPAGE_SIZE = 4
IRQ_PORT = 0x2000
IRQ_LINES = 24
IOMEM_ADDR = 0xFF000000
IOMEM_SIZE = 0x1000


class PcTestDev(PortDevice, MmioDevice):
    name = "pc-testdev"

    def __init__(self, irq_line):
        self.irq_line = irq_line            # callable(irq, level)
        self._lock = threading.Lock()
        self.ioport = bytearray(IOPORT_SIZE)
        self.iomem = bytearray(IOMEM_SIZE)
        self.flushed = 0                    # pages named by flush-page writes

    def io_read(self, port: int, size: int) -> int:
        if IOPORT <= port < IOPORT + IOPORT_SIZE:
            off = port - IOPORT
            with self._lock:
                return int.from_bytes(self.ioport[off:off + size].ljust(size, b"\0"), "little")
        return 0

    def io_write(self, port: int, size: int, value: int) -> None:
        if IOPORT <= port < IOPORT + IOPORT_SIZE:
            off = port - IOPORT
            n = min(size, IOPORT_SIZE - off)
            with self._lock:
                self.ioport[off:off + n] = value.to_bytes(size, "little")[:n]
        elif FLUSHPAGE <= port < FLUSHPAGE + FLUSHPAGE_SIZE:
            self.flushed += 1
        elif IRQ_PORT <= port < IRQ_PORT + IRQ_LINES:
            self.irq_line(port - IRQ_PORT, value & 0xFF)

    def mmio_read(self, offset: int, size: int) -> int:
        with self._lock:
            return int.from_bytes(self.iomem[offset:offset + size], "little")

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            self.iomem[offset:offset + size] = value.to_bytes(size, "little")
