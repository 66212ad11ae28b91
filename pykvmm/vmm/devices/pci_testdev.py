"""QEMU's pci-testdev (hw/misc/pci-testdev.c): the device kvm-unit-tests' vmexit test times
MMIO and port writes against (its pci-mem and pci-io rows).

Red Hat's vendor id 0x1b36, device 0x0005, class "other" (0xff). BAR0 is 4 KiB of memory,
BAR1 256 I/O ports; both windows hold the same register file, one accessed byte by byte:

    offset 0   test    u8   writing N selects test N of this window (N >= 3: none)
           1   width   u8   the access width the test counts (1)
           4   offset  u32  where in the window the test's writes go
           8   data    u8   the value a write must carry (0xFA "datamatch", else 0xCE)
          12   count   u32  writes seen at ``offset`` since the test was selected
          16   name    the test's name, NUL-terminated

The tests of each window are "no-eventfd", "wildcard-eventfd" (any value counts) and
"datamatch-eventfd" (only ``data`` counts); their name is "<mmio|portio>-<test>" and their
``offset`` is the window's half size plus the test's global index (0-2 memory, 3-5 I/O).
Reads with no test selected, and reads at or past the name's terminator, return 0.

As in QEMU, selecting an eventfd test hands its writes to a KVM ioeventfd (``ioeventfd``, set
by the platform to the device VM's Vm.ioeventfd; datamatch for "datamatch-eventfd"): KVM
signals the eventfd without leaving the kernel and nothing counts them (a read of the
window clears the eventfd, as QEMU's does). Without ``ioeventfd`` (pure-logic tests) or
while the window is not decoded, those writes come to bar_write and count like the first
test's. A BAR the guest moves takes the armed ioeventfd with it.
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading

from .pci import CMD_IO, CMD_MEMORY, COMMAND, QEMU_SUBSYSTEM, QEMU_SUBSYSTEM_VENDOR, Bar, PciFunction

VENDOR_REDHAT, DEVICE_TEST = 0x1B36, 0x0005
CLASS_OTHER = 0xFF0000
MEM_SIZE, IO_SIZE = 0x1000, 0x100
# where SeaBIOS puts them with QEMU's `-nodefaults -device pci-testdev` (seen in vmexit's output)
MEM_ADDR, IO_ADDR = 0xFEBFF000, 0xC000
SLOT = 2 << 3                         # 00:02.0

TESTS = ("no-eventfd", "wildcard-eventfd", "datamatch-eventfd")
DATAMATCH, NOMATCH = 0xFA, 0xCE
HDR_TEST, HDR_WIDTH, HDR_OFFSET, HDR_DATA, HDR_COUNT, HDR_NAME = 0, 1, 4, 8, 12, 16


class _Test:
    def __init__(self, index: int, io: bool, counts):
        self.index, self._counts = index, counts        # counts: the device's uint32 cells
        kind = TESTS[index % len(TESTS)]
        name = f"{'portio' if io else 'mmio'}-{kind}".encode() + b"\0"
        self.match_data = kind != "wildcard-eventfd"
        self.uses_eventfd = kind != "no-eventfd"
        self.io = io
        self.offset = (IO_SIZE if io else MEM_SIZE) // 2 + index
        self.data = DATAMATCH if self.match_data else NOMATCH
        self.header = bytearray(HDR_NAME + len(name))
        self.header[HDR_NAME:] = name
        self.header[HDR_WIDTH] = 1

    @property
    def count(self) -> int:
        return self._counts[self.index]

    @count.setter
    def count(self, value: int) -> None:
        self._counts[self.index] = value

    def snapshot(self) -> bytes:
        struct.pack_into("<IBxxxI", self.header, HDR_OFFSET, self.offset, self.data, self.count)
        return bytes(self.header)


class PciTestDev(PciFunction):
    name = "pci-testdev"

    def __init__(self, mem_addr: int = MEM_ADDR, io_addr: int = IO_ADDR):
        super().__init__(VENDOR_REDHAT, DEVICE_TEST, CLASS_OTHER,
                         subsystem=(QEMU_SUBSYSTEM_VENDOR, QEMU_SUBSYSTEM))
        self.mem_bar = self.add_bar(0, MEM_SIZE, io=False, address=mem_addr)
        self.io_bar = self.add_bar(1, IO_SIZE, io=True, address=io_addr)
        struct.pack_into("<H", self.config, COMMAND, CMD_IO | CMD_MEMORY)   # as the firmware left it
        # The counts live in C memory: the exit fast path (pykvmm/fastexit.py) counts the
        # test register's byte writes there without Python (attach_fast_path)
        self._counts = (ctypes.c_uint32 * (2 * len(TESTS)))()
        self.tests = [_Test(i, io=i >= len(TESTS), counts=self._counts) for i in range(2 * len(TESTS))]
        self.current: _Test | None = None
        self._lock = threading.Lock()
        self.ioeventfd = None           # Vm.ioeventfd of the device's VM (see the docstring)
        self._armed = None              # (eventfd, pio, address, datamatch) registered with KVM
        self._fast = None               # the fast path's FastTable, or None

    def close(self) -> None:
        with self._lock:
            self._disarm()

    def bar_read(self, bar: Bar, offset: int, size: int) -> int:
        with self._lock:
            test = self.current
            if test is None:
                return 0
            if self._armed is not None:
                try:
                    os.eventfd_read(self._armed[0])
                except BlockingIOError:
                    pass
            buf = test.snapshot()
        # byte by byte, as QEMU's 1-byte implementation: bytes at or past the terminator read 0
        return sum((buf[offset + i] if offset + i + 1 < len(buf) else 0) << (8 * i) for i in range(size))

    def bar_write(self, bar: Bar, offset: int, size: int, value: int) -> None:
        io = bar is self.io_bar
        with self._lock:
            if size == 1:                  # what vmexit's pci rows time: kept short
                self._write_byte(io, offset, value & 0xFF)
                return
            for i in range(size):          # QEMU splits wider accesses into byte writes
                self._write_byte(io, offset + i, value >> (8 * i) & 0xFF)

    def bars_moved(self) -> None:
        with self._lock:
            self._disarm()
            self._arm()
            self._fast_rules()

    def attach_fast_path(self, table) -> None:
        """Let the exit fast path count the current test's writes (``table``: a FastTable)."""
        with self._lock:
            self._fast = table
            self._fast_rules()

    def _fast_rules(self) -> None:
        """The fast path's rules for the current test, one per decoded window the test register
        falls in (bar_write counts it through either window, as here). Lock held."""
        table, test = self._fast, self.current
        if table is None:
            return
        for bar in (self.mem_bar, self.io_bar):
            key = (self, bar.index)
            if test is None or bar.address is None or test.offset >= bar.size:
                table.clear(key)
            else:
                table.set_counter(key, bar.io, bar.address + test.offset, self._count_address(test),
                                  test.data if test.match_data else None)

    def _count_address(self, test: _Test) -> int:
        return ctypes.addressof(self._counts) + test.index * ctypes.sizeof(ctypes.c_uint32)

    def _write_byte(self, io: bool, offset: int, byte: int) -> None:
        if offset == HDR_TEST:
            self._disarm()
            self.current = self.tests[(len(TESTS) if io else 0) + byte] if byte < len(TESTS) else None
            if self.current is not None:
                self.current.count = 0
                self._arm()
            self._fast_rules()
            return
        test = self.current
        if test is None or offset != test.offset:
            return
        if test.match_data and byte != test.data:
            return
        if self._fast is not None:      # atomic, as the C loop's count on another vCPU
            self._fast.count_add(self._count_address(test))
        else:
            test.count += 1

    # -- ioeventfds (called with the lock held) ---------------------------------------------
    def _arm(self) -> None:
        test = self.current
        base = (self.io_bar if test is not None and test.io else self.mem_bar).address
        if test is None or not test.uses_eventfd or self.ioeventfd is None or base is None:
            return
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        datamatch = test.data if test.match_data else None
        try:
            self.ioeventfd(fd, base + test.offset, 1, pio=test.io, datamatch=datamatch)
        except BaseException:
            os.close(fd)
            raise
        self._armed = (fd, test.io, base + test.offset, datamatch)

    def _disarm(self) -> None:
        if self._armed is None:
            return
        fd, pio, addr, datamatch = self._armed
        self._armed = None
        try:
            self.ioeventfd(fd, addr, 1, pio=pio, datamatch=datamatch, deassign=True)
        finally:
            os.close(fd)
