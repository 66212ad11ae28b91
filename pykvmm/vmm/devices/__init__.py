"""The machine's devices, one small module each, on an O(1) port/MMIO bus.

pykvmm's own test ABI (console, ucall port) and the PC devices multiboot guests such as
kvm-unit-tests use (UART, isa-debug-exit, fw_cfg, ...). Devices know nothing of planes.
"""

from .bus import BusConflict, MmioBus, MmioDevice, PortBus, PortDevice
from ..console import Console   # re-exported: the console's home is vmm/console.py
from .ucall import VERB_NAMES, BadUcall, Ucall, decode_ucall

__all__ = ["BadUcall", "BusConflict", "Console", "MmioBus", "MmioDevice", "PortBus", "PortDevice",
           "Ucall", "VERB_NAMES", "decode_ucall"]
