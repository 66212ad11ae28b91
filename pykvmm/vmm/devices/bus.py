"""The port-I/O and MMIO buses: O(1) dispatch from an address to the device that owns it.

Ports are looked up in a dict with one key per port. MMIO ranges are looked up by 4 KiB
page, then among the (few) ranges sharing that page, so a lookup never walks every device.
"""

from __future__ import annotations

from ...fastexit import ABSENT_READ, ABSENT_WRITE   # the bits of ``PortBus.absent``

PAGE_SHIFT = 12


class BusConflict(ValueError):
    """Two devices claim the same port or MMIO address."""


class PortDevice:
    """A device on the port bus. ``port`` is the absolute port; ``size`` is 1, 2 or 4."""

    name = "device"

    def io_read(self, port: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def io_write(self, port: int, size: int, value: int) -> None:
        pass


class MmioDevice:
    """A device on the MMIO bus; ``offset`` is from the start of its range."""

    name = "device"

    def mmio_read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        pass


class PortBus:
    """``absent``: where the exit fast path (pykvmm/fastexit.py) is on, its per-port bytes:
    a port marked there is answered in C as an unowned port is here (reads all ones, writes
    dropped). The vCPU thread marks a port after answering it so once; claiming it unmarks it."""

    def __init__(self):
        self._ports: dict[int, PortDevice] = {}
        # owner(port) -> the device or None: the dict's own get (the per-exit lookup, no
        # Python frame); the dict is only ever changed in place, so this stays valid
        self.owner = self._ports.get
        self.absent = None

    def mark_absent(self, port: int, bit: int) -> None:
        """``port`` has no owner: the fast path may answer its reads (ABSENT_READ) or writes
        (ABSENT_WRITE) from now on. Marked, then checked again: a register() racing on another
        thread either sees the mark (and clears it) or is seen here."""
        absent = self.absent
        if absent is None:
            return
        absent[port] |= bit
        if port in self._ports:
            absent[port] = 0

    def unmark_absent(self, port: int, bit: int = ABSENT_READ | ABSENT_WRITE) -> None:
        """Something now answers ``port`` (a device, or a vCPU thread's port handler for writes)."""
        if self.absent is not None:
            self.absent[port] &= ~bit

    def register(self, base: int, count: int, device: PortDevice) -> None:
        if base < 0 or count <= 0 or base + count > 0x10000:
            raise ValueError(f"ports {base:#x}+{count} are outside the 64 KiB port space")
        for port in range(base, base + count):
            if port in self._ports:
                raise BusConflict(f"port {port:#x} is claimed by {self._ports[port].name} and {device.name}")
        for port in range(base, base + count):
            self._ports[port] = device
            self.unmark_absent(port)

    def unregister(self, base: int, count: int, device: PortDevice) -> None:
        """Remove ``device`` from the ports it holds in base..base+count (a PCI BAR moving)."""
        for port in range(base, base + count):
            if self._ports.get(port) is device:
                del self._ports[port]


    def read(self, port: int, size: int) -> int | None:
        """The value an IN of ``size`` bytes reads, or None when no device owns the port."""
        dev = self._ports.get(port)
        return None if dev is None else dev.io_read(port, size)

    def write(self, port: int, size: int, value: int) -> bool:
        """Give an OUT to its device; False when no device owns the port."""
        dev = self._ports.get(port)
        if dev is None:
            return False
        dev.io_write(port, size, value)
        return True


class MmioBus:
    def __init__(self):
        self._pages: dict[int, list[tuple[int, int, MmioDevice]]] = {}

    def register(self, base: int, length: int, device: MmioDevice) -> None:
        if length <= 0:
            raise ValueError("an MMIO range needs a positive length")
        pages = range(base >> PAGE_SHIFT, ((base + length - 1) >> PAGE_SHIFT) + 1)
        for page in pages:
            for start, end, other in self._pages.get(page, ()):
                if start < base + length and base < end:
                    raise BusConflict(f"MMIO {base:#x}+{length:#x} ({device.name}) overlaps {other.name}")
        entry = (base, base + length, device)
        for page in pages:
            self._pages.setdefault(page, []).append(entry)

    def unregister(self, base: int, length: int, device: MmioDevice) -> None:
        """Remove the range ``device`` registered at ``base`` (a PCI BAR moving)."""
        for page in range(base >> PAGE_SHIFT, ((base + length - 1) >> PAGE_SHIFT) + 1):
            kept = [e for e in self._pages.get(page, ()) if not (e[0] == base and e[2] is device)]
            if kept:
                self._pages[page] = kept
            else:
                self._pages.pop(page, None)

    def find(self, addr: int, size: int) -> tuple[int, MmioDevice] | None:
        """(offset, device) for an access of ``size`` bytes at ``addr``, or None."""
        for start, end, dev in self._pages.get(addr >> PAGE_SHIFT, ()):
            if start <= addr and addr + size <= end:
                return addr - start, dev
        return None

    def read(self, addr: int, size: int) -> int | None:
        hit = self.find(addr, size)
        return None if hit is None else hit[1].mmio_read(hit[0], size)

    def write(self, addr: int, size: int, value: int) -> bool:
        hit = self.find(addr, size)
        if hit is None:
            return False
        hit[1].mmio_write(hit[0], size, value)
        return True
