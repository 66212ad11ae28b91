"""The ACPI PM registers (fixed hardware, ACPI 6.5 chapter 4.8) at QEMU PIIX4's port 0x600.

PM1a event block (status, enable), PM1a control block (SCI_EN, SLP_TYP, SLP_EN) and the
24-bit PM timer counting at 3.579545 MHz from the host's monotonic clock. Writing SLP_EN
with SLP_TYP = S3 calls ``on_sleep`` (the platform suspends the machine and resumes it at
the FACS waking vector when a wake event such as the RTC alarm comes). Status bits are
write-one-to-clear; WAK_STS is set on resume.
"""

from __future__ import annotations

import threading
import time

from .bus import PortDevice

PM_BASE = 0x600
PM_PORTS = 0x40
PM1_EVT = 0x00          # PM1a_STS (2 bytes) then PM1a_EN (2 bytes)
PM1_CNT = 0x04
PM_TMR = 0x08
PM_TIMER_HZ = 3579545
PM_TIMER_MASK = 0xFFFFFF

STS_TMR, STS_PWRBTN, STS_RTC, STS_WAK = 1 << 0, 1 << 8, 1 << 10, 1 << 15
EN_RTC = 1 << 10
CNT_SCI_EN = 1 << 0
CNT_SLP_TYP_SHIFT = 10
CNT_SLP_TYP_MASK = 0x7 << CNT_SLP_TYP_SHIFT
CNT_SLP_EN = 1 << 13


class AcpiPm(PortDevice):
    name = "acpi-pm"

    def __init__(self, on_sleep, base: int = PM_BASE, clock=time.monotonic_ns):
        self.on_sleep = on_sleep          # callable(slp_typ)
        self.base = base
        self.clock = clock
        self._epoch = clock()
        self._lock = threading.Lock()
        self.status = 0
        self.enable = 0
        self.control = CNT_SCI_EN         # no SMI command port in the FADT: ACPI mode is on

    def timer(self) -> int:
        ticks = (self.clock() - self._epoch) * PM_TIMER_HZ // 1_000_000_000
        return ticks & PM_TIMER_MASK

    def attach_fast_path(self, table) -> bool:
        """Let the exit fast path (pykvmm/fastexit.py) answer 4-byte reads of the timer with
        this device's epoch, rate and mask: the same value timer() gives at the same instant.
        Only for the host's monotonic clock (CLOCK_MONOTONIC, which the C loop reads)."""
        if self.clock is not time.monotonic_ns:
            return False
        table.set_clock(self, self.base + PM_TMR, 4, self._epoch, PM_TIMER_HZ, PM_TIMER_MASK)
        return True

    def set_status(self, bits: int) -> None:
        with self._lock:
            self.status |= bits

    def _read_bytes(self, offset: int) -> int:
        if PM_TMR <= offset < PM_TMR + 4:
            return self.timer() >> (8 * (offset - PM_TMR)) & 0xFF
        with self._lock:
            regs = self.status | self.enable << 16 | (self.control & ~CNT_SLP_EN) << 32
        return regs >> (8 * offset) & 0xFF if offset < 6 else 0

    def io_read(self, port: int, size: int) -> int:
        offset = port - self.base
        if offset == PM_TMR and size == 4:
            return self.timer()
        return sum(self._read_bytes(offset + i) << (8 * i) for i in range(size))

    def io_write(self, port: int, size: int, value: int) -> None:
        offset = port - self.base
        sleep_type = None
        with self._lock:
            for i in range(size):
                byte, at = value >> (8 * i) & 0xFF, offset + i
                if at < 2:                                   # status: write one to clear
                    self.status &= ~(byte << (8 * at))
                elif at < 4:
                    shift = 8 * (at - 2)
                    self.enable = self.enable & ~(0xFF << shift) | byte << shift
                elif at < 6:
                    shift = 8 * (at - 4)
                    self.control = self.control & ~(0xFF << shift) | byte << shift
            self.control |= CNT_SCI_EN               # no SMI_CMD: the system is always in ACPI mode
            if self.control & CNT_SLP_EN:
                self.control &= ~CNT_SLP_EN                  # SLP_EN is write-only
                sleep_type = (self.control & CNT_SLP_TYP_MASK) >> CNT_SLP_TYP_SHIFT
        if sleep_type is not None:
            self.on_sleep(sleep_type)
