"""QEMU's isa-debug-exit device: a write of CODE ends the machine.

QEMU exits with status (CODE << 1) | 1, so a guest cannot make QEMU exit 0; kvm-unit-tests
reads status 1 as success. pykvmm keeps the guest's CODE (RunResult.exit_code) and maps it
onto its own exit contract (0 for CODE 0, else 1); ``qemu_status`` gives QEMU's number.
"""

from __future__ import annotations

from .bus import PortDevice

DEBUG_EXIT_PORT = 0xF4
DEBUG_EXIT_SIZE = 4        # kvm-unit-tests' QEMU command line: iobase=0xf4,iosize=0x4


def qemu_status(code: int) -> int:
    """The exit status QEMU gives for a write of ``code`` (as the shell sees it: 8 bits)."""
    return ((code << 1) | 1) & 0xFF


class IsaDebugExit(PortDevice):
    name = "isa-debug-exit"

    def __init__(self, on_exit, base: int = DEBUG_EXIT_PORT):
        self.on_exit = on_exit      # callable(code)
        self.base = base

    def io_read(self, port: int, size: int) -> int:
        return 0

    def io_write(self, port: int, size: int, value: int) -> None:
        self.on_exit(value & ((1 << (8 * size)) - 1))
