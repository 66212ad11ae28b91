"""Guest memory: one anonymous host mapping, registered in every plane's VM.

Every guest-supplied address goes through the bounds checks here, so a hostile guest gets
a GuestMemoryError (turned into an error status or a fault), never a host crash.
"""

from __future__ import annotations

import mmap
import struct

from ..uapi import ffi


class GuestMemoryError(ValueError):
    pass


def host_memory_available() -> int | None:
    """Bytes the host can give now (MemAvailable + SwapFree), or None if it does not say."""
    try:
        with open("/proc/meminfo") as f:
            info = {k: int(v.split()[0]) << 10 for k, _, v in (line.partition(":") for line in f)
                    if k in ("MemAvailable", "SwapFree")}
    except (OSError, ValueError):
        return None
    return sum(info.values()) if "MemAvailable" in info else None


class GuestMemory:
    def __init__(self, size: int):
        if size <= 0 or size % (2 << 20):
            raise ValueError("guest memory size must be a positive multiple of 2 MiB")
        available = host_memory_available()
        if available is not None and size > available:
            raise ValueError(f"guest memory of {size >> 20} MiB is more than this host can give now "
                             f"({available >> 20} MiB available, RAM and swap)")
        self.size = size
        try:
            self.map = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise ValueError(f"cannot map {size >> 20} MiB of guest memory: {e.strerror}") from None
        self._cbuf = ffi.from_buffer(self.map)
        self.hva = int(ffi.cast("uintptr_t", self._cbuf))

    def check(self, gpa: int, length: int) -> None:
        if gpa < 0 or length < 0 or gpa + length > self.size:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is outside guest memory "
                                   f"(0..{self.size:#x})")

    def read(self, gpa: int, length: int) -> bytes:
        self.check(gpa, length)
        return self.map[gpa:gpa + length]

    def write(self, gpa: int, data: bytes) -> None:
        self.check(gpa, len(data))
        self.map[gpa:gpa + len(data)] = data

    def u32(self, gpa: int) -> int:
        self.check(gpa, 4)
        return struct.unpack_from("<I", self.map, gpa)[0]

    def u64(self, gpa: int) -> int:
        self.check(gpa, 8)
        return struct.unpack_from("<Q", self.map, gpa)[0]

    def write_u32(self, gpa: int, value: int) -> None:
        self.check(gpa, 4)
        struct.pack_into("<I", self.map, gpa, value & 0xFFFFFFFF)

    def write_u64(self, gpa: int, value: int) -> None:
        self.check(gpa, 8)
        struct.pack_into("<Q", self.map, gpa, value & 0xFFFFFFFFFFFFFFFF)

    def cstring(self, gpa: int, limit: int) -> str:
        """A NUL-terminated string the guest points at (at most ``limit`` bytes, decoded leniently)."""
        if gpa == 0:
            return ""
        self.check(gpa, 1)
        end = min(self.size, gpa + limit)
        raw = self.map[gpa:end]
        nul = raw.find(b"\0")
        return (raw if nul < 0 else raw[:nul]).decode("utf-8", "replace")

    def close(self) -> None:
        self._cbuf = None
        try:
            self.map.close()
        except BufferError:
            pass
