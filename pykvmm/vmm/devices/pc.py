"""The PC platform around a guest: which devices sit where, attached to the machine's buses,
and the firmware's part (ACPI tables, S3 resume) that QEMU's SeaBIOS would play.

Every machine gets them (pykvmm's own guests simply never touch these ports); a multiboot
guest such as kvm-unit-tests finds what it expects from QEMU's `pc` machine with
`-device pc-testdev -device isa-debug-exit,iobase=0xf4,iosize=0x4 -device pci-testdev`
(PCI bus 0: the i440FX host bridge, the PIIX3 ISA bridge and pci-testdev at 00:02.0). The PIC, IOAPIC, LAPICs
and (unless disabled) the PIT are KVM's in-kernel models; devices belong to plane 0.
"""

from __future__ import annotations

import threading
import time

from ...uapi import constants as C
from ...x86 import protmode
from ..console import Console
from . import acpi
from .acpi_pm import PM_BASE, PM_PORTS, STS_RTC, STS_WAK, EN_RTC, AcpiPm
from .debug_exit import DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, IsaDebugExit
from .fw_cfg import FW_CFG_PORT_SEL, FW_CFG_PORTS, FwCfg
from .pci import I440fxHost, PciBus, Piix3Isa, devfn
from .pci_testdev import SLOT as PCI_TESTDEV_SLOT, PciTestDev
from .pc_testdev import (FLUSHPAGE, FLUSHPAGE_SIZE, IOMEM_ADDR, IOMEM_SIZE, IOPORT, IOPORT_SIZE, IRQ_LINES,
                         IRQ_PORT, PcTestDev)
from .rtc import RTC_PORT, RTC_PORTS, Rtc
from .uart import COM1_BASE, UART_PORTS, Uart16550

RTC_IRQ = 8


def pc_gsi_routes() -> list[tuple[int, int, int]]:
    """QEMU's GSI routing for the pc machine (kvm_pc_setup_irq_routing): ISA IRQs 0-15 to the
    8259s, GSIs 0-23 to the IOAPIC pin of the same number except IRQ0 (the PIT), which goes
    to pin 2, as the MADT's interrupt source override says; GSI 2 (the cascade) goes nowhere."""
    routes = [(i, C.KVM_IRQCHIP_PIC_MASTER, i) for i in range(8) if i != 2]
    routes += [(i, C.KVM_IRQCHIP_PIC_SLAVE, i - 8) for i in range(8, 16)]
    routes += [(i, C.KVM_IRQCHIP_IOAPIC, acpi.PIT_GSI if i == 0 else i) for i in range(24) if i != 2]
    return routes


def plane0_vm(pvm):
    """The KVM VM that holds plane 0 (the devices' plane) on any planes backend."""
    return pvm.vm0 if hasattr(pvm, "vm0") else pvm.planes[0].kvm_vm


class PcPlatform:
    def __init__(self, machine):
        self.machine = machine
        cfg = machine.config
        console = machine.console
        self.uart = Uart16550(lambda data: console.write(Console.DEVICE_STREAM, 0, data))
        self.debug_exit = IsaDebugExit(machine.request_exit)
        self.fw_cfg = FwCfg(ram_size=cfg.mem_size, cpus=cfg.vcpus)
        self.rtc = Rtc(mem_size=cfg.mem_size, cpus=cfg.vcpus)
        self.pm = AcpiPm(self._sleep)
        self.testdev = PcTestDev(self._irq_line)
        ports = machine.ports
        ports.register(COM1_BASE, UART_PORTS, self.uart)
        ports.register(DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, self.debug_exit)
        ports.register(FW_CFG_PORT_SEL, FW_CFG_PORTS, self.fw_cfg)
        ports.register(RTC_PORT, RTC_PORTS, self.rtc)
        ports.register(PM_BASE, PM_PORTS, self.pm)
        ports.register(IOPORT, IOPORT_SIZE, self.testdev)
        ports.register(FLUSHPAGE, FLUSHPAGE_SIZE, self.testdev)
        ports.register(IRQ_PORT, IRQ_LINES, self.testdev)
        machine.mmio.register(IOMEM_ADDR, IOMEM_SIZE, self.testdev)
        self.pci = PciBus(ports, machine.mmio, warn=machine.warn)
        self.pci.register_ports()
        self.pci.attach(devfn(0), I440fxHost())
        self.pci.attach(devfn(1), Piix3Isa())
        self.pci_testdev = PciTestDev()
        self.pci.attach(PCI_TESTDEV_SLOT, self.pci_testdev)
        reserve = getattr(machine.boot, "reserve", None)
        if reserve is not None:
            reserve(acpi.ACPI_BASE, acpi.ACPI_END, "the ACPI tables")
        self.suspended = threading.Event()
        self.suspends = 0

    # -- after the VM and its irqchip exist ---------------------------------------------------
    def create_kvm_devices(self, pvm) -> None:
        self.vm = plane0_vm(pvm)
        self.vm.set_gsi_routing(pc_gsi_routes())
        self.pci_testdev.ioeventfd = self.vm.ioeventfd
        if self.machine.config.pit:
            self.vm.create_pit2()

    def close(self) -> None:
        self.pci_testdev.close()

    def attach_fast_path(self, table) -> None:
        """The devices whose answers the exit fast path gives (pykvmm/fastexit.py)."""
        self.pm.attach_fast_path(table)
        self.pci_testdev.attach_fast_path(table)

    def write_memory(self, machine) -> None:
        machine.memory.write(acpi.ACPI_BASE, acpi.build_tables(machine.config.vcpus))

    def _irq_line(self, irq: int, level: int) -> None:
        self.vm.irq_line(irq, level)

    # -- ACPI S3 (suspend to RAM) ---------------------------------------------------------------
    def _sleep(self, sleep_type: int) -> None:
        """A write of SLP_EN: S3 suspends (memory kept) until a wake event, then the boot
        processor resumes in real mode at the FACS waking vector, as SeaBIOS does; S5 is
        power-off. Other sleep types are ignored."""
        m = self.machine
        if sleep_type == acpi.SLP_TYP_S5:
            m.request_exit(0)
            return
        if sleep_type != acpi.SLP_TYP_S3:
            m.warn(f"sleep type {sleep_type} written to PM1a_CNT is not S3 or S5: ignored")
            return
        thread = m.current_vcpu_thread()
        if thread is None or thread.index != 0:
            m.warn("S3 requested by an application processor: only the BSP's request is handled")
            return
        self.suspends += 1
        self.suspended.set()
        wake = self.rtc.next_alarm() if self.pm.enable & EN_RTC else None
        if wake is None:
            m.warn("S3 with no wake event enabled (RTC alarm with RTC_EN): the guest sleeps until the timeout")
            m.sleep(None)
            return
        if not m.sleep(max(0.0, wake - self.rtc.clock())):
            return                                   # the machine is stopping
        self.rtc.acknowledge_alarm()
        self.pm.set_status(STS_RTC | STS_WAK)
        self.suspended.clear()
        self._resume_bsp(thread)

    def _resume_bsp(self, thread) -> None:
        vector = self.machine.memory.u32(acpi.FACS_ADDR + acpi.FACS_WAKING_VECTOR)
        v = thread.plane_vcpu(0)
        sregs = v.sregs
        protmode.real_mode_segments(sregs, vector >> 4)
        v.mark_dirty("sregs")
        regs = v.regs
        regs.rip, regs.rflags = vector & 0xF, 0x2
        v.mark_dirty("regs")


def attach_pc_devices(machine) -> PcPlatform:
    return PcPlatform(machine)
