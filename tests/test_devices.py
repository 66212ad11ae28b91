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


# ---- ACPI tables --------------------------------------------------------------------------
from pykvmm.vmm.devices import acpi as A               # noqa: E402
from pykvmm.vmm.devices import acpi_pm as PM           # noqa: E402
from pykvmm.vmm.devices import pc_testdev as T         # noqa: E402
from pykvmm.vmm.devices import rtc as R                # noqa: E402
import struct                                          # noqa: E402


def table_at(area, addr):
    off = addr - A.ACPI_BASE
    length = struct.unpack_from("<I", area, off + 4)[0]
    return area[off:off + length]


def test_acpi_tables_are_linked_and_checksummed():
    area = A.build_tables(vcpus=3)
    rsdp = area[:36]
    assert rsdp[:8] == b"RSD PTR " and sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    rsdt_addr, xsdt_addr = struct.unpack_from("<I", rsdp, 16)[0], struct.unpack_from("<Q", rsdp, 24)[0]
    rsdt, xsdt = table_at(area, rsdt_addr), table_at(area, xsdt_addr)
    listed = [struct.unpack_from("<I", rsdt, 36 + 4 * i)[0] for i in range((len(rsdt) - 36) // 4)]
    assert listed == [struct.unpack_from("<Q", xsdt, 36 + 8 * i)[0] for i in range((len(xsdt) - 36) // 8)]
    sigs = {}
    for addr in listed:
        t = table_at(area, addr)
        assert sum(t) % 256 == 0, t[:4]
        sigs[t[:4]] = t
    assert set(sigs) == {b"FACP", b"APIC"}
    fadt = sigs[b"FACP"]
    facs_addr, dsdt_addr = struct.unpack_from("<II", fadt, 36)
    assert facs_addr % 64 == 0 and area[facs_addr - A.ACPI_BASE:][:4] == b"FACS"
    assert table_at(area, dsdt_addr)[:4] == b"DSDT" and b"_S3_" in table_at(area, dsdt_addr)
    pm1a_evt, _, pm1a_cnt, _, _, pm_tmr = struct.unpack_from("<6I", fadt, 56)
    assert (pm1a_evt, pm1a_cnt, pm_tmr) == (0x600, 0x604, 0x608)
    madt = sigs[b"APIC"]
    entries, off = [], 44
    while off < len(madt):
        entries.append((madt[off], madt[off + 2:off + madt[off + 1]]))
        off += madt[off + 1]
    assert [e[1][1] for e in entries if e[0] == 0] == [0, 1, 2]          # one LAPIC per vCPU
    assert [struct.unpack_from("<I", e[1], 2)[0] for e in entries if e[0] == 1] == [A.IOAPIC_ADDR]
    overrides = [struct.unpack_from("<BBIH", e[1]) for e in entries if e[0] == 2]   # bus, IRQ, GSI, flags
    assert overrides == [(0, 0, 2, 0)] + [(0, irq, irq, 0xD) for irq in (5, 9, 10, 11)]   # as QEMU's pc


# ---- ACPI PM registers ----------------------------------------------------------------------
def test_pm_timer_counts_at_3_579545_mhz():
    now = [0]
    pm = PM.AcpiPm(lambda t: None, clock=lambda: now[0])
    now[0] = 1_000_000_000
    assert pm.io_read(PM.PM_BASE + PM.PM_TMR, 4) == 3579545
    now[0] = 5_000_000_000                                   # wraps at 24 bits
    assert pm.io_read(PM.PM_BASE + PM.PM_TMR, 4) == (5 * 3579545) & 0xFFFFFF


def test_pm1_status_is_write_one_to_clear_and_slp_en_sleeps():
    slept = []
    pm = PM.AcpiPm(slept.append)
    pm.set_status(PM.STS_RTC | PM.STS_WAK)
    pm.io_write(PM.PM_BASE, 2, PM.STS_RTC)
    assert pm.io_read(PM.PM_BASE, 2) == PM.STS_WAK
    pm.io_write(PM.PM_BASE + 2, 2, PM.EN_RTC)
    assert pm.io_read(PM.PM_BASE + 2, 2) == PM.EN_RTC
    pm.io_write(PM.PM_BASE + PM.PM1_CNT, 2, 0x2400)          # SLP_EN | SLP_TYP=1
    assert slept == [1]
    assert pm.io_read(PM.PM_BASE + PM.PM1_CNT, 2) == 0x400 | PM.CNT_SCI_EN   # SLP_EN reads 0


# ---- RTC/CMOS -------------------------------------------------------------------------------
def rtc_read(rtc, reg):
    rtc.io_write(R.RTC_PORT, 1, reg)
    return rtc.io_read(R.RTC_PORT + 1, 1)


def rtc_write(rtc, reg, value):
    rtc.io_write(R.RTC_PORT, 1, reg)
    rtc.io_write(R.RTC_PORT + 1, 1, value)


def test_rtc_time_is_bcd_then_binary():
    t = [1_700_000_000.5]       # 2023-11-14 22:13:20 UTC
    rtc = R.Rtc(clock=lambda: t[0])
    assert (rtc_read(rtc, R.HOUR), rtc_read(rtc, R.MIN), rtc_read(rtc, R.SEC)) == (0x22, 0x13, 0x20)
    assert (rtc_read(rtc, R.YEAR), rtc_read(rtc, R.MONTH), rtc_read(rtc, R.DAY)) == (0x23, 0x11, 0x14)
    rtc_write(rtc, R.REG_B, R.B_24H | R.B_DM_BINARY)
    assert rtc_read(rtc, R.MIN) == 13


def test_rtc_uip_window_follows_the_datasheet():
    t = [100.5]
    rtc = R.Rtc(clock=lambda: t[0])
    assert not rtc_read(rtc, R.REG_A) & R.A_UIP
    t[0] = 100.9999                                          # 100 us before the update
    assert rtc_read(rtc, R.REG_A) & R.A_UIP
    t[0] = 101.001                                           # 1 ms into the update cycle
    assert rtc_read(rtc, R.REG_A) & R.A_UIP
    t[0] = 101.003
    assert not rtc_read(rtc, R.REG_A) & R.A_UIP


def test_rtc_alarm_sets_af_and_irqf_and_reading_c_clears():
    t = [1000.2]
    rtc = R.Rtc(clock=lambda: t[0])
    for reg in (R.SEC_ALARM, R.MIN_ALARM, R.HOUR_ALARM):
        rtc_write(rtc, reg, R.ALARM_ANY)
    rtc_write(rtc, R.REG_B, rtc_read(rtc, R.REG_B) | R.B_AIE)
    assert rtc.next_alarm() == 1001
    t[0] = 1001.1
    c = rtc_read(rtc, R.REG_C)
    assert c & R.C_AF and c & R.C_IRQF
    assert rtc_read(rtc, R.REG_C) == 0


def test_rtc_guest_can_set_the_time_and_cmos_has_memory():
    t = [1_700_000_000.0]
    rtc = R.Rtc(clock=lambda: t[0], mem_size=128 << 20, cpus=2)
    rtc_write(rtc, R.HOUR, 0x05)
    assert rtc_read(rtc, R.HOUR) == 0x05 and rtc_read(rtc, R.MIN) == 0x13
    assert rtc_read(rtc, 0x34) | rtc_read(rtc, 0x35) << 8 == (112 << 20) >> 16
    assert rtc_read(rtc, 0x5F) == 1


# ---- pc-testdev ---------------------------------------------------------------------------
def test_pc_testdev_ioport_iomem_and_irq_lines():
    lines = []
    dev = T.PcTestDev(lambda irq, level: lines.append((irq, level)))
    dev.io_write(T.IOPORT, 4, 0x12345678)
    assert dev.io_read(T.IOPORT, 4) == 0x12345678 and dev.io_read(T.IOPORT, 1) == 0x78
    dev.io_write(T.IOPORT, 2, 0xABCD)
    assert dev.io_read(T.IOPORT, 4) == 0x1234ABCD
    dev.io_write(T.IRQ_PORT + 11, 1, 1)
    dev.io_write(T.IRQ_PORT + 11, 1, 0)
    assert lines == [(11, 1), (11, 0)]
    dev.mmio_write(0x10, 8, 0x1122334455667788)
    assert dev.mmio_read(0x14, 4) == 0x11223344


# ---- PCI configuration space and pci-testdev ----------------------------------------------
from pykvmm.vmm.devices import pci as P                # noqa: E402
from pykvmm.vmm.devices import pci_testdev as PT       # noqa: E402


def pci_machine():
    ports, mmio = PortBus(), MmioBus()
    warnings = []
    bus = P.PciBus(ports, mmio, warn=warnings.append)
    bus.register_ports()
    bus.attach(P.devfn(0), P.I440fxHost())
    bus.attach(P.devfn(1), P.Piix3Isa())
    dev = PT.PciTestDev()
    bus.attach(PT.SLOT, dev)
    return ports, mmio, dev, warnings


def cfg_read(ports, slot, reg, size):
    # as lib/x86/asm/pci.h: the register's full offset in CONFIG_ADDRESS, the data at 0xcfc
    ports.write(P.CONFIG_ADDRESS, 4, P.CONFIG_ENABLE | slot << 8 | reg)
    return ports.read(P.CONFIG_DATA, size)


def cfg_write(ports, slot, reg, size, value):
    ports.write(P.CONFIG_ADDRESS, 4, P.CONFIG_ENABLE | slot << 8 | reg)
    ports.write(P.CONFIG_DATA, size, value)


def test_pci_config_reads_ids_and_absent_functions_are_all_ones():
    ports, _, _, _ = pci_machine()
    assert cfg_read(ports, 0, P.VENDOR_ID, 2) == 0x8086 and cfg_read(ports, 0, P.DEVICE_ID, 2) == 0x1237
    assert cfg_read(ports, P.devfn(1), P.HEADER_TYPE, 1) == P.HEADER_MULTIFUNCTION
    assert cfg_read(ports, 0, P.REVISION, 4) == 0x06000002               # host bridge, revision 2
    assert cfg_read(ports, P.devfn(1), P.CLASS_PROG + 1, 2) == 0x0601     # ISA bridge
    assert cfg_read(ports, PT.SLOT, P.VENDOR_ID, 4) == PT.DEVICE_TEST << 16 | PT.VENDOR_REDHAT
    assert cfg_read(ports, P.devfn(5), P.VENDOR_ID, 2) == 0xFFFF
    ports.write(P.CONFIG_ADDRESS, 4, P.CONFIG_ENABLE | 1 << 16)          # bus 1: nothing there
    assert ports.read(P.CONFIG_DATA, 4) == 0xFFFFFFFF
    ports.write(P.CONFIG_ADDRESS, 4, 0)                                  # enable bit clear
    assert ports.read(P.CONFIG_DATA, 2) == 0xFFFF
    ports.write(P.CONFIG_ADDRESS + 1, 1, 0x55)                           # not a dword: not the address
    assert ports.read(P.CONFIG_ADDRESS, 4) == 0


def test_pci_read_only_fields_ignore_writes():
    ports, _, _, _ = pci_machine()
    cfg_write(ports, PT.SLOT, P.VENDOR_ID, 4, 0)
    assert cfg_read(ports, PT.SLOT, P.VENDOR_ID, 2) == PT.VENDOR_REDHAT
    cfg_write(ports, PT.SLOT, P.INTERRUPT_LINE, 1, 11)
    assert cfg_read(ports, PT.SLOT, P.INTERRUPT_LINE, 1) == 11


def test_pci_bar_sizing_protocol_and_decoding():
    ports, mmio, dev, _ = pci_machine()
    bar0 = P.BAR0
    assert cfg_read(ports, PT.SLOT, bar0, 4) == PT.MEM_ADDR
    assert cfg_read(ports, PT.SLOT, bar0 + 4, 4) == PT.IO_ADDR | P.BAR_IO
    assert mmio.find(PT.MEM_ADDR, 1) is not None and ports.owner(PT.IO_ADDR + 0xFF) is not None
    cfg_write(ports, PT.SLOT, bar0, 4, 0xFFFFFFFF)                       # size it
    assert cfg_read(ports, PT.SLOT, bar0, 4) == ~(PT.MEM_SIZE - 1) & 0xFFFFFFFF
    assert mmio.find(PT.MEM_ADDR, 1) is None and mmio.find(0xFFFFF000, 1) is None   # the pattern is not decoded
    cfg_write(ports, PT.SLOT, bar0 + 4, 4, 0xFFFFFFFF)
    assert cfg_read(ports, PT.SLOT, bar0 + 4, 4) == (~(PT.IO_SIZE - 1) & 0xFFFFFFFF) | P.BAR_IO
    assert ports.owner(PT.IO_ADDR) is None
    cfg_write(ports, PT.SLOT, bar0, 4, 0xE0000000)                       # moved by the guest
    cfg_write(ports, PT.SLOT, bar0 + 4, 4, 0xD000)
    assert mmio.find(0xE0000000, 4)[0] == 0 and ports.owner(0xD000) is not None
    cfg_write(ports, PT.SLOT, P.COMMAND, 2, 0)                           # decoding off: gone
    assert mmio.find(0xE0000000, 4) is None and ports.owner(0xD000) is None
    cfg_write(ports, PT.SLOT, P.COMMAND, 2, P.CMD_IO | P.CMD_MEMORY)
    assert dev.mem_bar.address == 0xE0000000 and dev.io_bar.address == 0xD000


def test_pci_bar_moved_onto_another_device_stays_off():
    ports, mmio, dev, warnings = pci_machine()
    ports.register(0x3F8, 8, Recorder("uart"))
    cfg_write(ports, PT.SLOT, P.BAR0 + 4, 4, 0x300)                      # 0x300-0x3ff covers the uart
    assert dev.io_bar.address is None and ports.owner(0x3F8).name == "uart"
    assert "not decoded" in warnings[0]


def read_testdev_header(read, base):
    raw = bytes(read(base + i, 1) for i in range(64))
    test, width, offset, data, count = struct.unpack_from("<BBxxIBxxxI", raw)
    return test, width, offset, data, count, raw[16:raw.index(b"\0", 16)].decode()


def test_pci_testdev_tests_count_matching_writes():
    ports, mmio, dev, _ = pci_machine()
    mem = lambda addr, size: mmio.read(addr, size)           # noqa: E731
    assert mem(PT.MEM_ADDR, 4) == 0                          # no test selected
    mmio.write(PT.MEM_ADDR, 1, 0)                            # mmio-no-eventfd
    _, width, offset, data, count, name = read_testdev_header(mem, PT.MEM_ADDR)
    assert (width, offset, data, count, name) == (1, 0x800, PT.DATAMATCH, 0, "mmio-no-eventfd")
    mmio.write(PT.MEM_ADDR + offset, 1, data)
    mmio.write(PT.MEM_ADDR + offset, 1, 0x11)                 # wrong value: not counted
    mmio.write(PT.MEM_ADDR + offset + 1, 1, data)             # wrong place: not counted
    assert read_testdev_header(mem, PT.MEM_ADDR)[4] == 1
    ports.write(PT.IO_ADDR, 1, 1)                             # portio-wildcard-eventfd
    io = lambda port, size: ports.read(port, size)            # noqa: E731
    _, _, offset, data, _, name = read_testdev_header(io, PT.IO_ADDR)
    assert (name, offset, data) == ("portio-wildcard-eventfd", 0x80 + 4, PT.NOMATCH)
    ports.write(PT.IO_ADDR + offset, 1, 0x99)                 # any value counts
    assert read_testdev_header(io, PT.IO_ADDR)[4] == 1
    ports.write(PT.IO_ADDR, 1, 3)                             # no such test: reads 0 again
    assert io(PT.IO_ADDR + 1, 1) == 0
    mmio.write(PT.MEM_ADDR, 1, 2)
    assert read_testdev_header(mem, PT.MEM_ADDR)[5] == "mmio-datamatch-eventfd"
    assert mem(PT.MEM_ADDR + 16 + len("mmio-datamatch-eventfd"), 1) == 0   # the terminator reads 0


def test_pci_testdev_eventfd_tests_arm_an_ioeventfd_that_follows_the_bar():
    ports, mmio, dev, _ = pci_machine()
    calls = []
    dev.ioeventfd = lambda fd, addr, length, pio, datamatch=None, deassign=False: \
        calls.append((addr, length, pio, datamatch, deassign))
    mmio.write(PT.MEM_ADDR, 1, 0)                            # no-eventfd: nothing armed
    mmio.write(PT.MEM_ADDR, 1, 2)                            # mmio-datamatch-eventfd
    assert calls == [(PT.MEM_ADDR + 0x802, 1, False, PT.DATAMATCH, False)]
    cfg_write(ports, PT.SLOT, P.BAR0, 4, 0xE0000000)          # the guest moves the BAR
    assert calls[1:] == [(PT.MEM_ADDR + 0x802, 1, False, PT.DATAMATCH, True),
                         (0xE0000802, 1, False, PT.DATAMATCH, False)]
    ports.write(PT.IO_ADDR, 1, 1)                            # portio-wildcard-eventfd: any value
    assert calls[3:] == [(0xE0000802, 1, False, PT.DATAMATCH, True), (PT.IO_ADDR + 0x84, 1, True, None, False)]
    dev.close()
    assert calls[-1] == (PT.IO_ADDR + 0x84, 1, True, None, True) and dev._armed is None
