"""A 16550A UART (the PC's COM1 at 0x3f8), as QEMU's serial device behaves with no input.

Transmit is immediate: the transmitter is always empty (LSR THRE|TEMT), so a polling
driver never waits. Divisor latch, IER, LCR, MCR and the scratch register read back what
was written; MCR loopback makes MSR reflect the modem-control outputs. Receive is empty.
Interrupts are not raised (no guest we run enables them); IIR reports a pending THR-empty
interrupt only as a status, so a driver that polls IIR sees the right value.
"""

from __future__ import annotations

import threading

from .bus import PortDevice

COM1_BASE = 0x3F8
UART_PORTS = 8

RBR_THR, IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
LCR_DLAB = 0x80
LSR_DR, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40
IIR_NO_INT, IIR_THRI, IIR_FIFO_ENABLED = 0x01, 0x02, 0xC0
IER_THRI = 0x02
FCR_ENABLE = 0x01
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80


class Uart16550(PortDevice):
    name = "uart16550"

    def __init__(self, sink, base: int = COM1_BASE):
        self.sink = sink            # callable(bytes): the transmitted bytes
        self.base = base
        self._lock = threading.Lock()
        self.dll, self.dlm = 0x0C, 0x00   # 9600 baud after reset, as QEMU
        self.ier = self.fcr = self.lcr = self.mcr = self.scr = 0
        self.thr_interrupt = False

    def io_read(self, port: int, size: int) -> int:
        reg = port - self.base
        with self._lock:
            dlab = self.lcr & LCR_DLAB
            if reg == RBR_THR:
                return self.dll if dlab else 0
            if reg == IER:
                return self.dlm if dlab else self.ier
            if reg == IIR_FCR:
                fifo = IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE else 0
                if self.thr_interrupt and self.ier & IER_THRI:
                    self.thr_interrupt = False   # reading IIR acknowledges THR empty
                    return fifo | IIR_THRI
                return fifo | IIR_NO_INT
            if reg == LCR:
                return self.lcr
            if reg == MCR:
                return self.mcr
            if reg == LSR:
                return LSR_THRE | LSR_TEMT
            if reg == MSR:
                if self.mcr & MCR_LOOP:
                    m = self.mcr
                    return ((MSR_CTS if m & MCR_RTS else 0) | (MSR_DSR if m & MCR_DTR else 0)
                            | (MSR_RI if m & MCR_OUT1 else 0) | (MSR_DCD if m & MCR_OUT2 else 0))
                return MSR_DCD | MSR_DSR | MSR_CTS
            return self.scr

    def io_write(self, port: int, size: int, value: int) -> None:
        reg = port - self.base
        value &= 0xFF
        out = None
        with self._lock:
            dlab = self.lcr & LCR_DLAB
            if reg == RBR_THR:
                if dlab:
                    self.dll = value
                else:
                    self.thr_interrupt = True
                    if not self.mcr & MCR_LOOP:   # loopback: the byte goes to the (empty) receiver
                        out = bytes((value,))
            elif reg == IER:
                if dlab:
                    self.dlm = value
                else:
                    if value & IER_THRI and not self.ier & IER_THRI:
                        self.thr_interrupt = True   # enabling THRI with THR empty raises it
                    self.ier = value & 0x0F
            elif reg == IIR_FCR:
                self.fcr = value & 0xC9
            elif reg == LCR:
                self.lcr = value
            elif reg == MCR:
                self.mcr = value & 0x1F
            elif reg == SCR:
                self.scr = value
        if out is not None:
            self.sink(out)
