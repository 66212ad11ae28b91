"""The PC platform around a guest: which devices sit where, attached to the machine's buses.

Every machine gets them (pykvmm's own guests simply never touch these ports); a multiboot
guest such as kvm-unit-tests finds the devices it expects from QEMU's `pc` machine.
"""

from __future__ import annotations

from ..console import Console
from .debug_exit import DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, IsaDebugExit
from .fw_cfg import FW_CFG_PORT_SEL, FW_CFG_PORTS, FwCfg
from .uart import COM1_BASE, UART_PORTS, Uart16550


class PcPlatform:
    def __init__(self, machine):
        cfg = machine.config
        console = machine.console
        self.uart = Uart16550(lambda data: console.write(Console.DEVICE_STREAM, 0, data))
        self.debug_exit = IsaDebugExit(machine.request_exit)
        self.fw_cfg = FwCfg(ram_size=cfg.mem_size, cpus=cfg.vcpus)
        ports = machine.ports
        ports.register(COM1_BASE, UART_PORTS, self.uart)
        ports.register(DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, self.debug_exit)
        ports.register(FW_CFG_PORT_SEL, FW_CFG_PORTS, self.fw_cfg)

    def write_memory(self, machine) -> None:
        """Firmware-provided memory contents (none yet)."""


def attach_pc_devices(machine) -> PcPlatform:
    return PcPlatform(machine)
