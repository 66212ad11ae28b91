"""Boot protocols: how a guest image gets into memory and how its vCPUs start.

One loader per protocol, chosen by looking at the file (``open_guest``):
- ``multiboot``: an ELF32/ELF64 image or a multiboot (v1) kernel, booted as QEMU's -kernel
  boots it (kvm-unit-tests): 32-bit protected mode, paging off, the multiboot info in EBX,
  application processors waiting for INIT/SIPI.
- ``flat``: pykvmm's own guests, a flat x86-64 binary entered in long mode (see abi.py).

A protocol object is the machine's boot hook: ``check`` validates it against the machine's
configuration, ``write_memory`` lays out guest memory, ``init_vcpu`` sets each (vCPU, plane)'s
start-up state. Bad images raise BootError, which the CLI reports with exit status 2.
"""

from __future__ import annotations

import os

from .errors import BootError
from .flat import FlatBinary
from .multiboot import MultibootImage, looks_like_multiboot

__all__ = ["BootError", "FlatBinary", "MultibootImage", "open_guest", "from_bytes"]


def from_bytes(data: bytes, *, cmdline: str = "", initrd: bytes | None = None, name: str = "guest"):
    """The boot protocol for an image in memory: multiboot when it looks like one, else flat."""
    if looks_like_multiboot(data):
        return MultibootImage(data, cmdline=cmdline, initrd=initrd, name=name)
    if cmdline or initrd is not None:
        raise BootError(f"{name} is a flat binary: --append and --initrd need a multiboot or ELF kernel")
    return FlatBinary(data)


def open_guest(path: str | os.PathLike, *, cmdline: str = "", initrd: str | os.PathLike | None = None):
    """Read the guest file (and the --initrd file) and pick its boot protocol."""
    from ..loader import GuestImageError, load_image, read_file

    try:
        data = load_image(path)
        module = read_file(initrd, "initrd") if initrd is not None else None
    except GuestImageError as e:
        raise BootError(str(e)) from None
    return from_bytes(data, cmdline=cmdline, initrd=module, name=str(path))
