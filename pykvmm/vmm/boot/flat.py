"""pykvmm's own guest protocol: a flat x86-64 binary at GUEST_LOAD_ADDR, entered in long mode.

Every (vCPU, plane) starts at the entry with rdi = vCPU index, rsi = plane, rdx = boot info
(see abi.py, the single source of these addresses).
"""

from __future__ import annotations

from .. import abi, bringup
from ..hypercalls import hypercall_page
from .errors import BootError


class FlatBinary:
    name = "flat"
    long_mode = True          # entered with paging and CR4.OSXSAVE (when the host has XSAVE) on
    test_abi = True           # uses the ucall/console ports and the hypercall page

    def __init__(self, image: bytes):
        if not image or len(image) > abi.GUEST_MAX_SIZE:
            raise BootError(f"a flat guest image must be 1..{abi.GUEST_MAX_SIZE} bytes, not {len(image)}")
        self.image = image

    def check(self, config) -> None:
        needed = abi.free_memory_start(config.vcpus)
        if config.mem_size < needed:
            raise BootError(f"guest memory of {config.mem_size >> 20} MiB is too small; {config.vcpus} vCPUs "
                            f"need at least {(needed + (1 << 20) - 1) >> 20} MiB")

    def write_memory(self, machine) -> None:
        cfg = machine.config
        if cfg.hyperv is not None:
            from ..hyperv.hypercall import page_bytes
            stubs = page_bytes()       # the same stubs, plus rep continuation
        else:
            stubs = hypercall_page("port")
        bringup.write_memory(machine.memory, self.image, cfg.vcpus, cfg.planes, cfg.mem_size, cfg.arg, stubs)

    def init_vcpu(self, machine, v, index: int, plane: int) -> None:
        bringup.enter_long_mode(v, index, plane, machine.osxsave)
