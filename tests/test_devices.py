"""Unit tests of the device models and the port/MMIO bus (pure logic, no KVM)."""

import pytest

from pykvmm.vmm.devices import BusConflict, MmioBus, MmioDevice, PortBus, PortDevice
from pykvmm.vmm.devices import fw_cfg as F
from pykvmm.vmm.devices import uart as U
from pykvmm.vmm.devices.debug_exit import IsaDebugExit, qemu_status


# ---- bus ----------------------------------------------------------------------------------
class Recorder(PortDevice, MmioDevice):
    def __init__(self, name="rec"):
        self.name, self.log = name, []

    def io_read(self, port, size):
        return port

    def io_write(self, port, size, value):
        self.log.append((port, size, value))

    def mmio_read(self, offset, size):
        return offset

    def mmio_write(self, offset, size, value):
        self.log.append((offset, size, value))


def test_port_bus_dispatch_and_unowned():
    bus, dev = PortBus(), Recorder()
    bus.register(0x3F8, 8, dev)
    assert bus.read(0x3FD, 1) == 0x3FD and bus.read(0x400, 1) is None
    assert bus.write(0x3F8, 1, 0x41) and not bus.write(0x3F7, 1, 0)
    assert dev.log == [(0x3F8, 1, 0x41)]


def test_port_bus_refuses_overlaps_and_bad_ranges():
    bus = PortBus()
    bus.register(0x70, 2, Recorder("rtc"))
    with pytest.raises(BusConflict, match="0x71 is claimed by rtc and other"):
        bus.register(0x71, 4, Recorder("other"))
    with pytest.raises(ValueError):
        bus.register(0xFFFF, 2, Recorder())


def test_mmio_bus_finds_ranges_within_and_across_pages():
    bus, a, b = MmioBus(), Recorder("a"), Recorder("b")
    bus.register(0xFF000000, 0x2000, a)
    bus.register(0xFF002000, 0x10, b)
    assert bus.read(0xFF001FFC, 4) == 0x1FFC
    assert bus.read(0xFF002004, 4) == 4 and bus.find(0xFF002004, 4)[1] is b
    assert bus.read(0xFF00200E, 4) is None      # runs past b's end
    with pytest.raises(BusConflict, match="overlaps a"):
        bus.register(0xFF001000, 0x10, Recorder("c"))


# ---- 16550 UART -------------------------------------------------------------------------
def make_uart():
    out = bytearray()
    return U.Uart16550(out.extend), out


def test_uart_transmits_and_is_always_ready():
    uart, out = make_uart()
    assert uart.io_read(U.COM1_BASE + U.LSR, 1) == U.LSR_THRE | U.LSR_TEMT
    for ch in b"hi\r\n":
        uart.io_write(U.COM1_BASE + U.RBR_THR, 1, ch)
    assert bytes(out) == b"hi\r\n"


def test_uart_divisor_latch_does_not_transmit():
    uart, out = make_uart()
    base = U.COM1_BASE
    uart.io_write(base + U.LCR, 1, 0x83)
    uart.io_write(base + U.RBR_THR, 1, 0x01)
    uart.io_write(base + U.IER, 1, 0x00)
    assert uart.io_read(base + U.RBR_THR, 1) == 0x01 and uart.io_read(base + U.IER, 1) == 0
    uart.io_write(base + U.LCR, 1, 0x03)
    assert out == b"" and uart.io_read(base + U.LCR, 1) == 0x03


def test_uart_registers_read_back_and_loopback_msr():
    uart, out = make_uart()
    base = U.COM1_BASE
    uart.io_write(base + U.SCR, 1, 0x5A)
    assert uart.io_read(base + U.SCR, 1) == 0x5A
    assert uart.io_read(base + U.MSR, 1) == U.MSR_DCD | U.MSR_DSR | U.MSR_CTS
    uart.io_write(base + U.MCR, 1, U.MCR_LOOP | U.MCR_RTS)
    assert uart.io_read(base + U.MSR, 1) == U.MSR_CTS
    uart.io_write(base + U.RBR_THR, 1, ord("x"))
    assert out == b""                                   # looped back, not sent


def test_uart_iir_reports_thr_empty_once_enabled():
    uart, _ = make_uart()
    base = U.COM1_BASE
    assert uart.io_read(base + U.IIR_FCR, 1) == U.IIR_NO_INT
    uart.io_write(base + U.IER, 1, U.IER_THRI)
    assert uart.io_read(base + U.IIR_FCR, 1) == U.IIR_THRI
    assert uart.io_read(base + U.IIR_FCR, 1) == U.IIR_NO_INT   # reading IIR acknowledged it
    uart.io_write(base + U.IIR_FCR, 1, 0x01)
    assert uart.io_read(base + U.IIR_FCR, 1) & 0xC0 == U.IIR_FIFO_ENABLED


# ---- isa-debug-exit ---------------------------------------------------------------------
def test_debug_exit_reports_the_written_code():
    codes = []
    dev = IsaDebugExit(codes.append)
    dev.io_write(0xF4, 4, 0x26)
    dev.io_write(0xF4, 1, 0x1FF)
    assert codes == [0x26, 0xFF]
    assert qemu_status(0) == 1 and qemu_status(1) == 3 and qemu_status(0x26) == 77


# ---- fw_cfg -------------------------------------------------------------------------------
def read_item(dev, key, n):
    dev.io_write(F.FW_CFG_PORT_SEL, 2, key)
    return bytes(dev.io_read(F.FW_CFG_PORT_DATA, 1) for _ in range(n))


def test_fw_cfg_items():
    dev = F.FwCfg(ram_size=128 << 20, cpus=3)
    assert read_item(dev, F.FW_CFG_SIGNATURE, 4) == b"QEMU"
    assert int.from_bytes(read_item(dev, F.FW_CFG_ID, 4), "little") == 1
    assert int.from_bytes(read_item(dev, F.FW_CFG_RAM_SIZE, 8), "little") == 128 << 20
    assert int.from_bytes(read_item(dev, F.FW_CFG_NB_CPUS, 2), "little") == 3
    assert int.from_bytes(read_item(dev, F.FW_CFG_MAX_CPUS, 2), "little") == 3


def test_fw_cfg_selection_rewinds_and_reads_past_end_are_zero():
    dev = F.FwCfg(ram_size=64 << 20, cpus=1)
    assert read_item(dev, F.FW_CFG_SIGNATURE, 6) == b"QEMU\0\0"
    assert read_item(dev, F.FW_CFG_SIGNATURE, 2) == b"QE"
    assert read_item(dev, 0x11, 8) == bytes(8)          # unknown item (kvm-unit-tests' MAX_RAM)
    assert read_item(dev, F.FW_CFG_NB_CPUS | F.FW_CFG_WRITE_CHANNEL, 2) == b"\1\0"
    assert read_item(dev, F.FW_CFG_NB_CPUS | F.FW_CFG_ARCH_LOCAL, 2) == b"\0\0"   # another namespace
