"""The MC146818 RTC and CMOS RAM at ports 0x70 (index; bit 7 masks NMI) and 0x71 (data).

Time comes from the host's clock (UTC) plus an offset the guest sets by writing the time
registers; registers are BCD unless register B's DM bit says binary, 24-hour when B's 24/12
bit is set (the reset value, as QEMU). Update-in-progress (register A bit 7) follows the
datasheet: set 244 us before each second's update and for the 1984 us the update lasts.
The alarm (registers 1, 3, 5; 0xC0-0xFF = any) sets AF in register C at the matching
second, with IRQF when AIE is on; ``next_alarm`` tells the platform when it will fire (the
S3 wake-up). The CMOS RAM carries the memory sizes and CPU count as SeaBIOS leaves them.
"""

from __future__ import annotations

import calendar
import threading
import time

from .bus import PortDevice

RTC_PORT = 0x70
RTC_PORTS = 2
SEC, SEC_ALARM, MIN, MIN_ALARM, HOUR, HOUR_ALARM, WEEKDAY, DAY, MONTH, YEAR = range(10)
REG_A, REG_B, REG_C, REG_D = 10, 11, 12, 13
CENTURY = 0x32
A_UIP = 0x80
B_SET, B_PIE, B_AIE, B_UIE, B_DM_BINARY, B_24H = 0x80, 0x40, 0x20, 0x10, 0x04, 0x02
C_IRQF, C_PF, C_AF, C_UF = 0x80, 0x40, 0x20, 0x10
D_VRT = 0x80
ALARM_ANY = 0xC0
UIP_BEFORE, UIP_AFTER = 244e-6, 1984e-6


class Rtc(PortDevice):
    name = "rtc-cmos"

    def __init__(self, *, mem_size: int = 0, cpus: int = 1, clock=time.time):
        self.clock = clock
        self._lock = threading.Lock()
        self.index = 0
        self.offset = 0.0                   # guest time minus host time, seconds
        self.cmos = bytearray(128)
        self.cmos[REG_A], self.cmos[REG_B], self.cmos[REG_D] = 0x26, B_24H, D_VRT
        self._set_memory(mem_size, cpus)
        self._checked = int(self.now())     # the last whole second the alarm was checked for

    def _set_memory(self, mem_size: int, cpus: int) -> None:
        c = self.cmos
        c[0x15], c[0x16] = 640 & 0xFF, 640 >> 8                       # base memory, KiB
        ext = min(max(mem_size - (1 << 20), 0) >> 10, 0xFFFF)        # 1 MiB..64 MiB, KiB
        c[0x17], c[0x18] = ext & 0xFF, ext >> 8
        c[0x30], c[0x31] = ext & 0xFF, ext >> 8
        above16 = min(max(mem_size - (16 << 20), 0) >> 16, 0xFFFF)  # 16 MiB..4 GiB, 64 KiB units
        c[0x34], c[0x35] = above16 & 0xFF, above16 >> 8
        c[0x5F] = max(cpus - 1, 0)

    def now(self) -> float:
        return self.clock() + self.offset

    # -- encoding -------------------------------------------------------------------------
    def _enc(self, v: int) -> int:
        return v if self.cmos[REG_B] & B_DM_BINARY else (v // 10) << 4 | v % 10

    def _dec(self, v: int) -> int:
        return v if self.cmos[REG_B] & B_DM_BINARY else (v >> 4) * 10 + (v & 0xF)

    def _hour_enc(self, h: int) -> int:
        if self.cmos[REG_B] & B_24H:
            return self._enc(h)
        pm = 0x80 if h >= 12 else 0
        return self._enc(h % 12 or 12) | pm

    def _time_reg(self, reg: int, t: time.struct_time) -> int:
        return {SEC: self._enc(t.tm_sec), MIN: self._enc(t.tm_min), HOUR: self._hour_enc(t.tm_hour),
                WEEKDAY: self._enc((t.tm_wday + 1) % 7 + 1), DAY: self._enc(t.tm_mday),
                MONTH: self._enc(t.tm_mon), YEAR: self._enc(t.tm_year % 100),
                CENTURY: self._enc(t.tm_year // 100)}[reg]

    # -- alarm ----------------------------------------------------------------------------
    def _alarm_matches(self, t: time.struct_time) -> bool:
        c = self.cmos
        for reg, now in ((SEC_ALARM, self._time_reg(SEC, t)), (MIN_ALARM, self._time_reg(MIN, t)),
                         (HOUR_ALARM, self._time_reg(HOUR, t))):
            if c[reg] & ALARM_ANY != ALARM_ANY and c[reg] != now:
                return False
        return True

    def _update_flags(self) -> None:
        """Alarm check for every second boundary passed since the last look (lazy)."""
        sec = int(self.now())
        if sec <= self._checked:
            return
        for s in range(max(self._checked + 1, sec - 86400), sec + 1):
            if self._alarm_matches(time.gmtime(s)):
                self.cmos[REG_C] |= C_AF
            self.cmos[REG_C] |= C_UF
        self._checked = sec
        c = self.cmos
        if (c[REG_C] & C_AF and c[REG_B] & B_AIE) or (c[REG_C] & C_UF and c[REG_B] & B_UIE):
            c[REG_C] |= C_IRQF

    def next_alarm(self, within: float = 86400.0) -> float | None:
        """Host time (self.clock) of the next alarm with AIE on, or None."""
        with self._lock:
            if not self.cmos[REG_B] & B_AIE:
                return None
            start = int(self.now()) + 1
            for s in range(start, start + int(within)):
                if self._alarm_matches(time.gmtime(s)):
                    return s - self.offset
        return None

    def acknowledge_alarm(self) -> None:
        with self._lock:
            self._update_flags()

    # -- ports ----------------------------------------------------------------------------
    def io_read(self, port: int, size: int) -> int:
        if port == RTC_PORT:
            return 0xFF
        with self._lock:
            reg = self.index
            if reg == REG_A:
                frac = self.now() % 1.0
                uip = frac >= 1.0 - UIP_BEFORE or frac < UIP_AFTER
                return self.cmos[REG_A] & 0x7F | (A_UIP if uip else 0)
            if reg == REG_C:
                self._update_flags()
                value, self.cmos[REG_C] = self.cmos[REG_C], 0    # reading C clears its flags
                return value
            if reg in (SEC, MIN, HOUR, WEEKDAY, DAY, MONTH, YEAR, CENTURY) and not self.cmos[REG_B] & B_SET:
                return self._time_reg(reg, time.gmtime(self.now()))
            return self.cmos[reg]

    def io_write(self, port: int, size: int, value: int) -> None:
        value &= 0xFF
        if port == RTC_PORT:
            self.index = value & 0x7F
            return
        with self._lock:
            reg = self.index
            if reg in (REG_C, REG_D):
                return                                          # read-only
            if reg in (SEC, MIN, HOUR, DAY, MONTH, YEAR, CENTURY):
                t = list(time.gmtime(self.now()))
                self.cmos[reg] = value
                field = {SEC: 5, MIN: 4, HOUR: 3, DAY: 2, MONTH: 1}.get(reg)
                if reg == HOUR and not self.cmos[REG_B] & B_24H:
                    h = self._dec(value & 0x7F) % 12
                    t[3] = h + (12 if value & 0x80 else 0)
                elif field is not None:
                    t[field] = self._dec(value)
                elif reg == YEAR:
                    t[0] = t[0] // 100 * 100 + self._dec(value)
                else:
                    t[0] = self._dec(value) * 100 + t[0] % 100
                try:
                    self.offset = calendar.timegm(tuple(t)) + self.now() % 1.0 - self.clock()
                except (OverflowError, ValueError):
                    pass                                        # an impossible date: keep time
                return
            if reg == REG_A:
                value &= 0x7F                                   # UIP is read-only
            self.cmos[reg] = value
