"""PCI bus 0 behind configuration mechanism #1 (ports 0xcf8 address, 0xcfc-0xcff data), as
QEMU's i440FX `pc` machine shows it to a guest after SeaBIOS ran.

The guest writes a dword to CONFIG_ADDRESS (bit 31 enable, bus, device/function, register)
and then reads or writes 1, 2 or 4 bytes at CONFIG_DATA + (register & 3). As in QEMU (and
unlike the specification, which reserves them), the address register keeps its two low bits
and they are ORed into the offset: kvm-unit-tests writes the register's full offset there and
reads CONFIG_DATA itself. Only bus 0 exists;
a function that is not there reads all ones and ignores writes, as on real hardware.

Each function has a 256-byte configuration space with a mask of the bits the guest may
write (PCI Local Bus 3.0, chapter 6). Base address registers follow the specification's
sizing protocol (write all ones, read back the size mask) and are decoded only while the
command register enables I/O or memory space and the address is neither 0 nor runs past
the 64 KiB port space or 4 GiB (QEMU's rule, which also keeps a BAR unmapped while it holds the sizing pattern).
A decoded BAR is registered on the machine's port or MMIO bus, so its accesses reach the
function through the same O(1) dispatch as every other device; a BAR the guest moves onto
another device's addresses stays unmapped. The firmware's work (SeaBIOS assigning BARs and
enabling decoding) is done at reset: each function starts with its BARs at the addresses
QEMU's guests see and decoding on.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .bus import BusConflict, MmioBus, MmioDevice, PortBus, PortDevice

CONFIG_ADDRESS = 0xCF8
CONFIG_DATA = 0xCFC
CONFIG_PORTS = 4
CONFIG_ENABLE = 1 << 31

# configuration space header (type 0)
VENDOR_ID, DEVICE_ID, COMMAND, STATUS = 0x00, 0x02, 0x04, 0x06
REVISION, CLASS_PROG, HEADER_TYPE = 0x08, 0x09, 0x0E
BAR0, SUBSYSTEM_VENDOR_ID, SUBSYSTEM_ID = 0x10, 0x2C, 0x2E
CAPABILITY_LIST, INTERRUPT_LINE, INTERRUPT_PIN = 0x34, 0x3C, 0x3D
BAR_COUNT = 6
CMD_IO, CMD_MEMORY, CMD_MASTER, CMD_SERR, CMD_INTX_DISABLE = 0x1, 0x2, 0x4, 0x100, 0x400
HEADER_MULTIFUNCTION = 0x80
BAR_IO = 0x1
PORT_SPACE = 0x10000
ADDRESS_SPACE_32 = 1 << 32

# QEMU's subsystem ids for its own devices (hw/pci/pci.c)
QEMU_SUBSYSTEM_VENDOR, QEMU_SUBSYSTEM = 0x1AF4, 0x1100


def devfn(device: int, function: int = 0) -> int:
    return device << 3 | function


@dataclass
class Bar:
    """One base address register: its size (a power of two) and space; ``address`` is where
    it is decoded now (None: not decoded)."""
    index: int
    size: int
    io: bool
    address: int | None = None


class PciFunction:
    """One function's configuration space. Subclasses add BARs (``add_bar``) and answer
    their accesses in ``bar_read`` / ``bar_write`` (offset from the BAR's start)."""

    name = "pci-function"

    def __init__(self, vendor: int, device: int, class_code: int, *, revision: int = 0,
                 header_type: int = 0, subsystem: tuple[int, int] | None = None):
        self.config = bytearray(256)
        self.wmask = bytearray(256)
        self.bars: list[Bar] = []
        struct.pack_into("<HH", self.config, VENDOR_ID, vendor, device)
        struct.pack_into("<I", self.config, REVISION, revision | class_code << 8)
        self.config[HEADER_TYPE] = header_type
        if subsystem is not None:
            struct.pack_into("<HH", self.config, SUBSYSTEM_VENDOR_ID, *subsystem)
        struct.pack_into("<H", self.wmask, COMMAND,
                         CMD_IO | CMD_MEMORY | CMD_MASTER | CMD_SERR | CMD_INTX_DISABLE)
        self.wmask[INTERRUPT_LINE] = 0xFF

    def add_bar(self, index: int, size: int, io: bool, address: int) -> Bar:
        """A BAR of ``size`` bytes (a power of two), assigned ``address`` as the firmware would."""
        if size & (size - 1) or size < (4 if io else 16) or address % size:
            raise ValueError(f"BAR{index}: size {size:#x} at {address:#x} is not a naturally aligned power of two")
        bar = Bar(index, size, io)
        self.bars.append(bar)
        mask = ~(size - 1) & 0xFFFFFFFF
        struct.pack_into("<I", self.wmask, BAR0 + 4 * index, mask)
        struct.pack_into("<I", self.config, BAR0 + 4 * index, address | (BAR_IO if io else 0))
        return bar

    def command(self) -> int:
        return struct.unpack_from("<H", self.config, COMMAND)[0]

    def bar_base(self, bar: Bar) -> int | None:
        """Where ``bar`` decodes now, or None (decoding off, address 0, or wrapping)."""
        raw = struct.unpack_from("<I", self.config, BAR0 + 4 * bar.index)[0]
        base = raw & ~(bar.size - 1) & 0xFFFFFFFF
        last = base + bar.size - 1
        if not self.command() & (CMD_IO if bar.io else CMD_MEMORY):
            return None
        if base == 0 or (last >= PORT_SPACE if bar.io else last >= ADDRESS_SPACE_32 - 1):
            return None
        return base

    def read_config(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset:offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            at = offset + i
            if at >= len(self.config):
                break
            byte, mask = value >> (8 * i) & 0xFF, self.wmask[at]
            self.config[at] = self.config[at] & ~mask | byte & mask

    def bar_read(self, bar: Bar, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def bar_write(self, bar: Bar, offset: int, size: int, value: int) -> None:
        pass

    def bars_moved(self) -> None:
        """Called after a BAR started or stopped decoding or moved (``Bar.address``)."""


class _IoWindow(PortDevice):
    """A decoded I/O BAR on the port bus."""

    def __init__(self, function: PciFunction, bar: Bar, base: int):
        self.function, self.bar, self.base = function, bar, base
        self.name = f"{function.name} BAR{bar.index}"

    def io_read(self, port: int, size: int) -> int:
        return self.function.bar_read(self.bar, port - self.base, size)

    def io_write(self, port: int, size: int, value: int) -> None:
        self.function.bar_write(self.bar, port - self.base, size, value)


class _MmioWindow(MmioDevice):
    """A decoded memory BAR on the MMIO bus."""

    def __init__(self, function: PciFunction, bar: Bar):
        self.function, self.bar = function, bar
        self.name = f"{function.name} BAR{bar.index}"

    def mmio_read(self, offset: int, size: int) -> int:
        return self.function.bar_read(self.bar, offset, size)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        self.function.bar_write(self.bar, offset, size, value)


class PciBus(PortDevice):
    """Bus 0 and the configuration ports; ``ports``/``mmio`` are where decoded BARs go."""

    name = "pci-config"

    def __init__(self, ports: PortBus, mmio: MmioBus, warn=None):
        self.ports, self.mmio = ports, mmio
        self.warn = warn or (lambda msg: None)
        self.functions: dict[int, PciFunction] = {}
        self._windows: dict[tuple[int, int], tuple[int, object]] = {}   # (devfn, bar) -> (base, window)
        self.address = 0

    def attach(self, slot: int, function: PciFunction) -> None:
        """Put ``function`` at devfn ``slot`` on bus 0 and decode its BARs."""
        if slot in self.functions:
            raise BusConflict(f"PCI 00:{slot >> 3:02x}.{slot & 7} is taken by {self.functions[slot].name}")
        self.functions[slot] = function
        self._remap(slot, function)

    def register_ports(self) -> None:
        self.ports.register(CONFIG_ADDRESS, CONFIG_PORTS, self)
        self.ports.register(CONFIG_DATA, CONFIG_PORTS, self)

    # -- configuration mechanism #1 -------------------------------------------------------
    def _target(self, port: int) -> tuple[PciFunction | None, int]:
        a = self.address
        if not a & CONFIG_ENABLE or (a >> 16) & 0xFF != 0:
            return None, 0
        return self.functions.get((a >> 8) & 0xFF), (a & 0xFF) | (port & 3)

    def io_read(self, port: int, size: int) -> int:
        if port < CONFIG_DATA:
            return self.address >> (8 * (port - CONFIG_ADDRESS)) & ((1 << (8 * size)) - 1)
        function, offset = self._target(port)
        if function is None:
            return (1 << (8 * size)) - 1
        return function.read_config(offset, size)

    def io_write(self, port: int, size: int, value: int) -> None:
        if port < CONFIG_DATA:
            if port == CONFIG_ADDRESS and size == 4:     # other widths are not the address register
                self.address = value
            return
        function, offset = self._target(port)
        if function is None:
            return
        function.write_config(offset, size, value)
        if offset < BAR0 + 4 * BAR_COUNT and offset + size > COMMAND:
            self._remap((self.address >> 8) & 0xFF, function)

    # -- BAR decoding -------------------------------------------------------------------
    def _remap(self, slot: int, function: PciFunction) -> None:
        moved = False
        for bar in function.bars:
            base = function.bar_base(bar)
            key = (slot, bar.index)
            old = self._windows.get(key)
            if (old[0] if old is not None else None) == base:
                continue
            moved = True
            if old is not None:
                if bar.io:
                    self.ports.unregister(old[0], bar.size, old[1])
                else:
                    self.mmio.unregister(old[0], bar.size, old[1])
                del self._windows[key]
                bar.address = None
            if base is None:
                continue
            window = _IoWindow(function, bar, base) if bar.io else _MmioWindow(function, bar)
            try:
                if bar.io:
                    self.ports.register(base, bar.size, window)
                else:
                    self.mmio.register(base, bar.size, window)
            except BusConflict as e:
                self.warn(f"PCI {function.name} BAR{bar.index} at {base:#x} not decoded: {e}")
                continue
            self._windows[key] = (base, window)
            bar.address = base
        if moved:
            function.bars_moved()


# ---- the functions of QEMU's pc machine that every guest finds -----------------------------
class I440fxHost(PciFunction):
    """00:00.0, the i440FX host bridge (its PAM/SMRAM registers are not modelled: read-only)."""

    name = "i440fx"

    def __init__(self):
        super().__init__(0x8086, 0x1237, 0x060000, revision=2, subsystem=(QEMU_SUBSYSTEM_VENDOR, QEMU_SUBSYSTEM))


class Piix3Isa(PciFunction):
    """00:01.0, the PIIX3 PCI-to-ISA bridge (multi-function; its IDE and PM functions are not
    on the bus: the ACPI PM registers are at their fixed port, see acpi_pm.py)."""

    name = "piix3-isa"

    def __init__(self):
        super().__init__(0x8086, 0x7000, 0x060100, header_type=HEADER_MULTIFUNCTION,
                         subsystem=(QEMU_SUBSYSTEM_VENDOR, QEMU_SUBSYSTEM))
        self.config[0x60:0x64] = bytes([0x80] * 4)       # PIRQA-D routing: disabled (read-only here)
