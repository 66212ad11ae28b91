"""QEMU's fw_cfg over port I/O (the legacy interface, no DMA): selector 0x510, data 0x511.

A 16-bit write to the selector picks an item and rewinds its read offset; each byte read
from the data port returns the next byte of the item, 0 past its end or for an unknown
item. Integers are little-endian, as QEMU stores them. The items are those a multiboot
guest reads (kvm-unit-tests' lib/x86/fwcfg.c): signature, interface id, RAM size, CPU
counts, and an empty file directory.
"""

from __future__ import annotations

import struct
import threading

from .bus import PortDevice

FW_CFG_PORT_SEL = 0x510
FW_CFG_PORT_DATA = 0x511
FW_CFG_PORTS = 2

FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_MACHINE_ID = 0x06
FW_CFG_BOOT_MENU = 0x0E
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_FILE_DIR = 0x19
FW_CFG_WRITE_CHANNEL = 0x4000  # a selector flag, not part of the item number
FW_CFG_ARCH_LOCAL = 0x8000     # arch-local items are their own namespace (none offered here)
FW_CFG_ID_TRADITIONAL = 1    # bit 0: the port interface; bit 1 (DMA) is not offered


class FwCfg(PortDevice):
    name = "fw_cfg"

    def __init__(self, *, ram_size: int, cpus: int, max_cpus: int | None = None):
        self._lock = threading.Lock()
        self.items: dict[int, bytes] = {
            FW_CFG_SIGNATURE: b"QEMU",
            FW_CFG_ID: struct.pack("<I", FW_CFG_ID_TRADITIONAL),
            FW_CFG_UUID: bytes(16),
            FW_CFG_RAM_SIZE: struct.pack("<Q", ram_size),
            FW_CFG_NOGRAPHIC: struct.pack("<H", 1),
            FW_CFG_NB_CPUS: struct.pack("<H", cpus),
            FW_CFG_MACHINE_ID: struct.pack("<I", 0),
            FW_CFG_BOOT_MENU: struct.pack("<H", 0),
            FW_CFG_MAX_CPUS: struct.pack("<H", max_cpus or cpus),
            FW_CFG_FILE_DIR: struct.pack(">I", 0),
        }
        self.selected = FW_CFG_SIGNATURE
        self.offset = 0

    def select(self, key: int) -> None:
        with self._lock:
            self.selected, self.offset = key, 0

    def io_write(self, port: int, size: int, value: int) -> None:
        if port == FW_CFG_PORT_SEL:
            self.select(value & 0xFFFF)
        # writes to the data port are ignored (QEMU 2.4+ treats all items as read-only)

    def io_read(self, port: int, size: int) -> int:
        if port != FW_CFG_PORT_DATA:
            return 0
        with self._lock:
            data = self.items.get(self.selected & ~FW_CFG_WRITE_CHANNEL, b"")
            out = 0
            for i in range(size):     # a wider read returns consecutive bytes, as QEMU does
                byte = data[self.offset] if self.offset < len(data) else 0
                if self.offset < len(data):
                    self.offset += 1
                out |= byte << (8 * i)
            return out
